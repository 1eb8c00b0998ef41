"""Plain-torch oracle for Hessian accumulation: SparseGPT's ``add_batch`` as one fp32 GEMM update.

This is also the "fp32 add_batch path" the kernels are benchmarked against: it upcasts the activations to
float32 (one fp32 copy of X) and runs one cuBLAS fp32 GEMM with TF32 switched off.
"""
from __future__ import annotations

import contextlib

import torch

from ..._dispatch import register


@contextlib.contextmanager
def ieee_fp32_matmul():
    """Run fp32 matmuls in full fp32 on CUDA (TF32 off) even if the user switched TF32 on globally.

    The Hessian is an average of many outer products; TF32 (10-bit mantissa inputs) would change it at the
    1e-3 level, which the SparseGPT solve then amplifies.
    """
    matmul = torch.backends.cuda.matmul
    try:
        was_on = bool(matmul.allow_tf32)
    except (AttributeError, RuntimeError):  # a torch without the legacy switch: nothing to undo
        was_on = False
    if was_on:
        matmul.allow_tf32 = False
    try:
        yield
    finally:
        if was_on:
            matmul.allow_tf32 = True


@register("accumulate_hessian", "reference")
def accumulate_hessian(H: torch.Tensor, x: torch.Tensor, nsamples: int) -> int:
    """H <- H * n/(n+b) + (2/(n+b)) * X^T X in place; returns n + b.

    H: float32 [C, C]. x: [b, T, C] (any float dtype, any strides), b >= 1 batch rows of T tokens each;
    X = x.reshape(b*T, C) in float32. n = ``nsamples`` >= 0; with n == 0 the old H is ignored (addmm's
    beta = 0 never reads it), so a fresh buffer needs no zeroing.
    """
    b = x.shape[0]
    total = nsamples + b
    X = x.reshape(-1, x.shape[-1]).float()
    with torch.no_grad(), ieee_fp32_matmul():
        H.addmm_(X.t(), X, beta=nsamples / total, alpha=2.0 / total)
    return total
