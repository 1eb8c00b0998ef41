"""Sparsity penalties for training: smooth L0 (Geman-McClure), smoothed L_p, and annealing schedules.

Both penalties are differentiable functions of a tensor ``c`` (weights, gates, task-vector coefficients),
reduced to a scalar loss ('sum' | 'mean') or returned elementwise ('none'). The Triton backend fuses the
forward (one read of c) and the backward (one read of c, one write of grad) in a torch.autograd.Function.

* ``smooth_l0_penalty``: phi(c) = c^2 / (c^2 + gamma^2). phi(0) = 0, phi -> 1 as |c| >> gamma, so the sum
  counts the entries that are large compared to gamma (a smooth L0 "norm"). phi'(c) = 2 c gamma^2 /
  (c^2 + gamma^2)^2: zero at c = 0 (no pull on entries already at zero) and bounded; its maximum,
  at |c| = gamma / sqrt(3), is 3 sqrt(3) / (8 gamma) ~= 0.6495 / gamma.
* ``lp_penalty``: phi(c) = (c^2 + eps)^(p/2) - eps^(p/2), a smooth L_p (0 < p <= 2): phi(0) = 0, phi(c) ->
  |c|^p for |c| >> sqrt(eps), exactly c^2 at p = 2. phi'(c) = p c (c^2 + eps)^(p/2 - 1) is finite
  everywhere (0 at c = 0; at most about p eps^((p-1)/2) for p < 1), where |c|^p's p |c|^(p-1) blows up.
* ``anneal_schedule``: gamma or p from ``start`` to ``end`` over ``total_steps`` (linear, cosine,
  exponential), e.g. shrinking gamma so smooth L0 approaches the true L0 count during training.

Math is float32 for fp32/fp16/bf16 inputs (float64 for float64). Reductions return a 0-D tensor in that
dtype; 'none' returns c's dtype and shape; the gradient has c's dtype.
"""
from __future__ import annotations

import math

import torch

from ..._dispatch import dispatch, import_backend
from ..._validate import (ALL_FLOAT_DTYPES, check_choice, check_finite, check_fraction, check_int, check_tensor,
                          is_real_number)
from . import reference  # noqa: F401  (registers the oracle)

import_backend(__name__, "triton")

REDUCTIONS = ("sum", "mean", "none")
SCHEDULES = ("linear", "cosine", "exponential")


# In float32 math a value below 1.2e-38 is flushed to zero on GPUs: eps must stay above that (else 0 * inf at
# c = 0), and so must gamma^4, which autograd's division backward forms in the reference.
MIN_GAMMA, MIN_EPS = 1e-9, 1e-30


def _check_real(name: str, value, *, positive: bool = False, minimum: float = None) -> float:
    if not is_real_number(value):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if positive and v <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    if minimum is not None and v < minimum:
        raise ValueError(f"{name} must be >= {minimum:g} (smaller values underflow in float32 math), got {value!r}")
    return v


def _check_c(c, reduction) -> None:
    check_tensor("c", c, dtypes=ALL_FLOAT_DTYPES)
    check_choice("reduction", reduction, REDUCTIONS)
    if reduction == "mean" and c.numel() == 0:
        raise ValueError("c is empty: reduction='mean' of no elements is undefined (use 'sum', which gives 0)")


def _checked(result: torch.Tensor, what: str) -> torch.Tensor:
    # A NaN/Inf in c (or an overflow) shows up in the result: checking it costs no extra pass over c for
    # the reductions (one sync), and one read of the output for 'none'.
    if result.dim() == 0:
        if not math.isfinite(result.item()):
            raise ValueError(f"c contains NaN/Inf (or {what} overflowed): the penalty is {result.item()}; "
                             "c must be finite")
    else:
        try:
            check_finite("the elementwise penalty of c", result.detach())
        except ValueError as exc:
            raise ValueError(f"{exc} (c holds NaN/Inf, or {what} overflowed); c must be finite") from None
    return result


def smooth_l0_penalty(c: torch.Tensor, gamma: float, *, reduction: str = "sum",
                      backend: str = None) -> torch.Tensor:
    """Geman-McClure smooth L0: sum / mean / elementwise of c^2 / (c^2 + gamma^2).

    c: any shape, fp32/fp16/bf16/fp64 (differentiable). gamma >= 1e-9: the scale below which entries count
    as zero (with fp16 c, gradients above 65504, i.e. gamma below ~1e-5, overflow fp16: use bf16 or fp32).
    Returns a 0-D tensor (float32, or float64 for float64 c) for 'sum' / 'mean', else a tensor like c.
    Gradient 2 c gamma^2 / (c^2 + gamma^2)^2, at most 3 sqrt(3) / (8 gamma) (at |c| = gamma / sqrt(3)).
    """
    _check_c(c, reduction)
    gamma = _check_real("gamma", gamma, positive=True, minimum=MIN_GAMMA)
    return _checked(dispatch("smooth_l0_penalty", backend, c, gamma, reduction), "the smooth L0 penalty")


def lp_penalty(c: torch.Tensor, p: float, *, eps: float = 1e-8, reduction: str = "sum",
               backend: str = None) -> torch.Tensor:
    """Smoothed L_p: sum / mean / elementwise of (c^2 + eps)^(p/2) - eps^(p/2), 0 < p <= 2.

    Equals |c|^p up to O(eps) terms for |c| >> sqrt(eps), and 0 at c = 0; eps >= 1e-30 keeps the gradient
    p c (c^2 + eps)^(p/2 - 1) finite at c = 0. Shapes and dtypes as :func:`smooth_l0_penalty`.
    """
    _check_c(c, reduction)
    p = check_fraction("p", _check_real("p", p), low=0.0, high=2.0, low_inclusive=False)
    eps = _check_real("eps", eps, positive=True, minimum=MIN_EPS)
    return _checked(dispatch("lp_penalty", backend, c, p, eps, reduction), "the L_p penalty")


def anneal_schedule(step: int, total_steps: int, start: float, end: float, *, kind: str = "linear") -> float:
    """Value of an annealed parameter (gamma, p, a penalty weight) at ``step`` of ``total_steps``.

    t = min(step, total_steps) / total_steps (steps past the end hold ``end``):
    linear: start + (end - start) t; cosine: end + (start - end) (1 + cos(pi t)) / 2;
    exponential (geometric): start (end / start)^t, which needs start and end of the same sign, nonzero.
    Returns ``start`` at step 0 and ``end`` at step total_steps, as a Python float.
    """
    step = check_int("step", step, minimum=0)
    total_steps = check_int("total_steps", total_steps, minimum=1)
    start = _check_real("start", start)
    end = _check_real("end", end)
    check_choice("kind", kind, SCHEDULES)
    if step >= total_steps:
        return end
    t = step / total_steps
    if kind == "linear":
        return start + (end - start) * t
    if kind == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t))
    if start == 0 or end == 0 or (start > 0) != (end > 0):
        raise ValueError(f"kind='exponential' needs start and end nonzero and of the same sign, got "
                         f"start={start!r}, end={end!r}")
    return start * (end / start) ** t


__all__ = ["smooth_l0_penalty", "lp_penalty", "anneal_schedule", "REDUCTIONS", "SCHEDULES"]
