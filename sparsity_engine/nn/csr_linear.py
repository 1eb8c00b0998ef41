"""CSRLinear: an inference nn.Linear whose pruned weight is stored as CSR and run by the CSR kernels."""
from __future__ import annotations

import fnmatch
import re
from typing import Iterable, List, Optional, Sequence, Union

import torch
from torch import nn

from .._validate import FLOAT_DTYPES, check_fraction, check_tensor
from ..ops.csr import CSRMatrix, csr_linear, densify, to_csr
from ..ops.csr.format import _KEYS as _CSR_KEYS

Patterns = Union[None, str, Sequence[str]]


class CSRLinear(nn.Module):
    """``y = x @ W^T + b`` with W [out_features, in_features] held as a :class:`CSRMatrix` (inference only).

    x: [..., in_features] in the weight's dtype -> y [..., out_features]. The CSR arrays are buffers
    (``crow_indices``, ``col_indices``, ``values``, ``row_lengths``, ``row_order``, ``shape``) and ``bias`` a
    frozen parameter, so ``.to()``, ``state_dict()`` and ``load_state_dict()`` work (a loaded state dict may
    hold a different number of nonzeros: the buffers take the loaded sizes). ``backend`` is passed to
    :func:`csr_linear`; ``cache_dense=True`` keeps the rebuilt dense weight when csr_linear falls back to
    dense (large batches), trading memory for not rebuilding it on every call. The first call that the CUDA
    tensor-core kernel serves (fp16/bf16, several tokens: ``ops/csr/cuda.py: use_tiles``) also keeps a second
    copy of the weight in that kernel's tile layout (4 bytes per nonzero, like the CSR arrays; not saved).
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
        if self.cache_dense and getattr(csr, "dense_cache", None) is None and x.is_cuda:
            csr.dense_cache = densify(csr)
        return csr_linear(x, csr, self.bias, backend=self.backend)

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


def _matches(name: str, patterns: Patterns) -> bool:
    if isinstance(patterns, str):
        patterns = [patterns]
    for pat in patterns:
        if not isinstance(pat, str):
            raise TypeError(f"include/exclude patterns must be strings, got {type(pat).__name__}")
        if pat.startswith("re:"):
            if re.search(pat[3:], name):
                return True
        elif fnmatch.fnmatchcase(name, pat):
            return True
    return False


def _shared_weights(model: nn.Module) -> set:
    """ids of parameters that more than one module uses (tied embeddings, say)."""
    seen, shared = set(), set()
    for _, p in model.named_parameters(remove_duplicate=False):
        (shared if id(p) in seen else seen).add(id(p))
    return shared


def sparsify_linears_(model: nn.Module, *, min_sparsity: float = 0.3, include: Patterns = None,
                      exclude: Patterns = None, index_dtype: Optional[torch.dtype] = None,
                      backend: Optional[str] = None) -> List[str]:
    """Replace, in place, every pruned ``nn.Linear`` of ``model`` by a :class:`CSRLinear`; return their names.

    A Linear is converted when the fraction of exact zeros in its weight is >= ``min_sparsity``, its name
    (as in ``model.named_modules()``, e.g. ``encoder.layer.0.attention.self.query``) matches ``include``
    (default: every name) and does not match ``exclude``. Patterns: a string or a list of strings; each is a
    shell glob matched against the whole name (``"*.query"``, ``"encoder.layer.[0-3].*"``), or a regular
    expression searched in the name when prefixed with ``re:`` (``"re:attention\\.(query|key)$"``). A
    Linear whose weight is shared with another module (tied weights) is left alone: converting it would
    untie it. Outputs are unchanged up to the kernels' fp32-accumulation rounding.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    min_sparsity = check_fraction("min_sparsity", min_sparsity)
    shared = _shared_weights(model)
    targets = []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or not name:
            continue
        if include is not None and not _matches(name, include):
            continue
        if exclude is not None and _matches(name, exclude):
            continue
        if id(module.weight) in shared or module.weight.dtype not in FLOAT_DTYPES:
            continue
        w = module.weight.detach()
        zeros = (w == 0).sum().item() / max(1, w.numel())
        if zeros >= min_sparsity and w.numel():
            targets.append(name)
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, CSRLinear.from_linear(getattr(parent, child), index_dtype=index_dtype,
                                                     backend=backend))
    return targets


