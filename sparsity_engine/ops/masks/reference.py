"""Plain-torch oracle for the mask ops (the semantics every kernel is tested against)."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from ..._dispatch import register
from ..._validate import check_result, raise_nonfinite

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


def selection_keys(t: torch.Tensor, base: Optional[torch.Tensor], magnitude: bool) -> torch.Tensor:
    """int64 keys whose order is the order of |d| (magnitude) or of d, d = t or t - base in t's dtype: the
    float's bits in the dtype's own width without the sign (magnitude), negated for negative values (order;
    -0.0 and +0.0 share 0). The keys of every backend's select_edges."""
    d = t if base is None else t - base
    if d.dtype == torch.float32:
        bits, mag_mask = d.reshape(-1).view(torch.int32).long(), 0x7FFFFFFF
    else:
        bits, mag_mask = d.reshape(-1).view(torch.int16).long(), 0x7FFF
    mag = bits & mag_mask
    return mag if magnitude else torch.where(bits < 0, -mag, mag)


@register("select_edges", "reference")
def select_edges(inputs: Sequence[torch.Tensor], base: Optional[torch.Tensor],
                 rows: Sequence[Tuple[int, int, bool, int]], magnitude: bool, out: torch.Tensor) -> None:
    """Band edges (see masks.select_edges): for row (m, p, later_first, slot), with 1 <= p < n, the first p
    entries of input m in the order (key descending, equal keys by flat index ascending; descending with
    later_first) are exactly those with key > K, or key == K and index < J (index >= J with later_first).
    Writes K to out[0, slot] and J to out[1, slot]."""
    for m, p, later_first, slot in rows:
        key = selection_keys(inputs[m], base, magnitude)
        n = key.numel()
        K = torch.sort(key, descending=True).values[p - 1]
        equal = torch.nonzero(key == K)[:, 0]               # ascending flat indices
        taken = p - int((key > K).sum())                    # equal entries among the first p (>= 1)
        if later_first:
            J = int(equal[equal.numel() - taken])
        else:
            J = int(equal[taken]) if taken < equal.numel() else n
        out[0, slot] = int(K)
        out[1, slot] = J


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


def rescale_masked(tensor: torch.Tensor, masked: torch.Tensor, norm: Optional[str], *,
                   op: str = "rescale_masked") -> torch.Tensor:
    """``masked`` times :func:`rescale_factor` (unchanged when there is no factor); ValueError naming ``op``
    when the rescaled entries overflow the dtype (a factor > 1 on values near its largest)."""
    factor = rescale_factor(tensor, masked, norm)
    if factor is None:
        return masked
    return check_result(op, masked * factor, f"rescale_norm={norm!r} multiplies the kept entries by "
                                             f"{float(factor):.4g}")


@register("magnitude_prune", "reference")
def magnitude_prune(t: torch.Tensor, k: int, rescale_norm: Optional[str]) -> torch.Tensor:
    """Zero all but the k largest |t| (ties to the lower flat index), then rescale as ``rescale_norm`` asks."""
    keep = _topk_rows(t.abs().reshape(1, -1), k).reshape(t.shape)
    return rescale_masked(t, t * keep.to(t.dtype), rescale_norm, op="magnitude_prune")


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
    return della_probabilities_between(t, density - epsilon, 2.0 * epsilon)


def della_probabilities_between(t: torch.Tensor, lo: float, span: float) -> torch.Tensor:
    """della_probabilities with lo = density - epsilon and span = 2 * epsilon given."""
    n = t.shape[-1] if t.dim() else 1
    mag = t.abs().float().reshape(-1, n)
    ordered = torch.sort(mag, dim=1).values
    below = torch.searchsorted(ordered, mag, right=False)  # entries strictly smaller
    upto = torch.searchsorted(ordered, mag, right=True)  # entries smaller or equal
    mean_rank = (below + upto - 1).float() * 0.5
    frac = mean_rank / (n - 1) if n > 1 else torch.full_like(mean_rank, 0.5)
    probs = lo + span * frac
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
    out = rescale_masked(x, x * mask.to(work), rescale_norm, op="della_magprune").to(t.dtype)
    return out if rescale_norm is None or out.dtype == work else check_result(
        "della_magprune", out, f"rescale_norm={rescale_norm!r} pushes the kept entries past the dtype's range")


def draw_seed(generator: Optional[torch.Generator]) -> int:
    """A 31-bit seed for the kernels' counter-based Philox draw, from ``generator`` (or torch's default)."""
    if generator is None:
        return int(torch.randint(0, 2**31 - 1, (1,)).item())
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device).item())


@register("keep_with_probabilities", "reference")
def keep_with_probabilities(x: torch.Tensor, probs: torch.Tensor, seed: int, out=None) -> torch.Tensor:
    """x where a uniform draw falls below probs, else 0: torch's generator seeded with ``seed`` (the kernels
    draw the same distribution with Philox; the entries differ)."""
    gen = torch.Generator(device=x.device).manual_seed(seed)
    kept = torch.where(torch.rand(x.shape, generator=gen, device=x.device) < probs, x, torch.zeros_like(x))
    if out is None:
        return kept
    out.copy_(kept)
    return out


def task_vectors(base: torch.Tensor, tensors: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """t_i - base in base's dtype, each checked finite (ValueError naming base or tensors[i])."""
    deltas = [t - base for t in tensors]
    if not bool(torch.stack([torch.isfinite(d).all() for d in deltas]).all()):
        raise_nonfinite(base, tensors)
    return deltas


def norm_terms(d: torch.Tensor, norm: str) -> torch.Tensor:
    """One model's fp32 norm terms: sum |d| (l1), sum d^2 (l2), max |d| (linf)."""
    a = d.float().abs()
    if norm == "l2":
        return (a * a).sum()
    return a.amax() if norm == "linf" else a.sum()


def stack_with_norm_terms(base, tensors, masked: Sequence[torch.Tensor], norm: Optional[str]):
    """(masked task vectors stacked [N, ...], their norm terms before / after the mask fp32 [1, 2, N] or None)."""
    out = torch.stack(list(masked)) if masked else base.new_empty((0,) + tuple(base.shape))
    if norm is None:
        return out, None
    before = [norm_terms(t - base, norm) for t in tensors]
    after = [norm_terms(d, norm) for d in masked]
    return out, torch.stack([torch.stack(before), torch.stack(after)]).unsqueeze(0)


@register("della_deltas", "reference")
def della_deltas(base: torch.Tensor, tensors: Sequence[torch.Tensor], lo: Sequence[float], span: Sequence[float],
                 seeds: Sequence[int], active: Sequence[bool], norm: Optional[str]):
    """DELLA task vectors of a merge: delta_i = t_i - base (tensors already in base's dtype), kept where a
    uniform drawn with seeds[i] falls below della_probabilities_between(delta_i, lo[i], span[i]); unmasked
    where not active[i]. Returns (deltas [N, ...] in base's dtype, norm terms or None): with ``norm``
    ('l1' | 'l2' | 'linf') the fp32 terms of each delta before and after its mask, [P, 2, N] over P parts
    that the caller reduces (sums; max for linf). ValueError naming the tensor if a delta is not finite."""
    deltas = task_vectors(base, tensors)
    for i, d in enumerate(deltas):
        if active[i]:
            deltas[i] = keep_with_probabilities(d, della_probabilities_between(d, lo[i], span[i]), seeds[i])
    return stack_with_norm_terms(base, tensors, deltas, norm)
