"""SparseGPT / OBS pruning ops: sparsegpt_prune, prune_task_vector, importance_scores.

Each public function validates its arguments, then dispatches to a backend (reference | triton).
The reference (``reference.py``) is the published ``fasterprune`` algorithm and defines the semantics.
"""
from __future__ import annotations

import math
from numbers import Real

import torch

from ..._dispatch import dispatch, import_backend
from ..._validate import (ALL_FLOAT_DTYPES, check_finite, check_fraction, check_int, check_result,
                          check_same_device, check_tensor, finite_amax)
from . import reference  # noqa: F401  (registers the oracle)
from .reference import PruneResult

import_backend(__name__, "triton")

__all__ = ["PruneResult", "sparsegpt_prune", "prune_task_vector", "importance_scores"]


def _check_weight_hessian(wname: str, weight, hessian) -> None:
    check_tensor(wname, weight, ndim=2, dtypes=ALL_FLOAT_DTYPES, nonempty=True)
    check_tensor("hessian", hessian, ndim=2, dtypes=ALL_FLOAT_DTYPES)
    cols = weight.shape[1]
    if tuple(hessian.shape) != (cols, cols):
        raise ValueError(f"hessian must be [cols, cols] = [{cols}, {cols}] for {wname} of shape "
                         f"{tuple(weight.shape)}, got {tuple(hessian.shape)}")
    check_same_device((wname, weight), ("hessian", hessian))


def _check_pattern(prune_n, prune_m, blocksize, cols: int):
    prune_n = check_int("prune_n", prune_n, minimum=0)
    prune_m = check_int("prune_m", prune_m, minimum=0)
    blocksize = check_int("blocksize", blocksize, minimum=1)
    if (prune_n == 0) != (prune_m == 0):
        raise ValueError(f"prune_n and prune_m must both be 0 (unstructured) or both set (N:M), "
                         f"got prune_n={prune_n}, prune_m={prune_m}")
    if prune_m:
        if prune_n > prune_m:
            raise ValueError(f"prune_n must be <= prune_m, got prune_n={prune_n}, prune_m={prune_m}")
        if cols % prune_m:
            raise ValueError(f"prune_m={prune_m} must divide the number of columns ({cols}) for N:M pruning")
        if blocksize % prune_m:
            raise ValueError(f"blocksize={blocksize} must be a multiple of prune_m={prune_m} so that no "
                             "N:M group straddles two blocks")
    return prune_n, prune_m, blocksize


def _check_percdamp(percdamp) -> float:
    if isinstance(percdamp, bool) or not isinstance(percdamp, Real):
        raise TypeError(f"percdamp must be a real number, got {type(percdamp).__name__}")
    v = float(percdamp)
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"percdamp must be a finite number >= 0, got {percdamp!r}")
    return v


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, *, sparsity: float = 0.5, prune_n: int = 0,
                    prune_m: int = 0, blocksize: int = 128, percdamp: float = 0.01,
                    backend: str = None) -> PruneResult:
    """SparseGPT (published ``fasterprune``): prune ``weight`` [rows, cols] using its Hessian [cols, cols].

    The Hessian is SparseGPT's ``2/n X^T X`` of the layer input (see HessianAccumulator); it must be
    symmetric (one triangle is read). Dead columns (``H_jj == 0``) are zeroed; ``percdamp * mean(diag H)``
    is added to the diagonal (raised x10 stepwise with a RuntimeWarning if H is still not positive
    definite; ValueError if it never becomes so).

    Unstructured (prune_n = prune_m = 0): per block of ``blocksize`` columns, the entries with
    ``w^2 / U_jj^2 <= sorted(scores)[int(numel * sparsity)]`` are pruned (the published rule: slightly more
    than ``sparsity``; sparsity 0 prunes nothing, 1 prunes everything). N:M: ``prune_n`` of every ``prune_m``
    consecutive columns are pruned per row (the published convention: 2:4 prunes 2 of 4), chosen on the fly
    from the error-compensated weights, ties to the lower index; ``sparsity`` is then ignored.
    Remaining weights are updated to compensate (OBS), so kept values change.

    Returns PruneResult(weight: input dtype/shape/device, mask: bool True = kept, loss: float32 [rows]
    = 1/2 dW H_d dW^T per row, H_d the damped Hessian). Computed in float32 (float64 when both inputs are).
    """
    _check_weight_hessian("weight", weight, hessian)
    sparsity = check_fraction("sparsity", sparsity)
    prune_n, prune_m, blocksize = _check_pattern(prune_n, prune_m, blocksize, weight.shape[1])
    percdamp = _check_percdamp(percdamp)
    return _prune("sparsegpt_prune", "weight", weight, hessian, sparsity, prune_n, prune_m, blocksize, percdamp,
                  backend)


def prune_task_vector(delta: torch.Tensor, hessian: torch.Tensor, *, density: float, rescale: bool = False,
                      prune_n: int = 0, prune_m: int = 0, blocksize: int = 128, percdamp: float = 0.01,
                      backend: str = None) -> PruneResult:
    """SparseGPT on a task vector ``delta`` = fine-tuned - base [rows, cols]: keep ``density`` of it.

    Exactly :func:`sparsegpt_prune` with ``sparsity = 1 - density`` (the kept entries are error-compensated
    so that ``delta_pruned X^T`` stays close to ``delta X^T``). With N:M, density must equal
    ``1 - prune_n / prune_m``. ``rescale=True`` then multiplies the kept entries by ``1 / density``
    (DARE-style; nothing to rescale when density is 0). The loss is that of the unrescaled result.
    """
    _check_weight_hessian("delta", delta, hessian)
    density = check_fraction("density", density)
    if not isinstance(rescale, bool):
        raise TypeError(f"rescale must be a bool, got {type(rescale).__name__}")
    prune_n, prune_m, blocksize = _check_pattern(prune_n, prune_m, blocksize, delta.shape[1])
    if prune_m and abs(density - (1 - prune_n / prune_m)) > 1e-6:
        raise ValueError(f"density={density} does not match the N:M pattern (prune_n={prune_n} of "
                         f"prune_m={prune_m} pruned keeps {1 - prune_n / prune_m:g})")
    percdamp = _check_percdamp(percdamp)
    res = _prune("prune_task_vector", "delta", delta, hessian, 1.0 - density, prune_n, prune_m, blocksize, percdamp,
                 backend)
    if rescale and density > 0:
        res = res._replace(weight=(res.weight.to(torch.float32) / density).to(delta.dtype)
                           if delta.dtype != torch.float64 else res.weight / density)
        check_result("prune_task_vector", res.weight, f"rescale=True divides the kept entries by density={density}")
    return res


# Scores w^2 / d^2 (d = U_jj, U the factor of the damped inverse Hessian, so d^2 >= 1 / H_d,jj) and the w^2
# they are formed from stay below max w^2 * max(1, max diag(H_d)). Where that bound comes within SCORE_HEADROOM of the compute dtype's range (never for
# real weights and Hessians), the weight is scaled by a power of two first: exact, so the masks are the ones the
# unscaled computation would choose if it could, and the pruned weight and the loss scale back exactly.
SCORE_HEADROOM = 2.0 ** 28


def _host_read(*scalars: torch.Tensor) -> list:
    """0-d tensors (reductions queued on the device) as Python floats, in one host read: each read waits for
    the GPU, which then idles while Python queues the next launches."""
    return torch.stack([s.double() for s in scalars]).tolist()


def _inf_norm(t: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(t.detach(), ord=float("inf"))


def _prune(op: str, wname: str, weight: torch.Tensor, hessian: torch.Tensor, sparsity, prune_n, prune_m, blocksize,
           percdamp, backend) -> PruneResult:
    # the inputs finite (NaN and Inf survive the max of |x|), max |weight| and max |diag(hessian)|: one read
    hnorm, amax, hmax = _host_read(_inf_norm(hessian), _inf_norm(weight), _inf_norm(hessian.diagonal()))
    if not math.isfinite(hnorm):
        check_finite("hessian", hessian)
    if not math.isfinite(amax):
        check_finite(wname, weight)
    compute = reference.compute_dtype(weight, hessian)
    bound = amax * amax * max(1.0, hmax * (1.0 + percdamp))  # w^2 itself is formed first
    limit = torch.finfo(compute).max / SCORE_HEADROOM
    shift = 0
    if bound > limit:
        shift = math.ceil(math.log2(bound / limit) / 2)
        weight_in = weight.to(compute) * 2.0 ** -shift  # a power of two: exact
    else:
        weight_in = weight
    res = dispatch("sparsegpt_prune", backend, weight_in, hessian, sparsity, prune_n, prune_m, blocksize, percdamp)
    if shift:
        loss = res.loss.double() * 4.0 ** shift
        if not bool(torch.isfinite(loss.float()).all()):
            raise ValueError(f"{op}: the per-row loss overflows float32 for {wname} with |values| up to {amax:.4g} and "
                             f"a hessian diagonal up to {hmax:.4g}; scale {wname} (or the hessian) down")
        res = PruneResult((res.weight.to(compute) * 2.0 ** shift).to(weight.dtype), res.mask, loss.float())
    wmax, lmax = _host_read(_inf_norm(res.weight), _inf_norm(res.loss))  # one read; check_result raises
    if not math.isfinite(wmax):
        check_result(op, res.weight, f"the error compensation pushes the kept entries of {wname} past the dtype's "
                                     "range")
    if not math.isfinite(lmax):
        check_result(op, res.loss, f"the per-row loss of {wname} overflows; scale {wname} (or the hessian) down")
    return res


def importance_scores(weight: torch.Tensor, hinv_diag: torch.Tensor, *, backend: str = None) -> torch.Tensor:
    """SparseGPT saliency ``w_ij^2 / hinv_diag_j^2``: weight [..., cols], hinv_diag [cols] (the diagonal of
    the inverse-Hessian factor, nonzero). Returns float32 (float64 for float64 inputs), weight's shape."""
    check_tensor("weight", weight, min_ndim=1, dtypes=ALL_FLOAT_DTYPES)
    amax = finite_amax("weight", weight)
    check_tensor("hinv_diag", hinv_diag, ndim=1, dtypes=ALL_FLOAT_DTYPES, finite=True)
    if hinv_diag.shape[0] != weight.shape[-1]:
        raise ValueError(f"hinv_diag must have weight.shape[-1] = {weight.shape[-1]} entries, "
                         f"got {hinv_diag.shape[0]}")
    check_same_device(("weight", weight), ("hinv_diag", hinv_diag))
    dmin = float(hinv_diag.abs().min()) if hinv_diag.numel() else 1.0
    if dmin == 0:
        raise ValueError("hinv_diag must be nonzero (it is the diagonal of a Cholesky factor)")
    scores = dispatch("importance_scores", backend, weight, hinv_diag)
    largest = torch.finfo(scores.dtype).max
    if amax * amax < largest / 4 and (amax / dmin) ** 2 < largest / 4:
        return scores  # neither w^2 nor the quotient can overflow: the common case, decided without a read
    if bool(torch.isfinite(scores).all()):
        return scores
    wide = reference.importance_scores(weight.double(), hinv_diag.double())  # w^2 overflowed, the score may not
    return check_result("importance_scores", wide.to(scores.dtype),
                        f"w^2 / hinv_diag^2 exceeds {str(scores.dtype).replace('torch.', '')} for weight up to "
                        f"{amax:.4g} and |hinv_diag| down to {dmin:.4g}")
