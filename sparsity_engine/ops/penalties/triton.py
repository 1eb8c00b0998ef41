"""Fused Triton penalties: one pass forward (elementwise or a per-block partial sum), one pass backward.

Forward with a reduction reads c once and writes one partial sum per block (fp32; fp64 for fp64 c); the
partials (n / BLOCK of them) are summed by torch, which keeps the result deterministic (no atomics).
Backward reads c (and the elementwise grad_output for 'none') once and writes grad once. fp32/fp16/bf16 inputs use fp32 math,
float64 inputs float64 math (so gradcheck can run on the kernels themselves).
"""
from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ..._dispatch import register

_SMOOTH_L0, _LP = 0, 1
_BLOCK = 4096


@triton.jit
def _phi(x, a, b, c0, KIND: tl.constexpr):
    # smooth L0: a = gamma^2          -> x^2 / (x^2 + a)
    # L_p:       a = eps, b = p / 2   -> (x^2 + eps)^b - c0, c0 = eps^b
    x2 = x * x
    if KIND == 0:
        return x2 / (x2 + a)
    else:
        return tl.exp2(b * tl.log2(x2 + a)) - c0


@triton.jit
def _dphi(x, a, b, KIND: tl.constexpr):
    # smooth L0: 2 x a / (x^2 + a)^2, as (2 x / d)(a / d) so that d^2 cannot underflow for small gamma;
    # L_p: 2 b x (x^2 + eps)^(b - 1)
    x2 = x * x
    if KIND == 0:
        d = x2 + a
        return (2.0 * x / d) * (a / d)
    else:
        return 2.0 * b * x * tl.exp2((b - 1.0) * tl.log2(x2 + a))


@triton.jit
def _param(hi, lo, F64: tl.constexpr):
    # Triton passes Python floats as fp32: a float64 parameter arrives as hi + lo (both fp32), ~48 bits
    if F64:
        return tl.cast(hi, tl.float64) + tl.cast(lo, tl.float64)
    else:
        return hi


@triton.jit
def _fwd_kernel(c_ptr, out_ptr, n, a_hi, a_lo, b_hi, b_lo, c0_hi, c0_lo, KIND: tl.constexpr,
                REDUCE: tl.constexpr, F64: tl.constexpr, BLOCK: tl.constexpr):
    a = _param(a_hi, a_lo, F64)
    b = _param(b_hi, b_lo, F64)
    c0 = _param(c0_hi, c0_lo, F64)
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    if F64:
        x = tl.load(c_ptr + offs, mask=ok, other=0.0).to(tl.float64)
    else:
        x = tl.load(c_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    phi = _phi(x, a, b, c0, KIND)
    if REDUCE:
        tl.store(out_ptr + pid, tl.sum(tl.where(ok, phi, 0.0), axis=0))
    else:
        tl.store(out_ptr + offs, phi.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _bwd_kernel(c_ptr, g_ptr, grad_ptr, n, a_hi, a_lo, b_hi, b_lo, s_hi, s_lo, KIND: tl.constexpr,
                G_ELEMENTWISE: tl.constexpr, F64: tl.constexpr, BLOCK: tl.constexpr):
    a = _param(a_hi, a_lo, F64)
    b = _param(b_hi, b_lo, F64)
    scale = _param(s_hi, s_lo, F64)  # d(sum)/dc = 1, d(mean)/dc = 1/n
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    if F64:
        x = tl.load(c_ptr + offs, mask=ok, other=0.0).to(tl.float64)
    else:
        x = tl.load(c_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    if G_ELEMENTWISE:
        g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(x.dtype)
    else:
        g = tl.load(g_ptr).to(x.dtype) * scale
    grad = g * _dphi(x, a, b, KIND)
    tl.store(grad_ptr + offs, grad.to(grad_ptr.dtype.element_ty), mask=ok)


def _split(v: float) -> tuple:
    """v as fp32 hi + fp32 lo (no device tensor, so no host-to-device copy per call)."""
    hi = float(np.float32(v))
    return hi, float(np.float32(v - hi))


def _forward(c: torch.Tensor, kind: int, a: float, b: float, c0: float, reduction: str) -> torch.Tensor:
    n = c.numel()
    f64 = c.dtype == torch.float64
    grid = (triton.cdiv(n, _BLOCK),)
    args = (n, *_split(a), *_split(b), *_split(c0))
    if reduction == "none":
        out = torch.empty_like(c)
        if n:
            _fwd_kernel[grid](c, out, *args, KIND=kind, REDUCE=False, F64=f64, BLOCK=_BLOCK, num_warps=8)
        return out
    partials = torch.empty(grid[0], dtype=torch.float64 if f64 else torch.float32, device=c.device)
    if n:
        _fwd_kernel[grid](c, partials, *args, KIND=kind, REDUCE=True, F64=f64, BLOCK=_BLOCK, num_warps=8)
    total = partials.sum()
    return total / n if reduction == "mean" else total


def _backward(c: torch.Tensor, grad_out: torch.Tensor, kind: int, a: float, b: float,
              reduction: str) -> torch.Tensor:
    n = c.numel()
    grad = torch.empty_like(c)
    if n == 0:
        return grad
    elementwise = reduction == "none"
    g = grad_out.contiguous() if elementwise else grad_out.reshape(1)
    scale = 1.0 / n if reduction == "mean" else 1.0
    grid = (triton.cdiv(n, _BLOCK),)
    _bwd_kernel[grid](c, g, grad, n, *_split(a), *_split(b), *_split(scale), KIND=kind,
                      G_ELEMENTWISE=elementwise, F64=c.dtype == torch.float64, BLOCK=_BLOCK, num_warps=8)
    return grad


class _FusedPenalty(torch.autograd.Function):
    """phi summed / averaged / elementwise in one pass; grad = grad_out * phi'(c) in one pass."""

    @staticmethod
    def forward(ctx, c, kind, a, b, c0, reduction):
        c = c.contiguous()
        ctx.save_for_backward(c)
        ctx.params = (kind, a, b, reduction)
        return _forward(c, kind, a, b, c0, reduction)

    @staticmethod
    @once_differentiable  # the fused backward is not itself differentiable: say so instead of a wrong answer
    def backward(ctx, grad_out):
        (c,) = ctx.saved_tensors
        grad = _backward(c, grad_out, *ctx.params) if ctx.needs_input_grad[0] else None
        return (grad,) + (None,) * 5


_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@register("smooth_l0_penalty", "triton", dtypes=_DTYPES)
def smooth_l0_penalty(c: torch.Tensor, gamma: float, reduction: str) -> torch.Tensor:
    return _FusedPenalty.apply(c, _SMOOTH_L0, gamma * gamma, 0.0, 0.0, reduction)


@register("lp_penalty", "triton", dtypes=_DTYPES)
def lp_penalty(c: torch.Tensor, p: float, eps: float, reduction: str) -> torch.Tensor:
    b = 0.5 * p
    return _FusedPenalty.apply(c, _LP, eps, b, eps ** b, reduction)
