"""Plain-torch penalties (the oracle): autograd through ordinary torch ops.

Math in float32 for fp32/fp16/bf16 inputs (float64 stays float64). Reductions ('sum', 'mean') return a
0-D tensor in that compute dtype; 'none' returns the elementwise penalty in c's dtype.
"""
from __future__ import annotations

import torch

from ..._dispatch import register


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def reduce(phi: torch.Tensor, reduction: str, out_dtype: torch.dtype) -> torch.Tensor:
    if reduction == "sum":
        return phi.sum()
    if reduction == "mean":
        return phi.mean() if phi.numel() else phi.sum() * float("nan")
    return phi.to(out_dtype)


@register("smooth_l0_penalty", "reference")
def smooth_l0_penalty(c: torch.Tensor, gamma: float, reduction: str) -> torch.Tensor:
    """Geman-McClure phi(c) = c^2 / (c^2 + gamma^2), then the reduction."""
    x = c.to(compute_dtype(c.dtype))
    x2 = x * x
    return reduce(x2 / (x2 + gamma * gamma), reduction, c.dtype)


@register("lp_penalty", "reference")
def lp_penalty(c: torch.Tensor, p: float, eps: float, reduction: str) -> torch.Tensor:
    """phi(c) = (c^2 + eps)^(p/2) - eps^(p/2), then the reduction."""
    x = c.to(compute_dtype(c.dtype))
    return reduce(torch.pow(x * x + eps, 0.5 * p) - eps ** (0.5 * p), reduction, c.dtype)
