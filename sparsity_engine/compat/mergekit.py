"""Drop-in for ``mergekit.sparsify`` and mergekit's ``get_mask``: a merge tool swaps one import.

    # from mergekit.sparsify import sparsify, SparsificationMethod, RescaleNorm
    from sparsity_engine.compat.mergekit import sparsify, SparsificationMethod, RescaleNorm, get_mask

Same names, enum values, signatures and results:

* deterministic methods (magnitude, magnitude_outliers) give mergekit's output exactly (ties in |x|, which
  mergekit leaves to an unstable sort, go to the lower flat index here);
* random methods (random, della_magprune) on the CPU draw with the same torch calls in the same order as
  mergekit, so ``torch.manual_seed(s)`` reproduces mergekit's draw bit for bit; on a GPU they run our
  counter-based kernels: same distribution, reproducible for a seed, not the same bits;
* on a GPU every method dispatches to our kernels (masks and merge families).

Where mergekit's behaviour is odd it is kept, because a drop-in must not change merges silently: the
``magnitude_outliers`` slice keeps nothing when int(gamma * n) == 0 (e.g. sparsify's default gamma=0),
and ``della_magprune`` refuses epsilon with density +/- epsilon outside (0, 1). Where mergekit would crash
or produce NaN, this module raises a ValueError that names the argument instead.
"""
from __future__ import annotations

from enum import Enum
from typing import Optional

import torch

from .._validate import FLOAT_DTYPES, check_fraction, check_tensor
from ..ops.merge import reference as _ref
from ..ops.merge import ties_consensus

__all__ = ["SparsificationMethod", "RescaleNorm", "ConsensusMethod", "rescaled_masked_tensor", "magnitude",
           "magnitude_outliers", "bernoulli", "della_magprune", "sparsify", "get_mask"]


class SparsificationMethod(str, Enum):
    magnitude = "magnitude"
    random = "random"
    magnitude_outliers = "magnitude_outliers"
    della_magprune = "della_magprune"


class RescaleNorm(str, Enum):
    l1 = "l1"
    l2 = "l2"
    linf = "linf"


class ConsensusMethod(str, Enum):
    count = "count"
    sum = "sum"


def _norm_name(norm) -> Optional[str]:
    if norm is None:
        return None
    try:
        return RescaleNorm(norm).value
    except ValueError:
        raise ValueError(f"rescale_norm must be None or one of {[m.value for m in RescaleNorm]}, got {norm!r}") from None


def _rescale(tensor: torch.Tensor, masked: torch.Tensor, norm, eps: float = 1e-7) -> torch.Tensor:
    """``masked`` times norm(tensor) / norm(masked), computed in the tensor's dtype as mergekit does; unchanged
    when no norm is asked for or either norm is below eps."""
    norm = _norm_name(norm)
    if norm is None:
        return masked
    if norm == "l1":
        before, after = tensor.abs().sum(), masked.abs().sum()
    elif norm == "l2":
        before, after = tensor.norm(), masked.norm()
    else:
        before, after = tensor.abs().max(), masked.abs().max()
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


def rescaled_masked_tensor(tensor: torch.Tensor, mask: torch.Tensor, norm: Optional[RescaleNorm],
                           eps: float = 1e-7) -> torch.Tensor:
    """``tensor * mask``, rescaled so that its l1 / l2 / linf norm equals the tensor's (norm None: no rescale)."""
    return _rescale(tensor, tensor * mask, norm, eps)


def _on_gpu(t: torch.Tensor) -> bool:
    return t.is_cuda


def _check(tensor, density) -> float:
    check_tensor("tensor", tensor, dtypes=FLOAT_DTYPES, finite=True)
    return check_fraction("density", density)


def magnitude(tensor: torch.Tensor, density: float, rescale_norm: Optional[RescaleNorm] = None) -> torch.Tensor:
    """Keep the int(density * n) largest |x| (whole tensor); density >= 1 returns ``tensor`` itself."""
    density = _check(tensor, density)
    if density >= 1:
        return tensor
    k = int(density * tensor.numel())
    if k <= 0:
        raise ValueError(f"density={density} keeps no entry of a tensor of {tensor.numel()} elements "
                         "(mergekit refuses this too)")
    if _on_gpu(tensor):
        from ..ops.masks import magnitude_prune

        masked = magnitude_prune(tensor, density)
    else:
        masked = tensor * _ref.band_mask(tensor, 0, k).to(tensor.dtype)
    return _rescale(tensor, masked, rescale_norm)


def magnitude_outliers(tensor: torch.Tensor, density: float, rescale_norm: Optional[RescaleNorm] = None,
                       gamma: float = 0.01) -> torch.Tensor:
    """Model Breadcrumbs: drop the int(gamma*n) largest |x| and the smallest so int(density*n) remain.

    As in mergekit, when int(gamma * n) == 0 the kept slice is empty and the result is all zeros.
    """
    density = _check(tensor, density)
    gamma = check_fraction("gamma", gamma)
    if density >= 1:
        return tensor
    lo, hi = _ref.breadcrumbs_band(tensor.numel(), density, gamma)
    if lo == 0:  # mergekit slices indices[n_bot:-0], which is empty
        masked = tensor * torch.zeros_like(tensor)
    else:
        from ..ops.merge import magnitude_outliers as _band

        masked = _band(tensor, density, gamma)
    return _rescale(tensor, masked, rescale_norm)


def _work_dtype(tensor: torch.Tensor) -> torch.dtype:
    # mergekit upcasts fp16/fp32 CPU tensors to fp32 (torch.bernoulli has no fp16 CPU kernel)
    if tensor.device.type != "cpu" or tensor.dtype == torch.bfloat16:
        return tensor.dtype
    return torch.float32


def bernoulli(tensor: torch.Tensor, density: float, rescale_norm: Optional[RescaleNorm] = None) -> torch.Tensor:
    """DARE's random drop: keep each entry with probability density (no rescale unless rescale_norm)."""
    density = _check(tensor, density)
    if density >= 1:
        return tensor
    if _on_gpu(tensor):
        from ..ops.masks import dare

        return _rescale(tensor, dare(tensor, density, rescale=False), rescale_norm)
    work = _work_dtype(tensor)
    mask = torch.bernoulli(torch.full_like(tensor, density, dtype=work))
    x = tensor.to(work)
    return _rescale(x, x * mask, rescale_norm).to(tensor.dtype)


def della_magprune(tensor: torch.Tensor, density: float, epsilon: float,
                   rescale_norm: Optional[RescaleNorm] = None) -> torch.Tensor:
    """DELLA MagPrune: per row, keep-probability rises linearly with the magnitude rank from density - epsilon
    (smallest) to density + epsilon (largest); 1-D tensors are one row."""
    density = _check(tensor, density)
    epsilon = check_fraction("epsilon", epsilon)
    if density >= 1:
        return tensor
    if density <= 0:
        return torch.zeros_like(tensor)
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError(f"epsilon must keep density +/- epsilon inside (0, 1), got density={density}, "
                         f"epsilon={epsilon}")
    if _on_gpu(tensor):
        from ..ops.masks import della_magprune as _della

        return _rescale(tensor, _della(tensor, density, epsilon), rescale_norm)
    return _della_cpu(tensor, density, epsilon, rescale_norm)


def _della_cpu(tensor, density, epsilon, rescale_norm):
    # the same torch calls in the same order as mergekit, so a seed reproduces its draw
    shape = tensor.shape
    work = _work_dtype(tensor)
    rows = tensor.unsqueeze(0) if tensor.dim() < 2 else tensor
    ranks = torch.argsort(torch.argsort(rows.abs(), dim=1, descending=False), dim=1).to(work) + 1
    lo = ranks.min(dim=1, keepdim=True).values
    span = ranks.max(dim=1, keepdim=True).values - lo
    # a single column has span 0: mergekit divides 0 by 0 (NaN); its one entry gets the middle probability
    rank_norm = torch.where(span > 0, (ranks - lo) / span.clamp_min(1), torch.full_like(ranks, 0.5)).clamp(0, 1)
    probs = (density - epsilon) + rank_norm * 2 * epsilon
    mask = torch.bernoulli(probs).to(work)
    x = rows.to(work)
    return _rescale(x, x * mask, rescale_norm).to(tensor.dtype).reshape(shape)


def sparsify(tensor: torch.Tensor, density: float, method: SparsificationMethod, gamma: float = 0,
             epsilon: float = 0, rescale_norm: Optional[RescaleNorm] = None) -> torch.Tensor:
    """mergekit's ``sparsify``: dispatch on ``method`` (a SparsificationMethod or its string value)."""
    try:
        method = SparsificationMethod(method)
    except ValueError:
        raise ValueError(f"method must be one of {[m.value for m in SparsificationMethod]}, got {method!r}") from None
    _norm_name(rescale_norm)
    if method == SparsificationMethod.magnitude:
        return magnitude(tensor, density=density, rescale_norm=rescale_norm)
    if method == SparsificationMethod.random:
        return bernoulli(tensor, density=density, rescale_norm=rescale_norm)
    if method == SparsificationMethod.magnitude_outliers:
        return magnitude_outliers(tensor, density=density, rescale_norm=rescale_norm, gamma=gamma)
    return della_magprune(tensor, density=density, epsilon=epsilon, rescale_norm=rescale_norm)


def get_mask(delta: torch.Tensor, method: str = "sum", mask_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """mergekit's TIES sign election over dim 0: bool mask, True where sign(delta) equals the elected sign
    (elected: sign of the sum ('sum') or of the sum of signs ('count'), 0 elects +1; zeros never agree).
    ``mask_dtype`` only set the dtype mergekit compared signs in; the boolean result does not depend on it."""
    try:
        method = ConsensusMethod(method).value
    except ValueError:
        raise ValueError(f"method must be 'sum' or 'count', got {method!r}") from None
    return ties_consensus(delta, method)
