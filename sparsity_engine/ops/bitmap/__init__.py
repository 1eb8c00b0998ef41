"""Bitmap sparse linear layers: ``to_bitmap`` (dense/masked fp16/bf16 weight -> BitmapMatrix), ``bitmap_linear``
(x @ W^T + b) and the torch op ``torch.ops.sparsity_engine.bitmap_linear`` that layers call.

Backends: 'reference' (torch, exact: the dense weight rebuilt and F.linear; conversion by torch ops on any
device) and 'cuda' (csrc/bitmap.cu: a tensor-core kernel for any number of tokens, 8 / 16 / 32 per pass, and a
bitmap -> dense kernel). With ``backend=None`` on CUDA tensors, more than :data:`MAX_TOKENS` tokens run dense
cuBLAS on a dense weight rebuilt for the call (the sparse kernel's time grows with the tokens, a dense matmul's
hardly at all): see :data:`MAX_TOKENS`. Which format a layer gets (bitmap, CSR or dense) is
:func:`choose_format`.

The op ``sparsity_engine::bitmap_linear(x, masks, offsets, values, bias, out_features, in_features, max_group)``
is registered with torch.library with a fake (meta) implementation, so ``torch.compile(fullgraph=True)`` traces
through a layer that calls it and CUDA graphs capture it (it never synchronises with the host).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F

from ..._dispatch import backend_reasons, choose_cached, dispatch, import_backend, resolve_backend
from ..._validate import check_linear_input, check_tensor
from .format import DTYPES, BitmapMatrix, validate_bitmap
from . import reference  # noqa: F401  (registers the oracle)

import_backend(__name__, "cuda")

__all__ = ["BitmapMatrix", "to_bitmap", "bitmap_linear", "densify", "choose_format", "linear_arrays",
           "FORMAT_RULE", "MAX_TOKENS", "OP"]

#: The dispatch rule: when does the bitmap kernel run, and when dense cuBLAS on a weight rebuilt for the call?
#: The kernel decodes every 16 x 16 tile once per 32 tokens, so its time grows with the tokens while a dense
#: matmul's hardly does: measured (benchmarks/bench_bitmap.py, ours_us; BENCHMARKS.md, "Bitmap linear") it falls
#: far below dense cuBLAS at 64 tokens, where rebuilding the dense weight (one pass writing it) plus F.linear is
#: the cheaper path; up to 32 tokens (one pass of the kernel) the kernel is kept. bench_bitmap.py's rebuild_us
#: column is the comparison this bound is checked against.
MAX_TOKENS = 32

#: Which format a pruned fp16/bf16 layer is stored in, by its sparsity (fraction of exact zeros), for decode
#: (batch 1), from benchmarks/bench_bitmap.py at the LLaMA-7B and 70B shapes (dense_us, ours_us, csr_us at batch
#: 1; BENCHMARKS.md, "Bitmap linear"): below ``bitmap`` dense cuBLAS is at least as fast as both sparse kernels
#: (the layer stays nn.Linear); from ``bitmap`` the bitmap kernel is about as fast as dense with 0.57x its bytes
#: and faster than CSR; from ``csr`` on, the CSR rows kernel (4 bytes per nonzero, work per nonzero) is faster at
#: batch 1 than the bitmap kernel, whose decode work per weight is fixed (1/8 byte and a bit test per weight). At
#: 8-16 tokens the bitmap kernel stays faster than CSR's rows kernel there: ``sparsify_linears_(format='bitmap')``
#: for small-batch serving. fp32 layers have no bitmap kernel: they take CSR as before.
FORMAT_RULE: Dict[str, float] = {"bitmap": 0.5, "csr": 0.6}


def choose_format(dtype: torch.dtype, sparsity: float) -> str:
    """'bitmap', 'csr' or 'dense' for a layer of this dtype and sparsity (see :data:`FORMAT_RULE`)."""
    if dtype not in DTYPES:
        return "csr"
    if sparsity >= FORMAT_RULE["csr"]:
        return "csr"
    if sparsity >= FORMAT_RULE["bitmap"]:
        return "bitmap"
    return "dense"


def to_bitmap(weight: torch.Tensor, *, backend: Optional[str] = None) -> BitmapMatrix:
    """Convert a dense (or masked: pruned entries exactly 0) fp16/bf16 weight [N, K] to a :class:`BitmapMatrix`.

    Exact zeros are dropped; values keep the weight's dtype. Runs on the weight's device (torch ops; a GPU
    converts a 7B model's layers in seconds). The weight must be finite (read once to check).
    """
    check_tensor("weight", weight, ndim=2, dtypes=DTYPES, finite=True)
    return dispatch("to_bitmap", backend, weight.detach())


def densify(bm: BitmapMatrix) -> torch.Tensor:
    """The dense weight [N, K]: one kernel on CUDA (where the extension loads), else torch ops."""
    if bm.values.is_cuda and not backend_reasons("cuda"):
        from .cuda import to_dense
        return to_dense(bm)
    return bm.to_dense()


def _check_linear_args(x, bm, bias) -> None:
    validate_bitmap(bm)
    check_linear_input(x, bm.shape, bm.dtype, bm.device, bias, "bitmap")


def bitmap_linear(x: torch.Tensor, bm: BitmapMatrix, bias: Optional[torch.Tensor] = None, *,
                  backend: Optional[str] = None) -> torch.Tensor:
    """``y = x @ W^T + bias`` with W [N, K] given as a BitmapMatrix; x [..., K] -> y [..., N] in x's dtype.

    x must have the weight's dtype and device (as nn.Linear requires). The kernels accumulate in fp32.
    ``backend=None`` on CUDA tensors: the CUDA kernel up to MAX_TOKENS tokens, dense F.linear on a rebuilt
    weight above; a named backend always runs that backend.
    """
    _check_linear_args(x, bm, bias)
    n, k = bm.shape

    def compute(x2: torch.Tensor) -> torch.Tensor:
        impl = choose_cached("bitmap_linear", backend, (x2.device, x2.dtype, bias is not None), x2, bm, bias)
        if resolve_backend(backend) is None and impl.backend == "cuda" and x2.shape[0] > MAX_TOKENS:
            return F.linear(x2, densify(bm), bias)
        return impl.fn(x2, bm, bias)

    return _apply(x, n, k, bias, compute)


def _apply(x: torch.Tensor, n: int, k: int, bias: Optional[torch.Tensor], compute) -> torch.Tensor:
    """x [..., k] -> ``compute(x2)`` on x2 [T, k] (contiguous, T >= 1) -> [..., n]; zeros (+ bias) when empty."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    if x2.shape[0] == 0 or n == 0 or k == 0:
        y = torch.zeros(x2.shape[0], n, dtype=x2.dtype, device=x2.device)
        if bias is not None:
            y += bias
    else:
        y = compute(x2)
    return y.reshape(*lead, n)


# ---------------------------------------------------------------------------------------------- the torch op
def linear_arrays(x: torch.Tensor, masks: torch.Tensor, offsets: torch.Tensor, values: torch.Tensor,
                  bias: Optional[torch.Tensor], n: int, k: int, max_group: int) -> torch.Tensor:
    """What the op computes, on the format's arrays (validated when they were built; x checked by the caller):
    CUDA -> the kernel (dense F.linear on a rebuilt weight above MAX_TOKENS tokens), CPU -> the reference."""
    def compute(x2: torch.Tensor) -> torch.Tensor:
        if not x2.is_cuda:
            nnz = int(offsets[-1])
            return F.linear(x2, BitmapMatrix(masks, offsets, values, (n, k), nnz, max_group).to_dense(), bias)
        cuda = _cuda_module()
        if x2.shape[0] > MAX_TOKENS:
            return F.linear(x2, cuda.dense_from_arrays(masks, offsets, values, n, k), bias)
        return cuda.linear(x2, masks, offsets, values, bias, n, k, max_group)

    return _apply(x, n, k, bias, compute)


_CUDA = []


def _cuda_module():
    """The cuda backend module, imported once (an import statement per call costs host time)."""
    if not _CUDA:
        from . import cuda
        _CUDA.append(cuda)
    return _CUDA[0]


def _define_op():
    """torch.ops.sparsity_engine.bitmap_linear (None on a torch without torch.library.custom_op, < 2.4)."""
    custom_op = getattr(torch.library, "custom_op", None)
    if custom_op is None:
        return None

    @custom_op("sparsity_engine::bitmap_linear", mutates_args=())
    def bitmap_linear_op(x: torch.Tensor, masks: torch.Tensor, offsets: torch.Tensor, values: torch.Tensor,
                         bias: Optional[torch.Tensor], out_features: int, in_features: int,
                         max_group: int) -> torch.Tensor:
        return linear_arrays(x, masks, offsets, values, bias, out_features, in_features, max_group)

    @bitmap_linear_op.register_fake
    def _(x, masks, offsets, values, bias, out_features, in_features, max_group):
        return x.new_empty(*x.shape[:-1], out_features)

    return bitmap_linear_op


#: The registered op (``torch.ops.sparsity_engine.bitmap_linear``), or None where torch has no custom_op.
OP = _define_op()

