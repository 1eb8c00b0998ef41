"""SparseGPT (OBS pruning with lazy blocked error compensation) in plain torch: the oracle.

This is the published ``fasterprune`` algorithm (Frantar & Alistarh, 2023), one column at a time:

1. ``W = weight`` in float32 (float64 when weight and hessian are float64), ``H`` a copy of the Hessian.
2. Dead columns (``H_jj == 0``, inputs that were always zero): ``H_jj = 1`` and ``W[:, j] = 0``.
3. Damping ``percdamp * mean(diag H)`` added to the diagonal; ``U`` = upper Cholesky factor of ``H^-1``
   (cholesky, cholesky_inverse, cholesky(upper=True)), so ``H^-1 = U^T U``.
4. Per block ``[i1, i2)`` of ``blocksize`` columns: the prune set (unstructured: the lowest
   ``w^2 / U_jj^2`` of the whole block, chosen at block start; N:M: chosen per row on the fly), then for each
   column i: ``q = w`` with pruned entries zeroed, ``err = (w - q) / U_ii``, ``loss += err^2 / 2``,
   ``W[:, i:i2] -= err U[i, i:i2]``; after the block ``W[:, i2:] -= Err @ U[i1:i2, i2:]``.

Since the total update of a row is ``dW = -err U``, ``dW H_d dW^T = err U H_d U^T err^T = |err|^2``: the
per-row loss is exactly ``1/2 dW H_d dW^T`` with ``H_d`` the damped Hessian (the tests check this).
"""
from __future__ import annotations

import warnings
from typing import Callable, NamedTuple, Optional, Tuple

import torch

from ..._dispatch import register

MAX_DAMPING_TRIES = 8  # percdamp grows x10 per try: up to 1e7 x the asked damping


class PruneResult(NamedTuple):
    """weight: pruned weight (input dtype/shape/device); mask: bool, True = kept; loss: float32 [rows]."""
    weight: torch.Tensor
    mask: torch.Tensor
    loss: torch.Tensor


def compute_dtype(weight: torch.Tensor, hessian: torch.Tensor) -> torch.dtype:
    """float64 only when both inputs are float64 (exact checks); float32 otherwise, as published."""
    both64 = weight.dtype == torch.float64 and hessian.dtype == torch.float64
    return torch.float64 if both64 else torch.float32


# ---------------------------------------------------------------- the inverse factor, with damping retries

FactorFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.dtype], Optional[torch.Tensor]]


def damped_factor(hessian: torch.Tensor, percdamp: float, dtype: torch.dtype,
                  factor: FactorFn, who: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Run ``factor(hessian, dead, damp, dtype)`` with ``damp = percdamp * mean(diag H)`` (dead diag = 1).

    ``factor`` returns the inverse factor, or None when H + damp I is not positive definite (in finite
    precision). Then the damping is raised x10 (from 0.01 when percdamp is 0) and tried again, with a
    RuntimeWarning naming the damping finally used; ValueError when MAX_DAMPING_TRIES are not enough.
    Returns (factor, dead) with dead the bool [cols] mask of dead columns.
    """
    diag = hessian.diagonal().to(dtype)
    if bool((diag < 0).any()):
        bad = int((diag < 0).sum())
        raise ValueError(f"hessian has {bad} negative diagonal entr{'y' if bad == 1 else 'ies'}; "
                         "a Hessian X^T X is positive semidefinite")
    dead = diag == 0
    mean_diag = torch.where(dead, torch.ones_like(diag), diag).mean()
    pd = percdamp
    for attempt in range(MAX_DAMPING_TRIES):
        out = factor(hessian, dead, pd * mean_diag, dtype)
        if out is not None:
            if attempt:
                warnings.warn(f"{who}: hessian is not positive definite with percdamp={percdamp:g}; used "
                              f"percdamp={pd:g} (damping {pd * float(mean_diag):.4g} added to the diagonal)",
                              RuntimeWarning, stacklevel=4)
            return out, dead
        pd = pd * 10 if pd > 0 else 0.01
    raise ValueError(f"{who}: hessian is not positive definite even with percdamp={pd / 10:g} "
                     f"({MAX_DAMPING_TRIES} tries from percdamp={percdamp:g}); is it X^T X of finite inputs?")


def _published_factor(hessian, dead, damp, dtype):
    """cholesky(H_d), cholesky_inverse, cholesky(upper=True): the three factorisations of the paper's code."""
    H = hessian.to(dtype=dtype, copy=True)
    diag = H.diagonal()
    diag[dead] = 1
    diag += damp
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) != 0:
        return None
    U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
    if int(info) != 0 or not bool(torch.isfinite(U).all()):
        return None
    return U


def inverse_factor(hessian: torch.Tensor, percdamp: float, dtype: torch.dtype = torch.float32,
                   who: str = "sparsegpt_prune") -> Tuple[torch.Tensor, torch.Tensor]:
    """(U, dead): U the upper Cholesky factor of (H with dead diag = 1, damped)^-1, as published."""
    return damped_factor(hessian, percdamp, dtype, _published_factor, who)


# ---------------------------------------------------------------- masks

def unstructured_prune_set(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The published adaptive rule on one block's scores: prune ``scores <= sorted(scores)[int(numel * s)]``.

    So ``int(numel * s) + 1`` entries or more (ties at the threshold are all pruned). Edge cases defined
    here: sparsity 0 prunes nothing, sparsity 1 prunes everything (the published index is out of range).
    Returns bool, True = pruned.
    """
    if sparsity <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if sparsity >= 1:
        return torch.ones_like(scores, dtype=torch.bool)
    thresh = torch.sort(scores.flatten())[0][int(scores.numel() * sparsity)]
    return scores <= thresh


def nm_prune_set(scores: torch.Tensor, prune_n: int) -> torch.Tensor:
    """Per row, the ``prune_n`` lowest of the group's scores [rows, m]; ties go to the lower index."""
    idx = torch.sort(scores, dim=1, stable=True)[1][:, :prune_n]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, idx, True)


# ---------------------------------------------------------------- the algorithm

def fasterprune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, prune_n: int, prune_m: int,
                blocksize: int, percdamp: float) -> PruneResult:
    """SparseGPT on a [rows, cols] weight with its [cols, cols] Hessian (arguments validated by the caller)."""
    dtype = compute_dtype(weight, hessian)
    U, dead = inverse_factor(hessian, percdamp, dtype)
    W = weight.to(dtype=dtype, copy=True)
    W[:, dead] = 0
    rows, cols = W.shape
    pruned = torch.zeros(rows, cols, dtype=torch.bool, device=W.device)
    losses = torch.zeros(rows, dtype=dtype, device=W.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        d1 = torch.diagonal(U1)
        Q1, Err1, Losses1 = torch.zeros_like(W1), torch.zeros_like(W1), torch.zeros_like(W1)
        if prune_n == 0:
            mask1 = unstructured_prune_set(W1 ** 2 / d1.reshape(1, -1) ** 2, sparsity)
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if prune_n != 0 and i % prune_m == 0:
                group = W1[:, i:i + prune_m] ** 2 / d1[i:i + prune_m].reshape(1, -1) ** 2
                mask1[:, i:i + prune_m] = nm_prune_set(group, prune_n)
            w, d = W1[:, i], U1[i, i]
            q = torch.where(mask1[:, i], torch.zeros_like(w), w)
            Q1[:, i] = q
            Losses1[:, i] = (w - q) ** 2 / d ** 2
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        pruned[:, i1:i2] = mask1
        losses += Losses1.sum(1) / 2
        W[:, i2:] -= Err1.matmul(U[i1:i2, i2:])
    return PruneResult(W.to(weight.dtype), ~pruned, losses.float())


@register("sparsegpt_prune", "reference")
def sparsegpt_prune(weight, hessian, sparsity, prune_n, prune_m, blocksize, percdamp) -> PruneResult:
    # the published code runs with tf32 off: exact fp32 products decide the masks
    with fp32_matmul():
        return fasterprune(weight, hessian, sparsity, prune_n, prune_m, blocksize, percdamp)


class fp32_matmul:
    """Context manager: CUDA matmuls in true fp32 (tf32 off), restoring the previous setting."""

    def __enter__(self):
        self._prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self._prev
        return False


@register("importance_scores", "reference")
def importance_scores(weight: torch.Tensor, hinv_diag: torch.Tensor) -> torch.Tensor:
    """w_ij^2 / hinv_diag_j^2 in float32 (float64 for float64 inputs)."""
    dtype = compute_dtype(weight, hinv_diag)
    return weight.to(dtype) ** 2 / hinv_diag.to(dtype) ** 2


