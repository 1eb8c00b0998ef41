"""Mask selection ops: N:M, top-k, magnitude, DARE, DELLA.

Each public function validates its arguments, then dispatches to a backend (reference | triton | cuda).
Semantics follow mergekit's ``sparsify`` (magnitude, random = DARE, della_magprune); where mergekit would
fail (an assert, a NaN) these ops raise a clear error or take the documented robust path instead.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch

from ..._dispatch import choose, dispatch, import_backend
from ..._validate import (ALL_FLOAT_DTYPES, FLOAT_DTYPES, check_choice, check_finite, check_fraction,
                          check_generator, check_int, check_nm, check_tensor)
from . import reference  # noqa: F401  (registers the oracle)
from .reference import RESCALE_NORMS

import_backend(__name__, "triton")
import_backend(__name__, "cuda")


def nm_mask(scores: torch.Tensor, n: int, m: int, *, backend: str = None) -> torch.Tensor:
    """Boolean keep-mask of the ``n`` largest of every ``m`` consecutive entries along the last dim.

    scores: [..., k] float (fp32/fp16/bf16), finite, k divisible by m. Returns bool of the same shape with
    exactly n True per group. Ties go to the lower index (a stable descending order), on every backend.
    """
    check_tensor("scores", scores, min_ndim=1, dtypes=FLOAT_DTYPES, finite=True)
    n, m = check_nm(n, m, scores.shape[-1] if scores.dim() else 0)
    return dispatch("nm_mask", backend, scores, n, m)


def _check_dim(dim, t: torch.Tensor) -> Optional[int]:
    if dim is None:
        return None
    if t.dim() == 0:
        raise ValueError("dim must be None for a 0-D scores tensor")
    return check_int("dim", dim, minimum=-t.dim(), maximum=t.dim() - 1) % t.dim()


def topk_mask(scores: torch.Tensor, density: float, *, dim: Optional[int] = None,
              backend: str = None) -> torch.Tensor:
    """Boolean keep-mask of exactly k = int(density * n) largest ``scores``.

    dim None: n = scores.numel(), one selection over the whole tensor; else one selection per slice along
    ``dim`` (n = scores.shape[dim]). Ties go to the lower index (flat index, or index along ``dim``), so the
    mask is deterministic on every backend; -0.0 equals +0.0. scores: any shape, finite float.
    """
    check_tensor("scores", scores, dtypes=ALL_FLOAT_DTYPES)
    density = check_fraction("density", density)
    dim = _check_dim(dim, scores)
    n = scores.numel() if dim is None else scores.shape[dim]
    return _dispatch_finite("topk_mask", backend, "scores", scores, int(density * n), dim)


def _dispatch_finite(op: str, backend, name: str, t: torch.Tensor, *args):
    """dispatch, with ``t`` checked for NaN/Inf here unless the chosen backend checks it during its own pass."""
    impl = choose(op, backend, t, *args)
    if not getattr(impl.fn, "validates_finite", False):
        check_finite(name, t)
    return impl.fn(t, *args)


def _check_norm(rescale_norm):
    norm = getattr(rescale_norm, "value", rescale_norm)  # accepts mergekit's RescaleNorm (a str Enum)
    check_choice("rescale_norm", norm, RESCALE_NORMS)
    return norm


def magnitude_prune(t: torch.Tensor, density: float, *, rescale_norm: Optional[str] = None,
                    backend: str = None) -> torch.Tensor:
    """mergekit ``magnitude``: keep the k = int(density * t.numel()) largest |t|, zero the rest.

    Ties at the threshold go to the lower flat index. ``rescale_norm`` ('l1' | 'l2' | 'linf' | None) then
    scales the kept entries so that the norm of the result equals the norm of ``t`` (mergekit's
    rescaled_masked_tensor). density >= 1 returns a copy of ``t`` (never ``t`` itself). Raises ValueError
    when k == 0 (mergekit asserts). Returns a tensor of t's shape, dtype and device.
    """
    check_tensor("t", t, dtypes=ALL_FLOAT_DTYPES)
    density = check_fraction("density", density)
    norm = _check_norm(rescale_norm)
    if density >= 1:
        check_finite("t", t)
        return t.clone()
    k = int(density * t.numel())
    if k <= 0:
        raise ValueError(f"density={density} keeps int(density * numel) = 0 of the {t.numel()} entries of t; "
                         "choose a larger density (mergekit refuses this case too)")
    return _dispatch_finite("magnitude_prune", backend, "t", t, k, norm)


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def dare(t: torch.Tensor, density: float, *, rescale: bool = True, generator: Optional[torch.Generator] = None,
         backend: str = None) -> torch.Tensor:
    """DARE (mergekit ``bernoulli``): keep each entry independently with probability ``density``; with
    ``rescale`` the kept entries are divided by density, so E[result] = t.

    density >= 1 returns a copy of t, density == 0 zeros. ``generator`` (on t's device type) makes the draw
    reproducible: the reference draws with torch.bernoulli, the kernels seed their counter-based generator
    from it (same generator state -> same result; the two backends give different but equally distributed
    draws). Returns t's shape and dtype.
    """
    check_tensor("t", t, dtypes=ALL_FLOAT_DTYPES, finite=True)
    density = check_fraction("density", density)
    rescale = _check_bool("rescale", rescale)
    check_generator("generator", generator, t.device)
    if density >= 1:
        return t.clone()
    if density <= 0:
        return torch.zeros_like(t)
    return dispatch("dare", backend, t, density, rescale, generator)


def _della_epsilon(density: float, epsilon: float) -> float:
    """Shrink epsilon so that [density - epsilon, density + epsilon] stays inside [0, 1], with a warning."""
    limit = min(density, 1.0 - density)
    if epsilon > limit:
        warnings.warn(f"della_magprune: epsilon={epsilon} puts density +/- epsilon outside [0, 1] for "
                      f"density={density}; using epsilon={limit}", RuntimeWarning, stacklevel=3)
        return limit
    return epsilon


def della_magprune(t: torch.Tensor, density: float, epsilon: float, *, rescale_norm: Optional[str] = None,
                   generator: Optional[torch.Generator] = None, backend: str = None) -> torch.Tensor:
    """DELLA MagPrune: per row (the last dim; a 1-D tensor is one row) entry i is kept with probability

        p_i = clamp(density - epsilon + 2 * epsilon * r_i / (n - 1), 0, 1)

    where r_i is the 0-based rank of |t_i| in its row (ties share their mean rank; one column: r/(n-1) = 1/2),
    so p rises linearly from density - epsilon (smallest) to density + epsilon (largest). Kept entries are
    then rescaled as ``rescale_norm`` asks (mergekit's rescaled_masked_tensor; no 1/p factor, as mergekit).
    An epsilon larger than min(density, 1 - density) is shrunk to it with a RuntimeWarning (mergekit raises).
    density >= 1 returns a copy, density == 0 zeros. Never NaN (constant rows, single columns included).
    Note: mergekit ranks along dim 1 for tensors of 3 or more dims; this op ranks along the last dim.
    """
    check_tensor("t", t, dtypes=ALL_FLOAT_DTYPES, finite=True)
    density = check_fraction("density", density)
    epsilon = check_fraction("epsilon", epsilon, high=float("inf"))
    norm = _check_norm(rescale_norm)
    check_generator("generator", generator, t.device)
    if density >= 1:
        return t.clone()
    if density <= 0:
        return torch.zeros_like(t)
    epsilon = _della_epsilon(density, epsilon)
    return dispatch("della_magprune", backend, t, density, epsilon, norm, generator)
