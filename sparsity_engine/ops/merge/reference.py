"""Plain-torch oracle for the merge ops: TIES sign consensus, Model Breadcrumbs and generalized task arithmetic.

The arithmetic follows mergekit's generalized task arithmetic step by step and in the same dtype (the base
model's), so that rounding matches too:

    delta_i   = t_i - base                                       (base dtype)
    sparse_i  = sparsify(delta_i, density_i) [* rescale factor]  (per model; skipped when density_i >= 1)
    wd_i      = sparse_i * w_i                                   (w_i rounded to the base dtype)
    with consensus:  m_i = sign(wd_i) == elected sign,  mixed = sum_i wd_i m_i,  div = sum_i w_i m_i (0 -> 1)
    without:         mixed = sum_i wd_i,                div = sum_i w_i (|div| < 1e-8 -> 1)
    mixed /= div  (normalize);   mixed *= lambda;   out = base + mixed
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from ..._dispatch import register
from ..masks import RESCALE_EPS, rescale_masked  # noqa: F401  (mergekit's rescale, one definition)


# ------------------------------------------------------------------ consensus

@register("ties_consensus", "reference")
def ties_consensus(deltas: torch.Tensor, method: str = "sum") -> torch.Tensor:
    """deltas [N, ...] -> bool [N, ...]: True where sign(delta) equals the elected sign.

    The elected sign is +1 where the sum ('sum') or the sum of signs ('count') over models is >= 0, else -1;
    a zero delta has sign 0 and never agrees (as in mergekit's get_mask).
    """
    sign = torch.sign(deltas)
    vote = deltas.sum(dim=0) if method == "sum" else sign.sum(dim=0)
    elected = torch.where(vote >= 0, 1, -1).to(sign.dtype)
    return sign == elected


# ------------------------------------------------------------------ rank bands (magnitude, breadcrumbs)

def descending_rank(t: torch.Tensor, *, later_first: bool = False) -> torch.Tensor:
    """Position of every entry in the order |t| descending, equal magnitudes by flat index ascending (or
    descending with ``later_first``): a permutation of 0..n-1.

    These are the orders mergekit's sorts produce when they are stable (torch's CPU sort and its CUDA radix
    sort are): argsort(descending=True) for 'magnitude', an ascending sort read backwards for
    'magnitude_outliers'."""
    flat = t.detach().abs().reshape(-1).float()
    if later_first:
        order = flat.numel() - 1 - torch.sort(flat.flip(0), descending=True, stable=True).indices
    else:
        order = torch.sort(flat, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    return rank.reshape(t.shape)


def breadcrumbs_band(numel: int, density: float, gamma: float):
    """(lo, hi): positions kept in the descending-magnitude order, as mergekit's magnitude_outliers counts them.

    The int(gamma * n) largest are dropped, then the smallest until int(density * n) remain; when both cannot
    hold, fewer large ones are dropped so that the density is met.
    """
    target = int(density * numel)
    n_top = int(gamma * numel)
    n_bot = numel - target - n_top
    if n_bot < 0:
        n_top += n_bot
        n_bot = 0
    return n_top, numel - n_bot


def band_mask(t: torch.Tensor, lo: int, hi: int, *, later_first: bool = False) -> torch.Tensor:
    """Keep the entries at positions [lo, hi) of the descending-magnitude order (see descending_rank)."""
    rank = descending_rank(t, later_first=later_first)
    return (rank >= lo) & (rank < hi)


@register("magnitude_outliers", "reference")
def magnitude_outliers(t: torch.Tensor, density: float, gamma: float, rescale_norm: Optional[str] = None):
    """Model Breadcrumbs: drop the int(gamma*n) largest |t| and the smallest, so int(density*n) remain
    (equal magnitudes ordered as mergekit's stable ascending sort leaves them: later index counts as larger).

    density >= 1 returns ``t`` unchanged (as mergekit). Unlike mergekit, int(gamma*n) == 0 drops no large
    entry (mergekit's slice then keeps nothing at all; compat.mergekit reproduces that quirk).
    """
    if density >= 1:
        return t
    lo, hi = breadcrumbs_band(t.numel(), density, gamma)
    masked = t * band_mask(t, lo, hi, later_first=True).to(t.dtype)
    return rescale_masked(t, masked, rescale_norm, op="magnitude_outliers")


# ------------------------------------------------------------------ generalized task arithmetic

def sparsify_delta(delta: torch.Tensor, spars: Optional[str], density: float, *, gamma: float, epsilon: float,
                   rescale_norm: Optional[str], generator: Optional[torch.Generator],
                   backend: Optional[str] = "reference") -> torch.Tensor:
    """One model's task vector sparsified as mergekit's sparsify(), in the delta's dtype.

    ``backend`` is the masks family's backend for DARE / DELLA (the reference uses their reference)."""
    if spars is None or density >= 1:
        return delta
    if spars == "magnitude":
        if int(density * delta.numel()) == 0:
            masked = torch.zeros_like(delta)  # mergekit asserts here; a merge keeps nothing of this model
        else:
            from ..masks import magnitude_prune  # ties to the lower flat index, as band_mask

            masked = magnitude_prune(delta, density, backend=backend)
    elif spars == "magnitude_outliers":
        lo, hi = breadcrumbs_band(delta.numel(), density, gamma)
        masked = delta * band_mask(delta, lo, hi, later_first=True).to(delta.dtype)
    elif spars == "random":
        from ..masks import dare  # the masks family owns DARE and DELLA

        masked = dare(delta, density, rescale=False, generator=generator, backend=backend)
    elif spars == "della_magprune":
        if density <= 0:
            return torch.zeros_like(delta)
        from ..masks import della_magprune

        masked = della_magprune(delta, density, epsilon, generator=generator, backend=backend)
    else:
        raise ValueError(f"unknown sparsification {spars!r}")
    return rescale_masked(delta, masked, rescale_norm, op="merge_task_vectors")


@register("merge_task_vectors", "reference")
def merge_task_vectors(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float], *,
                       spars: Optional[str], consensus: Optional[str], densities: Sequence[float],
                       epsilons: Sequence[float], gammas: Sequence[float], lambda_: float, normalize: bool,
                       rescale_norm: Optional[str], generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Generalized task arithmetic for one tensor (see the module docstring); per-model lists already expanded."""
    dtype = base.dtype
    deltas: List[torch.Tensor] = []
    for i, t in enumerate(tensors):
        delta = t.to(dtype) - base
        deltas.append(sparsify_delta(delta, spars, densities[i], gamma=gammas[i], epsilon=epsilons[i],
                                     rescale_norm=rescale_norm, generator=generator))
    return combine_deltas(base, deltas, weights, consensus=consensus, normalize=normalize, lambda_=lambda_)


def combine_deltas(base: torch.Tensor, deltas: Sequence[torch.Tensor], weights: Sequence[float], *,
                   consensus: Optional[str], normalize: bool, lambda_: float) -> torch.Tensor:
    """The merge after sparsification: weights, sign election, disjoint (weighted) mean, lambda, + base.

    deltas: N sparsified task vectors in base's dtype and shape. Also the oracle for kernels that sparsify
    with their own draws (tests rebuild the draw, then combine here)."""
    dtype = base.dtype
    stacked = torch.stack(list(deltas), dim=0)
    w = torch.tensor(list(weights), dtype=dtype, device=base.device).reshape((-1,) + (1,) * base.dim())
    weighted = stacked * w
    if consensus is not None:
        agree = ties_consensus(weighted, consensus)
        mixed = (weighted * agree).sum(dim=0)
        divisor = (w * agree).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = weighted.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    if lambda_ != 1:
        mixed = mixed * lambda_
    return (base + mixed).to(dtype)
