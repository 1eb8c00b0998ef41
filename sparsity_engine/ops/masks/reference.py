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


def keep_probability(dtype: torch.dtype, density: float) -> float:
    """DARE's keep probability: density rounded to the tensor's dtype (as the probability tensor mergekit hands
    to torch.bernoulli on a GPU holds it), then to fp32, the uniforms' dtype. The same on every device and
    backend."""
    return float(torch.tensor(density, dtype=dtype).float())


@register("dare", "reference")
def dare(t: torch.Tensor, density: float, rescale: bool, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Keep each entry independently with probability ``density`` (0 < density < 1), then divide by density.

    The draw of every backend: a 31-bit seed from ``generator`` (:func:`draw_seed`), entry e kept iff its
    uniform (:func:`philox_uniforms`) is below :func:`keep_probability` (an fp32 compare). Kept entries:
    x * fp32(1 / density) in fp32 (fp64 for float64 t; x itself without ``rescale``), rounded once to t's dtype;
    dropped entries are +0.
    """
    wide = torch.float64 if t.dtype == torch.float64 else torch.float32
    u = philox_uniforms(draw_seed(generator), t.numel(), t.device).view(t.shape)
    keep = u < torch.tensor(keep_probability(t.dtype, density), dtype=torch.float32, device=t.device)
    x = t.to(wide)
    if rescale:
        x = x * torch.tensor(1.0 / density, dtype=wide, device=t.device)
    return torch.where(keep, x, torch.zeros((), dtype=wide, device=t.device)).to(t.dtype)


def della_probabilities(t: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA keep-probabilities (fp32, t's shape): rows are the last dim (a 0-D or 1-D tensor is one row).

    p = clamp(density - epsilon + 2 * epsilon * r / (n - 1), 0, 1), r the 0-based rank of |x| in its row;
    tied magnitudes share their mean rank (a constant row gets p = density everywhere); a single column
    gets r / (n - 1) := 1/2, i.e. p = density.
    """
    return della_probabilities_between(t, density - epsilon, 2.0 * epsilon)


def della_probabilities_between(t: torch.Tensor, lo: float, span: float) -> torch.Tensor:
    """della_probabilities with lo = density - epsilon and span = 2 * epsilon given.

    The arithmetic of every backend, each step rounded in fp32 (no fused multiply-add): mean rank (exact),
    times fp32(1 / (n - 1)) (the reciprocal rounded once), times fp32(span), plus fp32(lo), clamped; the
    CUDA kernel's della_p and the Triton rows kernel compute exactly this.
    """
    n = t.shape[-1] if t.dim() else 1
    if t.numel() == 0:
        return torch.zeros(t.shape, dtype=torch.float32, device=t.device)
    mag = t.abs().float().reshape(-1, n)
    ordered = torch.sort(mag, dim=1).values
    below = torch.searchsorted(ordered, mag, right=False)  # entries strictly smaller
    upto = torch.searchsorted(ordered, mag, right=True)  # entries smaller or equal
    mean_rank = (below + upto - 1).float() * 0.5
    f32 = dict(dtype=torch.float32, device=t.device)
    if n > 1:
        frac = mean_rank * torch.tensor(della_inv_nm1(n), **f32)
    else:
        frac = torch.full_like(mean_rank, 0.5)
    probs = frac * torch.tensor(span, **f32) + torch.tensor(lo, **f32)
    return probs.clamp_(0.0, 1.0).reshape(t.shape)


def della_inv_nm1(n: int) -> float:
    """1 / (n - 1) rounded to fp32 once (as the CUDA kernels' 1.0f / (n - 1)); a float the Triton launcher
    passes unchanged."""
    return float(torch.tensor(1.0, dtype=torch.float32) / torch.tensor(float(n - 1), dtype=torch.float32))


@register("della_magprune", "reference")
def della_magprune(t: torch.Tensor, density: float, epsilon: float, rescale_norm: Optional[str],
                   generator: Optional[torch.Generator]) -> torch.Tensor:
    """DELLA MagPrune: keep each entry where its uniform (:func:`keep_with_probabilities`, seeded by
    :func:`draw_seed`) is below its rank-based probability (:func:`della_probabilities`), then rescale the kept
    tensor in t's dtype as ``rescale_norm`` asks (mergekit's rescaled_masked_tensor; no 1/p factor, as
    mergekit). The draw and the arithmetic of every backend."""
    kept = keep_with_probabilities(t, della_probabilities(t, density, epsilon), draw_seed(generator))
    return rescale_masked(t, kept, rescale_norm, op="della_magprune")


# ---------------------------------------------------------------- the counter-based draw of every backend

SEED_HIGH = 2**31 - 1  # seeds are drawn in [0, SEED_HIGH): they fit the kernels' int32 / uint32 arguments


def draw_seeds(generator: Optional[torch.Generator], count: int) -> List[int]:
    """``count`` 31-bit Philox seeds in one torch.randint call on ``generator`` (on its device), else on torch's
    default CPU generator (so torch.manual_seed reproduces a draw). Every backend draws its seeds here, so one
    generator state gives one seed, and with it one draw, on every backend; a CPU generator gives the same
    seeds whatever device the tensors are on."""
    device = generator.device if generator is not None else "cpu"
    return torch.randint(0, SEED_HIGH, (count,), generator=generator, device=device).tolist()


def draw_seed(generator: Optional[torch.Generator]) -> int:
    """One seed (:func:`draw_seeds` with count 1): the seed of the mask ops' DARE and DELLA draws."""
    return draw_seeds(generator, 1)[0]


_M32 = 0xFFFFFFFF
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57  # multipliers of Philox4x32
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85  # its Weyl key increments
UNIFORM_SCALE = 4.6566127342e-10  # Triton's uint_to_uniform_float for 32-bit words: (2**31 - 1) * scale < 1
PHILOX_CHUNK = 1 << 16  # Philox counters evaluated per step (bounds the int64 temporaries to a few MiB)


def _mul_hi_lo(x: torch.Tensor, m: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x * m) >> 32 and (x * m) mod 2**32 for int64 x in [0, 2**32) and a 32-bit constant m, with no int64
    overflow: m is split into 16-bit halves, so each partial product stays below 2**48.

    x m = 2**16 h + l with h = x (m >> 16), l = x (m & 0xFFFF); then (x m) >> 32 = (h + (l >> 16)) >> 16 (the low
    16 bits of l cannot carry past bit 32) and (x m) mod 2**32 = ((h mod 2**16) 2**16 + l) mod 2**32."""
    h = x * (m >> 16)
    low = x * (m & 0xFFFF)
    hi = (low >> 16).add_(h).bitwise_right_shift_(16)
    return hi, h.bitwise_and_(0xFFFF).bitwise_left_shift_(16).add_(low).bitwise_and_(_M32)


def philox4x32(c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor, k0: int,
               k1: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32-10 (Salmon et al., SC 2011) on int64 tensors holding 32-bit words: counter (c0, c1, c2, c3),
    key (k0, k1) -> the four output words, int64 in [0, 2**32). Each of the 10 rounds:

        c0, c1, c2, c3 = hi(B c2) ^ c1 ^ k0, lo(B c2), hi(A c0) ^ c3 ^ k1, lo(A c0);  k0 += KEY_A, k1 += KEY_B

    (hi / lo: the upper / lower 32 bits of the 64-bit product), as Triton's philox_impl and csrc/masks_della.cu's
    philox_uniform4 compute it. The keys are host integers (the same for every entry)."""
    for _ in range(10):
        hi_b, lo_b = _mul_hi_lo(c2, _PHILOX_ROUND_B)
        hi_a, lo_a = _mul_hi_lo(c0, _PHILOX_ROUND_A)
        c0, c1, c2, c3 = hi_b.bitwise_xor_(c1).bitwise_xor_(k0), lo_b, hi_a.bitwise_xor_(c3).bitwise_xor_(k1), lo_a
        k0 = (k0 + _PHILOX_KEY_A) & _M32
        k1 = (k1 + _PHILOX_KEY_B) & _M32
    return c0, c1, c2, c3


def philox_words(seed: int, offsets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton's tl.randint4x(seed, offsets) for int64 offsets >= 0: counter (offset mod 2**32, offset >> 32, 0,
    0), key (seed mod 2**32, seed >> 32); four int64 tensors of 32-bit words."""
    zero = torch.zeros_like(offsets)
    return philox4x32(offsets & _M32, offsets >> 32, zero, zero, seed & _M32, (seed >> 32) & _M32)


def uniform_from_words(words: torch.Tensor) -> torch.Tensor:
    """Triton's uint_to_uniform_float of 32-bit words (int64 in [0, 2**32)): the word read as an int32 x, x < 0
    mapped to -x - 1 (= 2**32 - 1 - word), converted to fp32 (rounded to nearest) and times fp32(UNIFORM_SCALE):
    float32 uniforms in [0, 1)."""
    x = torch.where(words > 0x7FFFFFFF, _M32 - words, words)
    return x.to(torch.float32) * torch.tensor(UNIFORM_SCALE, dtype=torch.float32, device=words.device)


def philox_uniforms(seed: int, n: int, device) -> torch.Tensor:
    """The uniforms of the mask ops' draws for flat indices 0 .. n-1 (float32 [n]): entry e takes lane e % 4 of
    Philox4x32-10(seed, counter e // 4), so one Philox call serves four entries and a value depends only on the
    seed and the index (Triton's _block_uniforms / _uniform_at, csrc/masks_della.cu's della_deltas). DARE keeps
    entry e iff u[e] < p, DELLA iff u[e] < p[e]. Evaluated PHILOX_CHUNK counters at a time."""
    out = torch.empty(n, dtype=torch.float32, device=device)
    groups = -(-n // 4)
    for start in range(0, groups, PHILOX_CHUNK):
        counters = torch.arange(start, min(start + PHILOX_CHUNK, groups), dtype=torch.int64, device=device)
        lanes = torch.stack(philox_words(seed, counters), dim=1).reshape(-1)  # counter-major: flat index order
        first = 4 * start
        count = min(n - first, lanes.numel())
        out[first:first + count] = uniform_from_words(lanes[:count])
    return out


@register("keep_with_probabilities", "reference")
def keep_with_probabilities(x: torch.Tensor, probs: torch.Tensor, seed: int, out=None) -> torch.Tensor:
    """x where its uniform (:func:`philox_uniforms` of ``seed``, by flat index) is below probs (fp32), else +0:
    the DELLA draw of every backend (written into ``out`` when given)."""
    u = philox_uniforms(seed, x.numel(), x.device).view(x.shape)
    kept = torch.where(u < probs, x, torch.zeros((), dtype=x.dtype, device=x.device))
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
                 seeds: Sequence[int], active: Sequence[bool], norm: Optional[str], bad: Optional[torch.Tensor] = None):
    """DELLA task vectors of a merge: delta_i = t_i - base (tensors already in base's dtype), kept where a
    uniform drawn with seeds[i] falls below della_probabilities_between(delta_i, lo[i], span[i]); unmasked
    where not active[i]. Returns (deltas [N, ...] in base's dtype, norm terms or None): with ``norm``
    ('l1' | 'l2' | 'linf') the fp32 terms of each delta before and after its mask, [P, 2, N] over P parts
    that the caller reduces (sums; max for linf). ValueError naming the tensor if a delta is not finite (at once,
    so ``bad`` is never set)."""
    deltas = task_vectors(base, tensors)
    for i, d in enumerate(deltas):
        if active[i]:
            deltas[i] = keep_with_probabilities(d, della_probabilities_between(d, lo[i], span[i]), seeds[i])
    return stack_with_norm_terms(base, tensors, deltas, norm)
