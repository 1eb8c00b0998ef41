"""Plain-torch oracle for the merge ops: TIES sign consensus, Model Breadcrumbs and generalized task arithmetic.

The arithmetic follows mergekit's generalized task arithmetic step by step and in the same dtype (the base
model's), so that rounding matches too:

    delta_i   = t_i - base                                       (base dtype)
    sparse_i  = sparsify(delta_i, density_i) [* rescale factor]  (per model; skipped when density_i >= 1;
                                                                  DARE / DELLA with the kernels' draws)
    wd_i      = sparse_i * w_i                                   (w_i rounded to the base dtype)
    with consensus:  m_i = sign(wd_i) == elected sign,  mixed = sum_i wd_i m_i,  div = sum_i w_i m_i (0 -> 1)
    without:         mixed = sum_i wd_i,                div = sum_i w_i (|div| < 1e-8 -> 1)
    mixed /= div  (normalize);   mixed *= lambda;   out = base + mixed
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from ..._dispatch import register
from .. import masks
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
    'magnitude_outliers'. Magnitudes are compared in fp32 (exact for fp16 / bf16), float64 in float64."""
    flat = t.detach().abs().reshape(-1)
    flat = flat if flat.dtype == torch.float64 else flat.float()
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

    density >= 1 returns ``t`` unchanged, and int(gamma*n) == 0 drops no large entry (both as mergekit 0.1.5).
    """
    if density >= 1:
        return t
    lo, hi = breadcrumbs_band(t.numel(), density, gamma)
    masked = t * band_mask(t, lo, hi, later_first=True).to(t.dtype)
    return rescale_masked(t, masked, rescale_norm, op="magnitude_outliers")


# ------------------------------------------------------------------ generalized task arithmetic

def della_epsilons(densities: Sequence[float], epsilons: Sequence[float], active: Sequence[bool]) -> List[float]:
    """A merge's DELLA epsilons, each shrunk into [0, min(density, 1 - density)] (masks.della_epsilon warns);
    0 where the model is not sparsified or its density is 0 (p = 0 whatever epsilon is: no warning)."""
    out = []
    for d, e, a in zip(densities, epsilons, active):  # a loop, not a comprehension: stacklevel points at the caller
        out.append(masks.della_epsilon(d, e, stacklevel=6) if a and d > 0 else 0.0)
    return out


def dare_seed_count(models: int) -> int:
    """Seeds a merge's DARE draws: one per four models, at least two (the fused kernel's two, for up to 8)."""
    return max(2, -(-models // 4))


def dare_keeps(n: int, seeds: Sequence[int], densities: Sequence[float], device) -> List[torch.Tensor]:
    """A merge's DARE keep masks (bool [n] per model, flat index order), the fused kernel's draw: model i keeps
    entry e iff (w >> 8) * 2**-24 < fp32(density_i), w = word i % 4 of tl.randint4x(seeds[i // 4], e) (one
    Philox call per entry serves four models; models 4-7 take the second seed, and so on past the kernel's 8)."""
    dens = torch.tensor(list(densities), dtype=torch.float32)  # the kernel's parameter tensor
    keeps = [torch.empty(n, dtype=torch.bool, device=device) for _ in densities]
    for start in range(0, n, masks.PHILOX_CHUNK):
        idx = torch.arange(start, min(start + masks.PHILOX_CHUNK, n), dtype=torch.int64, device=device)
        words = [w for seed in seeds[:-(-len(densities) // 4)] for w in masks.philox_words(seed, idx)]
        for i, keep in enumerate(keeps):
            keep[start:start + idx.numel()] = (words[i] >> 8).to(torch.float32) * 2.0 ** -24 < dens[i]
    return keeps


def sparsify_deltas(base: torch.Tensor, tensors: Sequence[torch.Tensor], spars: Optional[str],
                    densities: Sequence[float], *, gammas: Sequence[float], epsilons: Sequence[float],
                    rescale_norm: Optional[str], generator: Optional[torch.Generator]) -> List[torch.Tensor]:
    """The task vectors t_i - base (tensors in base's dtype) sparsified as mergekit 0.1.5's sparsify() does, in
    base's dtype, with the random draws of the fused kernels (so a generator state gives their result):

    * magnitude: masks.magnitude_prune (max(1, int(density n)) kept, ties to the lower flat index);
    * magnitude_outliers: the Breadcrumbs band (equal magnitudes: later index first);
    * random (DARE): seeds = draw_seeds(generator, dare_seed_count(N)), then :func:`dare_keeps`;
    * della_magprune: seeds = draw_seeds(generator, N), then masks.della_deltas (entry e of model i kept iff
      philox_uniforms(seeds[i])[e] < its DELLA probability);

    then each sparsified model rescaled as ``rescale_norm`` asks. Models with density >= 1 (or no
    sparsification) are left as they are, and no seed is drawn when no model is sparsified."""
    deltas = [t - base for t in tensors]
    active = [spars is not None and d < 1 for d in densities]
    if not any(active):
        return deltas
    zero = torch.zeros((), dtype=base.dtype, device=base.device)
    if spars == "random":
        seeds = masks.draw_seeds(generator, dare_seed_count(len(tensors)))
        keeps = dare_keeps(base.numel(), seeds, densities, base.device)
        masked = [torch.where(k.view(d.shape), d, zero) for k, d in zip(keeps, deltas)]
    elif spars == "della_magprune":
        eps = della_epsilons(densities, epsilons, active)
        masked = list(masks.della_deltas(base, tensors, densities, eps, masks.draw_seeds(generator, len(tensors)),
                                         active, None, backend="reference")[0].unbind(0))
    elif spars == "magnitude":
        masked = [masks.magnitude_prune(d, dens, backend="reference") if a else d
                  for d, dens, a in zip(deltas, densities, active)]
    elif spars == "magnitude_outliers":
        masked = [d * band_mask(d, *breadcrumbs_band(d.numel(), dens, gam), later_first=True).to(d.dtype) if a else d
                  for d, dens, gam, a in zip(deltas, densities, gammas, active)]
    else:
        raise ValueError(f"unknown sparsification {spars!r}")
    return [rescale_masked(d, m, rescale_norm, op="merge_task_vectors") if a else d
            for d, m, a in zip(deltas, masked, active)]


@register("merge_task_vectors", "reference")
def merge_task_vectors(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float], *,
                       spars: Optional[str], consensus: Optional[str], densities: Sequence[float],
                       epsilons: Sequence[float], gammas: Sequence[float], lambda_: float, normalize: bool,
                       rescale_norm: Optional[str], generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Generalized task arithmetic for one tensor (see the module docstring); per-model lists already expanded."""
    deltas = sparsify_deltas(base, [t.to(base.dtype) for t in tensors], spars, densities, gammas=gammas,
                             epsilons=epsilons, rescale_norm=rescale_norm, generator=generator)
    return combine_deltas(base, deltas, weights, consensus=consensus, normalize=normalize, lambda_=lambda_)


def combine_deltas(base: torch.Tensor, deltas: Sequence[torch.Tensor], weights: Sequence[float], *,
                   consensus: Optional[str], normalize: bool, lambda_: float) -> torch.Tensor:
    """The merge after sparsification: weights, sign election, disjoint (weighted) mean, lambda, + base.

    deltas: N sparsified task vectors in base's dtype and shape. The sums over models (the merged delta and
    the divisor) are accumulated in fp32 in model order and rounded once to base's dtype: torch's sum over a
    stacked dim for up to four models (mergekit's arithmetic), and the fused kernels' order for any count.
    Also the oracle for kernels that sparsify with their own draws (tests rebuild the draw, then combine here)."""
    dtype = base.dtype
    w = torch.tensor(list(weights), dtype=dtype, device=base.device)
    weighted = [d * w[i] for i, d in enumerate(deltas)]  # rounded to the dtype, as mergekit's weighted deltas
    agree = ties_consensus(torch.stack(weighted), consensus) if consensus is not None else None
    mixed = torch.zeros(base.shape, dtype=torch.float32, device=base.device)
    divisor = torch.zeros(base.shape, dtype=torch.float32, device=base.device)
    for i, wd in enumerate(weighted):
        if agree is None:
            mixed += wd.float()
            divisor += w[i].float()
        else:
            mixed += torch.where(agree[i], wd.float(), 0.0)
            divisor += torch.where(agree[i], w[i].float(), 0.0)
    mixed, divisor = mixed.to(dtype), divisor.to(dtype)
    if normalize:
        small = divisor == 0 if consensus is not None else divisor.abs() < 1e-8
        mixed = mixed / torch.where(small, torch.ones_like(divisor), divisor)
    if lambda_ != 1:
        mixed = mixed * lambda_
    return (base + mixed).to(dtype)
