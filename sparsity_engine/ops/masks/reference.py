"""Plain-torch oracle for the mask ops (the semantics every kernel is tested against)."""
from __future__ import annotations

from typing import Optional

import torch

from ..._dispatch import register

RESCALE_NORMS = (None, "l1", "l2", "linf")
RESCALE_EPS = 1e-7  # below this a norm counts as zero and the masked tensor is returned unscaled


@register("nm_mask", "reference")
def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Per group of m consecutive entries (last dim), keep the n largest; ties to the lower index."""
    groups = scores.reshape(-1, m)
    order = torch.sort(groups, dim=1, descending=True, stable=True).indices[:, :n]
    mask = torch.zeros(groups.shape, dtype=torch.bool, device=scores.device)
    mask.scatter_(1, order, True)
    return mask.reshape(scores.shape)


def _topk_rows(rows: torch.Tensor, k: int) -> torch.Tensor:
    """rows [r, n]: True for the k largest of each row, ties to the lower index (stable descending order)."""
    mask = torch.zeros(rows.shape, dtype=torch.bool, device=rows.device)
    if k > 0:
        order = torch.sort(rows, dim=1, descending=True, stable=True).indices[:, :k]
        mask.scatter_(1, order, True)
    return mask


@register("topk_mask", "reference")
def topk_mask(scores: torch.Tensor, k: int, dim: Optional[int]) -> torch.Tensor:
    """Keep-mask of the k largest scores: over the whole tensor (dim None) or per slice along ``dim``.

    The public op turned density into k = int(density * n); -0.0 and +0.0 are equal (a tie).
    """
    if dim is None:
        return _topk_rows(scores.reshape(1, -1), k).reshape(scores.shape)
    moved = scores.movedim(dim, -1)
    if moved.numel() == 0:
        return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    mask = _topk_rows(moved.reshape(-1, moved.shape[-1]), k).reshape(moved.shape)
    return mask.movedim(-1, dim)


def _norm_pair(tensor: torch.Tensor, masked: torch.Tensor, norm: str):
    if norm == "l1":
        return tensor.abs().sum(), masked.abs().sum()
    if norm == "l2":
        return tensor.norm(), masked.norm()
    return tensor.abs().max(), masked.abs().max()


def rescale_factor(tensor: torch.Tensor, masked: torch.Tensor, norm: Optional[str]) -> Optional[torch.Tensor]:
    """mergekit's rescaled_masked_tensor factor norm(tensor) / norm(masked) (l1: sum |x|, l2: sqrt(sum x^2),
    linf: max |x|), each norm computed and rounded in the tensor's dtype as torch does (a 0-d tensor); None when
    no norm is asked for or either norm is below RESCALE_EPS. A norm that overflows the dtype (the l1 norm of a
    large fp16 tensor passes 65504) is taken in fp32 instead, where mergekit would scale by inf / inf = NaN."""
    if norm is None:
        return None
    before, after = _norm_pair(tensor, masked, norm)
    if not bool(torch.isfinite(before) & torch.isfinite(after)):
        before, after = _norm_pair(tensor.float(), masked.float(), norm)
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return None
    return before / after


def rescale_masked(tensor: torch.Tensor, masked: torch.Tensor, norm: Optional[str]) -> torch.Tensor:
    """``masked`` times :func:`rescale_factor` (unchanged when there is no factor)."""
    factor = rescale_factor(tensor, masked, norm)
    return masked if factor is None else masked * factor


@register("magnitude_prune", "reference")
def magnitude_prune(t: torch.Tensor, k: int, rescale_norm: Optional[str]) -> torch.Tensor:
    """Zero all but the k largest |t| (ties to the lower flat index), then rescale as ``rescale_norm`` asks."""
    keep = _topk_rows(t.abs().reshape(1, -1), k).reshape(t.shape)
    return rescale_masked(t, t * keep.to(t.dtype), rescale_norm)


def work_dtype(t: torch.Tensor) -> torch.dtype:
    """mergekit's rule: the tensor's dtype, except fp16/fp32 on the CPU, drawn in fp32."""
    if t.device.type != "cpu" or t.dtype == torch.bfloat16:
        return t.dtype
    return torch.float32


@register("dare", "reference")
def dare(t: torch.Tensor, density: float, rescale: bool, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Keep each entry independently with probability ``density`` (0 < density < 1), then divide by density.

    As mergekit's ``bernoulli``: the keep probability is ``density`` rounded to the work dtype and the
    product is formed in the work dtype, then cast back to t's dtype.
    """
    work = work_dtype(t)
    probs = torch.full(t.shape, density, dtype=work, device=t.device)
    mask = torch.bernoulli(probs, generator=generator)
    res = t.to(work) * mask
    if rescale:
        res = res / density
    return res.to(t.dtype)


def della_probabilities(t: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA keep-probabilities (fp32, t's shape): rows are the last dim (a 0-D or 1-D tensor is one row).

    p = clamp(density - epsilon + 2 * epsilon * r / (n - 1), 0, 1), r the 0-based rank of |x| in its row;
    tied magnitudes share their mean rank (a constant row gets p = density everywhere); a single column
    gets r / (n - 1) := 1/2, i.e. p = density.
    """
    n = t.shape[-1] if t.dim() else 1
    mag = t.abs().float().reshape(-1, n)
    ordered = torch.sort(mag, dim=1).values
    below = torch.searchsorted(ordered, mag, right=False)  # entries strictly smaller
    upto = torch.searchsorted(ordered, mag, right=True)  # entries smaller or equal
    mean_rank = (below + upto - 1).float() * 0.5
    frac = mean_rank / (n - 1) if n > 1 else torch.full_like(mean_rank, 0.5)
    probs = (density - epsilon) + (2.0 * epsilon) * frac
    return probs.clamp_(0.0, 1.0).reshape(t.shape)


@register("della_magprune", "reference")
def della_magprune(t: torch.Tensor, density: float, epsilon: float, rescale_norm: Optional[str],
                   generator: Optional[torch.Generator]) -> torch.Tensor:
    """DELLA MagPrune: keep each entry with its rank-based probability (:func:`della_probabilities`), then
    rescale the kept tensor as ``rescale_norm`` asks (mergekit's rescaled_masked_tensor; no 1/p factor,
    as mergekit). Work dtype as mergekit's."""
    work = work_dtype(t)
    mask = torch.bernoulli(della_probabilities(t, density, epsilon), generator=generator)
    x = t.to(work)
    return rescale_masked(x, x * mask.to(work), rescale_norm).to(t.dtype)
