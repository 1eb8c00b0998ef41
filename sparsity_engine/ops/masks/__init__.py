"""Mask selection ops: N:M, top-k, magnitude, DARE, DELLA, and the selection the merges build on.

Each public function validates its arguments, then dispatches to a backend (reference | triton | cuda).
Semantics follow mergekit 0.1.5's ``sparsify`` (magnitude, random = DARE, della_magprune); where mergekit
would fail (an assert, a NaN) these ops raise a clear error or take the documented robust path instead. The
random ops draw from one counter-based stream on every backend (reference.philox_uniforms), so a generator
state gives the same result on each.

For the merge family (ops/merge), which reaches these only through this module: :func:`select_edges` (band
edges over whole tensors), :func:`della_deltas` (the DELLA task vectors of a merge), :func:`della_epsilon`,
:func:`magnitude_count`, the draws' seeds and Philox words (:func:`draw_seeds`, :func:`philox_words`),
mergekit's rescale (:func:`rescale_masked`, :data:`RESCALE_EPS`) and :func:`to_device`.
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence, Tuple

import torch

from ..._dispatch import choose, dispatch, import_backend
from ..._validate import (ALL_FLOAT_DTYPES, FLOAT_DTYPES, check_choice, check_finite, check_fraction,
                          check_generator, check_int, check_nm, check_tensor, finite_amax)
from . import reference  # noqa: F401  (registers the oracle)
from .reference import (PHILOX_CHUNK, RESCALE_EPS, RESCALE_NORMS, draw_seeds,  # noqa: F401  (for ops/merge)
                        philox_words, rescale_factor, rescale_masked)

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


def magnitude_count(numel: int, density: float) -> int:
    """How many entries mergekit 0.1.5's ``magnitude`` keeps of ``numel``: none at density <= 0 (or of an
    empty tensor), all at density >= 1, else max(1, int(density * numel)): a positive density keeps at least
    one entry. The one place this count is made (magnitude_prune, the merges' magnitude sparsification)."""
    if density <= 0 or numel == 0:
        return 0
    if density >= 1:
        return numel
    return max(1, int(density * numel))


def magnitude_prune(t: torch.Tensor, density: float, *, rescale_norm: Optional[str] = None,
                    backend: str = None) -> torch.Tensor:
    """mergekit 0.1.5 ``magnitude``: keep the k = :func:`magnitude_count` largest |t| (max(1, int(density * n))
    for 0 < density < 1), zero the rest.

    Ties at the threshold go to the lower flat index. ``rescale_norm`` ('l1' | 'l2' | 'linf' | None) then
    scales the kept entries so that the norm of the result equals the norm of ``t`` (mergekit's
    rescaled_masked_tensor). density 0 returns zeros, an empty ``t`` an empty tensor, and a count that keeps
    every entry (density >= 1, or one entry of one) a copy of ``t`` (never ``t`` itself). Returns a tensor of
    t's shape, dtype and device.
    """
    check_tensor("t", t, dtypes=ALL_FLOAT_DTYPES)
    density = check_fraction("density", density)
    norm = _check_norm(rescale_norm)
    k = magnitude_count(t.numel(), density)
    if k == 0 or k == t.numel():
        check_finite("t", t)
        return t.clone() if k else torch.zeros_like(t)
    return _dispatch_finite("magnitude_prune", backend, "t", t, k, norm)


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def dare(t: torch.Tensor, density: float, *, rescale: bool = True, generator: Optional[torch.Generator] = None,
         backend: str = None) -> torch.Tensor:
    """DARE (mergekit ``bernoulli``): keep each entry independently with probability ``density``; with
    ``rescale`` the kept entries are divided by density, so E[result] = t.

    density >= 1 returns a copy of t, density == 0 zeros. The draw is counter-based (Philox4x32-10 of a seed
    and the flat index, see reference.philox_uniforms) on every backend: ``generator`` (on t's device type, or
    a CPU one; None: torch's default CPU generator) gives the seed, and the same generator state gives the
    same result, bit for bit, on the reference, Triton and CUDA backends (a CPU generator: on every device
    too). Returns t's shape and dtype.
    """
    check_tensor("t", t, dtypes=ALL_FLOAT_DTYPES)
    amax = finite_amax("t", t)
    density = check_fraction("density", density)
    rescale = _check_bool("rescale", rescale)
    check_generator("generator", generator, t.device, host_ok=True)
    if density >= 1:
        return t.clone()
    if density <= 0:
        return torch.zeros_like(t)
    if rescale:
        _check_rescale_fits(t.dtype, amax, density)
    return dispatch("dare", backend, t, density, rescale, generator)


def _check_rescale_fits(dtype: torch.dtype, amax: float, density: float) -> None:
    """DARE's kept entries t / density must stay finite in t's dtype: refused up front from max |t| (with a
    margin for the roundings of any backend), whatever the draw keeps, so an output never holds Inf."""
    largest = torch.finfo(dtype).max
    if amax / density > largest * (1 - 2.0 ** -8):
        raise ValueError(f"dare: rescale=True divides the kept entries by density={density}, which overflows "
                         f"{str(dtype).replace('torch.', '')} for t with |t| up to {amax:.4g} (its largest value is "
                         f"{largest:.4g}); pass rescale=False, a larger density, or t in a wider dtype")


def della_epsilon(density: float, epsilon: float, *, stacklevel: int = 3) -> float:
    """Shrink epsilon so that [density - epsilon, density + epsilon] stays inside [0, 1], with a warning."""
    limit = min(density, 1.0 - density)
    if epsilon > limit:
        warnings.warn(f"della_magprune: epsilon={epsilon} puts density +/- epsilon outside [0, 1] for "
                      f"density={density}; using epsilon={limit}", RuntimeWarning, stacklevel=stacklevel)
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
    The draw: entry e is kept iff the Philox uniform of its flat index (the seed from ``generator``, as
    :func:`dare`) is below p_e, with p_e rounded as reference.della_probabilities_between says; the same
    generator state keeps the same entries on every backend.
    Note: mergekit ranks along dim 1 for tensors of 3 or more dims; this op ranks along the last dim.
    """
    check_tensor("t", t, dtypes=ALL_FLOAT_DTYPES, finite=True)
    density = check_fraction("density", density)
    epsilon = check_fraction("epsilon", epsilon, high=float("inf"))
    norm = _check_norm(rescale_norm)
    check_generator("generator", generator, t.device, host_ok=True)
    if density >= 1:
        return t.clone()
    if density <= 0:
        return torch.zeros_like(t)
    epsilon = della_epsilon(density, epsilon)
    return dispatch("della_magprune", backend, t, density, epsilon, norm, generator)


# ---------------------------------------------------------------- for the merge family

KEY_NONE = 2**31 - 1   # an edge that nothing is before (p = 0): no key is larger
KEY_ALL = -(2**31) + 2  # an edge that everything is before (p = n); K - 1 still fits an int32
MAX_INPUTS = 8


def select_edges(inputs: Sequence[torch.Tensor], base: Optional[torch.Tensor], rows: Sequence[Tuple[int, int, bool]],
                 *, magnitude: bool, backend: Optional[str] = None) -> torch.Tensor:
    """Edges of the descending order of whole tensors: int32 [2, len(rows)] on the inputs' device (K, J).

    inputs: 1 to 8 tensors of one shape, float dtype and device; base: None or like them. Keys: of |d|
    (``magnitude``) or of d, d = t or t - base rounded to t's dtype, in the dtype's own width (the Triton
    kernels' magnitude_key / order_key, reference.selection_keys). Row (m, p, later_first), 0 <= p <= n: the
    first p entries of input m in the order (key descending, equal keys by flat index ascending, or
    descending with ``later_first``) are exactly those with key > K, or key == K and index < J (index >= J
    with later_first). p = 0 gives (KEY_NONE, 0 or n), p = n (KEY_ALL, 0). Nothing is read back to the host.
    Inputs are not checked for NaN/Inf here (their keys order like any bits; callers check).
    """
    if not inputs or len(inputs) > MAX_INPUTS:
        raise ValueError(f"inputs must hold 1 to {MAX_INPUTS} tensors, got {len(inputs)}")
    n = inputs[0].numel()
    out = torch.empty((2, len(rows)), dtype=torch.int32, device=inputs[0].device)
    searched, trivial = [], []
    for slot, (m, p, later_first) in enumerate(rows):
        if not 0 <= m < len(inputs) or not 0 <= p <= n:
            raise ValueError(f"rows[{slot}] = {(m, p, later_first)} must name an input and a position in [0, {n}]")
        if 0 < p < n:
            searched.append((m, p, bool(later_first), slot))
        else:
            trivial.append((slot, KEY_NONE if p == 0 else KEY_ALL, n if (p == 0 and later_first) else 0))
    if trivial:
        slots = to_device(torch.tensor([t[0] for t in trivial]), out.device)
        out[:, slots] = to_device(torch.tensor([[t[1] for t in trivial], [t[2] for t in trivial]],
                                               dtype=torch.int32), out.device)
    if searched:
        dispatch("select_edges", backend, list(inputs), base, searched, bool(magnitude), out)
    return out


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small tensor just built on the host (a merge's parameters, seeds, trivial edges), copied to ``device``
    without waiting for the work queued there: a plain copy from pageable memory synchronises the stream, which
    leaves the GPU idle while Python prepares the next launches. The copy is queued after the driver has taken
    the bytes (pageable memory is staged before the call returns), so ``host`` may be dropped at once."""
    return host.to(device, non_blocking=True)


def della_deltas(base: torch.Tensor, tensors: Sequence[torch.Tensor], densities: Sequence[float],
                 epsilons: Sequence[float], seeds: Sequence[int], active: Sequence[bool], norm: Optional[str], *,
                 bad: Optional[torch.Tensor] = None,
                 backend: Optional[str] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The DELLA task vectors of a merge (see reference.della_deltas): model i's t_i - base kept with the
    probabilities of della_magprune (density_i, epsilon_i already shrunk by :func:`della_epsilon`), drawn with
    seeds[i]; unmasked where not active[i]. Returns (deltas [N, ...], norm terms [P, 2, N] fp32 or None).

    bad: None, or a zeroed int32 [1] flag on base's device. A backend that finds NaN/Inf deltas during its own
    pass (cuda) sets it instead of reading its flag back and raising: the caller reads it later, together with
    its own flag (one host wait per merge), and raises (_validate.raise_nonfinite names the input). Backends
    that check their inputs before any work raise at once either way."""
    lo = [d - e for d, e in zip(densities, epsilons)]
    span = [2.0 * e for e in epsilons]
    return dispatch("della_deltas", backend, base, list(tensors), lo, span, list(seeds), list(active), norm,
                    bad=bad)
