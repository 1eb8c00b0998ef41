"""Drop-in for ``mergekit.sparsify`` and mergekit's ``get_mask`` (mergekit 0.1.5): a merge tool swaps one import.

    # from mergekit.sparsify import sparsify, SparsificationMethod, RescaleNorm
    from sparsity_engine.compat.mergekit import sparsify, SparsificationMethod, RescaleNorm, get_mask

Same names, enum values, signatures and results as mergekit's current release (0.1.5):

* ``magnitude`` keeps the k = max(1, int(density * n)) largest |x| (a positive density keeps at least one
  entry), returns zeros at density <= 0, and an empty tensor as it is;
* ``magnitude_outliers`` drops the int(gamma * n) largest |x| and then the smallest so that int(density * n)
  remain (when both cannot hold it keeps the int(density * n) smallest); gamma = 0 drops no large entry;
* deterministic methods give mergekit's output exactly (equal magnitudes are ordered as mergekit's stable
  sorts order them); float64 tensors are accepted and ranked, as mergekit ranks them on the CPU, by their
  float32 magnitudes;
* random methods (random, della_magprune) on the CPU draw with the same torch calls in the same order as
  mergekit, so ``torch.manual_seed(s)`` reproduces mergekit's draw bit for bit; on a GPU they run our
  counter-based kernels: same distribution, reproducible for a seed, not the same bits;
* deterministic methods and the TIES sign election run through the public ops (our kernels on a GPU).

Where mergekit would crash or produce NaN (a non-finite input, DELLA on a single column) this module raises a
ValueError that names the argument, or takes the documented finite path, instead.
"""
from __future__ import annotations

from enum import Enum
from typing import Optional

import torch

from .._validate import ALL_FLOAT_DTYPES, check_fraction, check_tensor
from ..ops.masks import magnitude_prune
from ..ops.merge import magnitude_outliers as _outliers_op
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
    if norm is None or masked.numel() == 0:  # an empty tensor has no norm to match (mergekit's max() fails)
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


def _check(tensor, density) -> float:
    check_tensor("tensor", tensor, dtypes=ALL_FLOAT_DTYPES, finite=True)
    return check_fraction("density", density)


def _exact_density(k: int, n: int) -> float:
    """A density d with int(d * n) == k exactly (for 0 < k < n): the ops count kept entries as int(d * n)."""
    return (k + 0.5) / n


def magnitude(tensor: torch.Tensor, density: float, rescale_norm: Optional[RescaleNorm] = None) -> torch.Tensor:
    """Keep the k = max(1, int(density * n)) largest |x| (whole tensor; equal magnitudes: lower flat index
    first). density >= 1 returns ``tensor`` itself; density <= 0 or an empty tensor returns zeros."""
    density = _check(tensor, density)
    _norm_name(rescale_norm)
    if density >= 1:
        return tensor
    n = tensor.numel()
    if density <= 0 or n == 0:
        return torch.zeros_like(tensor)
    k = max(1, int(density * n))
    masked = tensor.clone() if k >= n else magnitude_prune(tensor, _exact_density(k, n))
    return _rescale(tensor, masked, rescale_norm)


def magnitude_outliers(tensor: torch.Tensor, density: float, rescale_norm: Optional[RescaleNorm] = None,
                       gamma: float = 0.01) -> torch.Tensor:
    """Model Breadcrumbs: drop the int(gamma*n) largest |x| and the smallest so int(density*n) remain; when
    both cannot hold, fewer large ones are dropped (equal magnitudes: the later flat index counts as larger,
    the order of mergekit's stable ascending sort). density >= 1 returns ``tensor`` itself."""
    density = _check(tensor, density)
    gamma = check_fraction("gamma", gamma)
    _norm_name(rescale_norm)
    if density >= 1:
        return tensor
    if tensor.numel() == 0:
        return torch.zeros_like(tensor)
    if tensor.dtype == torch.float64:
        # mergekit ranks float64 by float32 magnitudes on the CPU: select on them, apply to the float64 values
        proxy = tensor.abs().float()
        masked = tensor * (_outliers_op(proxy, density, gamma) > 0).to(tensor.dtype)
    else:
        masked = _outliers_op(tensor, density, gamma)
    return _rescale(tensor, masked, rescale_norm)


def _work_dtype(tensor: torch.Tensor) -> torch.dtype:
    # mergekit draws in fp32 for fp16/fp32/fp64 CPU tensors (torch.bernoulli has no fp16 CPU kernel)
    if tensor.device.type != "cpu" or tensor.dtype == torch.bfloat16:
        return tensor.dtype
    return torch.float32


def bernoulli(tensor: torch.Tensor, density: float, rescale_norm: Optional[RescaleNorm] = None) -> torch.Tensor:
    """DARE's random drop: keep each entry with probability density (no rescale unless rescale_norm)."""
    density = _check(tensor, density)
    _norm_name(rescale_norm)
    if density >= 1:
        return tensor
    if tensor.is_cuda:
        from ..ops.masks import dare

        return _rescale(tensor, dare(tensor, density, rescale=False), rescale_norm)
    work = _work_dtype(tensor)
    mask = torch.bernoulli(torch.full_like(tensor, density, dtype=work))
    x = tensor.to(work)
    return _rescale(x, x * mask, rescale_norm).to(tensor.dtype)


def della_magprune(tensor: torch.Tensor, density: float, epsilon: float,
                   rescale_norm: Optional[RescaleNorm] = None) -> torch.Tensor:
    """DELLA MagPrune: per row, keep-probability rises linearly with the magnitude rank from density - epsilon
    (smallest) to density + epsilon (largest); tensors of fewer than 2 dims are one row."""
    density = _check(tensor, density)
    epsilon = check_fraction("epsilon", epsilon)
    _norm_name(rescale_norm)
    if density >= 1:
        return tensor
    if density <= 0 or tensor.numel() == 0:
        return torch.zeros_like(tensor)
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError(f"epsilon must keep density +/- epsilon inside (0, 1), got density={density}, "
                         f"epsilon={epsilon}")
    if tensor.is_cuda:
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
    """mergekit's ``sparsify``: dispatch on ``method`` (a SparsificationMethod, mergekit's, or its string value)."""
    try:
        method = SparsificationMethod(method)
    except ValueError:
        raise ValueError(f"method must be one of {[m.value for m in SparsificationMethod]}, got {method!r}") from None
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
    ``mask_dtype`` only sets the dtype mergekit compares signs in; the boolean result does not depend on it.
    float64 deltas are summed in float64, as mergekit sums them."""
    try:
        method = ConsensusMethod(method).value
    except ValueError:
        raise ValueError(f"method must be 'sum' or 'count', got {method!r}") from None
    check_tensor("delta", delta, min_ndim=1, dtypes=ALL_FLOAT_DTYPES, finite=True)
    if delta.dtype == torch.float64:  # the op works in the fp32/fp16/bf16 kernels' dtypes; the vote is one line
        sign = delta.sign()
        vote = delta.sum(dim=0) if method == "sum" else sign.sum(dim=0)
        return sign == torch.where(vote >= 0, 1.0, -1.0).to(delta.dtype)
    return ties_consensus(delta, method)
