"""BitmapLinear: an inference nn.Linear whose pruned fp16/bf16 weight is stored in the bitmap format (ops/bitmap)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .._validate import check_tensor
from ..ops.bitmap import MAX_TOKENS, OP, BitmapMatrix, linear_arrays, to_bitmap
from ..ops.bitmap import _cuda_module as _cuda
from ..ops.bitmap.format import DTYPES, _KEYS as _BITMAP_KEYS

try:
    _compiling = torch.compiler.is_compiling
except AttributeError:  # torch < 2.3
    def _compiling() -> bool:
        return False


class BitmapLinear(nn.Module):
    """``y = x @ W^T + b`` with W [out_features, in_features] held as a :class:`BitmapMatrix` (inference only).

    x: [..., in_features] in the weight's dtype -> y [..., out_features]. The format's arrays are buffers
    (``masks``, ``offsets``, ``values``, ``shape``) and ``bias`` a frozen parameter, so ``.to()``,
    ``state_dict()`` and ``load_state_dict()`` work; a loaded state dict is validated in full (offsets against
    the masks' popcounts, sizes, padding bits, finite values) before it is copied in, and may hold a different
    number of nonzeros (the buffers take the loaded sizes). Nothing else is kept: no dense or second sparse copy
    of the weight (more than ``ops.bitmap.MAX_TOKENS`` tokens rebuild a dense weight for that call only).

    The forward calls ``torch.ops.sparsity_engine.bitmap_linear`` when torch.compile traces it (a registered op
    with a fake implementation: no graph break) and the same implementation directly in eager mode (no
    dispatcher overhead; a contiguous CUDA input of 1..MAX_TOKENS tokens goes straight to the kernel launch,
    ``ops.bitmap.cuda.linear_nd``: no reshapes, one allocation); neither synchronises with the host, so CUDA
    graphs capture it.
    """

    def __init__(self, bm: BitmapMatrix, bias: Optional[torch.Tensor] = None):
        super().__init__()
        if not isinstance(bm, BitmapMatrix):
            raise TypeError(f"bm must be a BitmapMatrix (from to_bitmap), got {type(bm).__name__}")
        self.out_features, self.in_features = bm.shape
        for key in _BITMAP_KEYS:
            self.register_buffer(key, getattr(bm, key))
        self.register_buffer("shape", torch.tensor(bm.shape, dtype=torch.int64))
        if bias is not None:
            check_tensor("bias", bias, ndim=1, dtypes=DTYPES)
            if bias.shape[0] != self.out_features:
                raise ValueError(f"bias must have shape ({self.out_features},), got {tuple(bias.shape)}")
            bias = nn.Parameter(bias.detach().to(bm.dtype), requires_grad=False)
        self.bias = bias
        self.nnz = bm.nnz
        self.max_group = bm.max_group

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "BitmapLinear":
        """The same layer with its weight's zeros dropped (same dtype and device; the Linear is untouched)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        bm = to_bitmap(linear.weight.detach())
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(bm, bias)

    @property
    def bitmap(self) -> BitmapMatrix:
        """The BitmapMatrix view of the buffers (no copy)."""
        return BitmapMatrix(self.masks, self.offsets, self.values, (self.out_features, self.in_features),
                            self.nnz, self.max_group)

    @property
    def weight_dense(self) -> torch.Tensor:
        """The dense weight [out, in] (a new tensor)."""
        from ..ops.bitmap import densify
        return densify(self.bitmap)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        buffers = self._buffers  # one dict instead of nn.Module.__getattr__ per buffer
        values = buffers["values"]
        if x.is_cuda and not _compiling():  # eager decode: the lean path when everything already fits
            k = self.in_features
            if (x.dtype == values.dtype and k > 0 and x.shape[-1] == k and self.out_features > 0
                    and x.get_device() == values.get_device() and x.is_contiguous()):
                tokens = x.numel() // k
                if 0 < tokens <= MAX_TOKENS:
                    return _cuda().linear_nd(x, buffers["masks"], buffers["offsets"], values, self.bias,
                                             self.out_features, k, self.max_group, tokens)
        if x.dtype != values.dtype:
            raise TypeError(f"x must have the weight dtype {values.dtype}, got {x.dtype}")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x must have in_features={self.in_features} as its last dimension, got shape "
                             f"{tuple(x.shape)}")
        if x.device != values.device:
            raise ValueError(f"x is on {x.device} but the bitmap weight is on {values.device}")
        if OP is not None and _compiling():
            return OP(x, self.masks, self.offsets, values, self.bias, self.out_features, self.in_features,
                      self.max_group)
        return linear_arrays(x, self.masks, self.offsets, values, self.bias, self.out_features, self.in_features,
                             self.max_group)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"nnz={self.nnz}, dtype={self.values.dtype}")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # validate the incoming arrays before anything is copied; the number of nonzeros is data, not architecture
        if all(prefix + key in state_dict for key in _BITMAP_KEYS + ("shape",)):
            bm = BitmapMatrix.from_state_dict(state_dict, prefix)
            for key in _BITMAP_KEYS + ("shape",):
                t = state_dict[prefix + key]
                setattr(self, key, torch.empty_like(t, device=getattr(self, key).device))
            self.out_features, self.in_features = bm.shape
            self.nnz, self.max_group = bm.nnz, bm.max_group
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
