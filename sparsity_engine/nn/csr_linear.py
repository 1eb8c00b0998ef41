"""CSRLinear: an inference nn.Linear whose pruned weight is stored as CSR and run by the CSR kernels."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .._dispatch import backend_reasons
from .._validate import FLOAT_DTYPES, check_tensor
from ..ops.csr import CSRMatrix, csr_linear, densify, to_csr
from ..ops.csr.format import _KEYS as _CSR_KEYS


class CSRLinear(nn.Module):
    """``y = x @ W^T + b`` with W [out_features, in_features] held as a :class:`CSRMatrix` (inference only).

    x: [..., in_features] in the weight's dtype -> y [..., out_features]. The CSR arrays are buffers
    (``crow_indices``, ``col_indices``, ``values``, ``row_lengths``, ``row_order``, ``shape``) and ``bias`` a
    frozen parameter, so ``.to()``, ``state_dict()`` and ``load_state_dict()`` work (a loaded state dict may
    hold a different number of nonzeros: the buffers take the loaded sizes). ``backend`` is passed to
    :func:`csr_linear`; ``cache_dense=True`` keeps the rebuilt dense weight when csr_linear falls back to
    dense (large batches), trading memory for not rebuilding it on every call. The first call that the CUDA
    tensor-core kernel serves (fp16/bf16, several tokens: ``ops/csr/cuda.py: use_tiles``) also keeps a second
    copy of the weight in that kernel's tile layout (4 bytes per nonzero, like the CSR arrays; not saved),
    unless ``one_copy`` is set (as ``sparsify_linears_(format='auto')`` does): then fp16/bf16 inputs on CUDA
    run the warp-per-row kernel up to 16 tokens and dense F.linear on a weight rebuilt for the call above,
    so the layer never holds more than the CSR arrays.
    """

    def __init__(self, csr: CSRMatrix, bias: Optional[torch.Tensor] = None, *, backend: Optional[str] = None,
                 cache_dense: bool = False):
        super().__init__()
        if not isinstance(csr, CSRMatrix):
            raise TypeError(f"csr must be a CSRMatrix (from to_csr), got {type(csr).__name__}")
        self.out_features, self.in_features = csr.shape
        for key in _CSR_KEYS:
            self.register_buffer(key, getattr(csr, key))
        self.register_buffer("shape", torch.tensor(csr.shape, dtype=torch.int64))
        if bias is not None:
            check_tensor("bias", bias, ndim=1, dtypes=FLOAT_DTYPES)
            if bias.shape[0] != self.out_features:
                raise ValueError(f"bias must have shape ({self.out_features},), got {tuple(bias.shape)}")
            bias = nn.Parameter(bias.detach().to(csr.dtype), requires_grad=False)
        self.bias = bias
        self.backend = backend
        self.cache_dense = cache_dense
        self.one_copy = False
        self._csr: Optional[CSRMatrix] = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, index_dtype: Optional[torch.dtype] = None,
                    backend: Optional[str] = None) -> "CSRLinear":
        """The same layer with its weight's zeros dropped (same dtype and device; the Linear is untouched)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        csr = to_csr(linear.weight.detach(), index_dtype=index_dtype)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(csr, bias, backend=backend)

    @property
    def csr(self) -> CSRMatrix:
        """The CSRMatrix view of the buffers (rebuilt when a buffer was replaced, e.g. by ``.to()``)."""
        arrays = tuple(getattr(self, key) for key in _CSR_KEYS)
        cached = self._csr
        if cached is None or any(a is not getattr(cached, k) for a, k in zip(arrays, _CSR_KEYS)):
            cached = CSRMatrix(*arrays, shape=(self.out_features, self.in_features))
            self._csr = cached
        return cached

    @property
    def weight_dense(self) -> torch.Tensor:
        """The dense weight [out, in] (a new tensor)."""
        return self.csr.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        csr = self.csr
        if self.one_copy and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and x.dtype == csr.dtype:
            return self._forward_one_copy(x, csr)
        if self.cache_dense and getattr(csr, "dense_cache", None) is None and x.is_cuda:
            csr.dense_cache = densify(csr)
        return csr_linear(x, csr, self.bias, backend=self.backend)

    def _forward_one_copy(self, x: torch.Tensor, csr: CSRMatrix) -> torch.Tensor:
        """The rows kernel up to its token limit, else F.linear on a weight rebuilt for this call only."""
        if (x.shape[-1] != self.in_features or x.device != csr.device or self.backend not in (None, "auto", "cuda")
                or backend_reasons("cuda")):
            return csr_linear(x, csr, self.bias, backend=self.backend)  # its checks and backends as usual
        from ..ops.csr import cuda as csr_cuda  # importable: the CUDA backend is available

        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] > csr_cuda.MAX_TOKENS:
            return F.linear(x, densify(csr), self.bias)
        if x2.shape[0] == 0:
            return csr_linear(x, csr, self.bias, backend=self.backend)
        y = csr_cuda.csr_linear_rows(x2.contiguous(), csr, self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, index_dtype={self.col_indices.dtype}")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # the number of nonzeros is data, not architecture: take the loaded sizes
        for key in _CSR_KEYS + ("shape",):
            t = state_dict.get(prefix + key)
            if t is not None:
                setattr(self, key, torch.empty_like(t, device=getattr(self, key).device))
        shape = state_dict.get(prefix + "shape")
        if shape is not None:
            self.out_features, self.in_features = (int(v) for v in shape.tolist())
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        self._csr = None
        self.csr  # noqa: B018  (builds the CSRMatrix, which checks the loaded indices)
