"""CSR sparse linear layers: ``to_csr`` (dense/masked weight -> CSRMatrix) and ``csr_linear`` (x @ W^T + b).

Backends: 'reference' (torch, exact: the dense weight rebuilt and F.linear), 'cuda' (two kernels, see
ops/csr/cuda.py: csrc/csr.cu, a warp-per-row SpMV / small-batch SpMM for 1..16 tokens, the decode case, and
csrc/csr_tiles.cu, a tensor-core SpMM for fp16/bf16 that takes over from a few tokens on), 'triton' (an SpMM
for any number of tokens and dtype; what serves fp32 above 16 tokens). With ``backend=None`` on CUDA tensors,
:func:`csr_linear` also decides whether the sparse kernels can win at all, and otherwise runs dense cuBLAS
(``F.linear``) on the rebuilt weight: see :data:`DISPATCH_RULE` and :func:`prefer_dense`.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..._dispatch import choose_cached, dispatch, import_backend, resolve_backend
from ..._validate import FLOAT_DTYPES, check_linear_input, check_tensor
from .format import ALIGN, CSRMatrix, validate_csr
from .tiles import tiles_apply
from . import reference  # noqa: F401  (registers the oracle)

import_backend(__name__, "triton")
import_backend(__name__, "cuda")

__all__ = ["CSRMatrix", "to_csr", "csr_linear", "prefer_dense", "DISPATCH_RULE", "REBUILD_MAX_TOKENS", "DENSE_ENV_VAR",
           "ALIGN", "densify"]

#: When is dense cuBLAS faster than our sparse kernels? From benchmarks/bench_csr.py's dense F.linear time / the
#: CUDA backend's time (bf16/fp16, 4096x4096 .. 28672x8192, L2 flushed; the measured table is in BENCHMARKS.md,
#: CSR linear): with a dense weight at hand the sparse path is taken at most at the density (nnz / (N*K)) below,
#: the point where the slowest shape's ratio crosses 1.
DISPATCH_RULE: Tuple[Tuple[int, float], ...] = (
    # (max tokens, max density for the sparse path); more tokens than the last entry: always dense
    (1, 0.40),
    (2, 0.32),
    (4, 0.22),
    (8, 0.15),
    (16, 0.09),
)
#: The rule compares against a dense weight that is AT HAND (``csr.dense_cache``, e.g. from
#: ``CSRLinear(cache_dense=True)``). Without one, the fallback must first rebuild the dense weight, which
#: costs 3x-5x a dense matmul, so the sparse kernels are kept up to ``REBUILD_MAX_TOKENS`` tokens when the
#: tensor-core tiles kernel serves them (fp16/bf16, in_features % 8 == 0; at 64 tokens it takes 0.4x-0.5x the
#: time of rebuild + F.linear, at 256 tokens 1.1x-1.5x), else up to 16 (the Triton SpMM above that is far
#: slower than rebuild + F.linear). Override per call with ``dense_fallback=`` or globally with the
#: environment variable SPARSITY_ENGINE_CSR_DENSE = 'auto' | 'never' | 'always'.
REBUILD_MAX_TOKENS = 128
DENSE_ENV_VAR = "SPARSITY_ENGINE_CSR_DENSE"


def to_csr(weight: torch.Tensor, *, index_dtype: Optional[torch.dtype] = None,
           backend: Optional[str] = None) -> CSRMatrix:
    """Convert a dense (or masked: pruned entries set to 0) weight [N, K] to a :class:`CSRMatrix`.

    Exact zeros are dropped; values keep the weight's dtype (fp32/fp16/bf16). ``index_dtype`` defaults to
    int16 when K <= 32767, else int32; asking for int16 with a larger K is a ValueError. The weight must be
    finite (it is read once to check).
    """
    check_tensor("weight", weight, ndim=2, dtypes=FLOAT_DTYPES, finite=True)
    k = weight.shape[1]
    if index_dtype is None:
        index_dtype = torch.int16 if k <= 32767 else torch.int32
    if index_dtype not in (torch.int16, torch.int32):
        raise TypeError(f"index_dtype must be torch.int16 or torch.int32, got {index_dtype}")
    if index_dtype == torch.int16 and k > 32767:
        raise ValueError(f"index_dtype int16 holds column indices up to 32767; weight has {k} columns")
    csr = dispatch("to_csr", backend, weight.detach(), index_dtype)
    csr.nnz  # noqa: B018  (computed once here, so the dispatch rule never syncs)
    return csr


def densify(csr: CSRMatrix, *, backend: Optional[str] = None) -> torch.Tensor:
    """The dense weight [N, K] (exact): one Triton scatter pass on CUDA where Triton runs, else torch."""
    validate_csr(csr)
    return dispatch("csr_to_dense", backend, csr)


def prefer_dense(tokens: int, density: float, dense_fallback: Optional[bool] = None, *,
                 dense_at_hand: bool = True, tiles_kernel: bool = True) -> bool:
    """Whether ``csr_linear`` (backend=None, CUDA) runs dense F.linear instead of a sparse kernel.

    ``dense_at_hand``: a dense copy of the weight exists (else it must be rebuilt first; see DISPATCH_RULE).
    ``tiles_kernel``: the tensor-core tiles kernel can take these inputs (it serves more than 16 tokens).
    """
    if dense_fallback is not None:
        return bool(dense_fallback)
    mode = os.environ.get(DENSE_ENV_VAR, "auto").strip().lower()
    if mode == "never":
        return False
    if mode == "always":
        return True
    if mode not in ("", "auto"):
        raise ValueError(f"{DENSE_ENV_VAR} must be 'auto', 'never' or 'always', got {mode!r}")
    if not dense_at_hand:
        return tokens > (REBUILD_MAX_TOKENS if tiles_kernel else DISPATCH_RULE[-1][0])
    for max_tokens, max_density in DISPATCH_RULE:
        if tokens <= max_tokens:
            return density > max_density
    return True


def _check_linear_args(x, csr, bias) -> None:
    validate_csr(csr)
    check_linear_input(x, csr.shape, csr.dtype, csr.device, bias, "CSR")


def _impl_for(backend, x2, csr, bias):
    """The registered implementation for these inputs, remembered by what its choice depends on (device,
    dtypes, the rows kernel's token limit, the tiles kernel's K % 8 rule, bias): csr_linear runs per token."""
    key = (x2.device, x2.dtype, csr.col_indices.dtype, x2.shape[0] <= 16, csr.shape[1] % 8 == 0, bias is not None)
    return choose_cached("csr_linear", backend, key, x2, csr, bias)


def csr_linear(x: torch.Tensor, csr: CSRMatrix, bias: Optional[torch.Tensor] = None, *,
               backend: Optional[str] = None, dense_fallback: Optional[bool] = None) -> torch.Tensor:
    """``y = x @ W^T + bias`` with W [N, K] given as a CSRMatrix; x [..., K] -> y [..., N] in x's dtype.

    x must have the weight's dtype and device (as nn.Linear requires). The kernels accumulate in fp32.
    ``backend=None`` on CUDA tensors: dense F.linear when :func:`prefer_dense` says sparse cannot win
    (``dense_fallback=True/False`` forces it), else the best sparse kernel. A named backend always runs
    that backend's sparse path.
    """
    _check_linear_args(x, csr, bias)
    n, k = csr.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    tokens = x2.shape[0]
    if tokens == 0 or n == 0 or k == 0:
        out = torch.zeros(tokens, n, dtype=x.dtype, device=x.device)
        if bias is not None:
            out += bias
        return out.reshape(*lead, n)
    impl = _impl_for(backend, x2, csr, bias)
    if resolve_backend(backend) is None and x.is_cuda:
        dense = getattr(csr, "dense_cache", None)
        tiles = impl.backend == "cuda" and tiles_apply(x2, csr)
        if prefer_dense(tokens, csr.density, dense_fallback, dense_at_hand=dense is not None, tiles_kernel=tiles):
            return F.linear(x2, dense if dense is not None else densify(csr), bias).reshape(*lead, n)
    out = impl.fn(x2, csr, bias)
    return out.reshape(*lead, n)

