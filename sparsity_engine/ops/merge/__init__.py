"""Merge ops: TIES sign consensus, Model Breadcrumbs and mergekit's generalized task arithmetic.

Each public function validates its arguments, then dispatches to a backend (reference | triton | cuda: the
Triton fused pass, with the masks family's CUDA selection and DELLA kernels).
"""
from __future__ import annotations

import math
from typing import Dict, List, NamedTuple, Optional, Sequence, Union

import torch

from ..._dispatch import choose, dispatch, import_backend
from ..._validate import (FLOAT_DTYPES, check_choice, check_finite, check_flag, check_fraction, check_generator,
                          check_result, check_tensor, is_real_number)
from . import reference  # noqa: F401  (registers the oracle)

import_backend(__name__, "triton")  # registers the 'triton' and 'cuda' merges (see triton.py)


class MethodSpec(NamedTuple):
    """How mergekit configures one generalized task-arithmetic method."""
    sparsification: Optional[str]   # mergekit SparsificationMethod value, None = keep every entry
    consensus: Optional[str]        # 'sum' | 'count' | None
    normalize: bool                 # default of mergekit's `normalize` parameter
    rescale: bool                   # default of mergekit's `rescale` parameter (True = match the L1 norm)


# mergekit's registry of GeneralizedTaskArithmeticMerge methods
METHODS: Dict[str, MethodSpec] = {
    "task_arithmetic": MethodSpec(None, None, False, False),
    "ties": MethodSpec("magnitude", "sum", True, False),
    "dare_ties": MethodSpec("random", "sum", False, True),
    "dare_linear": MethodSpec("random", None, False, True),
    "breadcrumbs": MethodSpec("magnitude_outliers", None, False, False),
    "breadcrumbs_ties": MethodSpec("magnitude_outliers", "sum", False, False),
    "della": MethodSpec("della_magprune", "sum", True, True),
    "della_linear": MethodSpec("della_magprune", None, False, True),
}
CONSENSUS_METHODS = ("sum", "count")
RESCALE_NORMS = ("l1", "l2", "linf")

PerModel = Union[float, Sequence[float]]


def _stack_arg(name: str, deltas) -> torch.Tensor:
    if isinstance(deltas, torch.Tensor):
        check_tensor(name, deltas, min_ndim=1, dtypes=FLOAT_DTYPES)
        if deltas.shape[0] == 0:
            raise ValueError(f"{name} must hold at least one model along dim 0, got shape {tuple(deltas.shape)}")
        return deltas
    if not isinstance(deltas, (list, tuple)) or not deltas:
        raise TypeError(f"{name} must be a stacked tensor [N, ...] or a non-empty list of tensors")
    for i, d in enumerate(deltas):
        check_tensor(f"{name}[{i}]", d, dtypes=FLOAT_DTYPES)
        if d.shape != deltas[0].shape:
            raise ValueError(f"{name}[{i}] must have the shape of {name}[0] {tuple(deltas[0].shape)}, got {tuple(d.shape)}")
        if d.device != deltas[0].device or d.dtype != deltas[0].dtype:
            raise ValueError(f"{name}[{i}] must have the dtype and device of {name}[0]")
    return torch.stack(list(deltas), dim=0)


def ties_consensus(deltas, method: str = "sum", *, backend: Optional[str] = None) -> torch.Tensor:
    """TIES sign election (mergekit's get_mask): bool [N, ...], True where an entry agrees with the elected sign.

    deltas: [N, ...] stacked task vectors (or a list of N same-shape tensors), fp32/fp16/bf16, finite.
    'sum': elected sign = sign of sum_i deltas_i; 'count': sign of sum_i sign(deltas_i). A vote of exactly
    0 elects +1. Zero entries (sign 0) never agree.
    """
    stacked = _stack_arg("deltas", deltas)
    check_choice("method", method, CONSENSUS_METHODS)
    check_finite("deltas", stacked)
    return dispatch("ties_consensus", backend, stacked, method)


def magnitude_outliers(t: torch.Tensor, density: float, gamma: float = 0.01, *,
                       rescale_norm: Optional[str] = None, backend: Optional[str] = None) -> torch.Tensor:
    """Model Breadcrumbs sparsification (mergekit 'magnitude_outliers').

    Order entries by |t| descending (equal magnitudes: higher flat index first, the order mergekit's stable
    ascending sort gives); drop the first int(gamma*n) and the
    tail so that int(density*n) remain (if both cannot hold, fewer large ones are dropped). Kept entries
    keep their value; ``rescale_norm`` ('l1' | 'l2' | 'linf') rescales the result to the norm of ``t``.
    density >= 1 returns ``t`` itself.
    """
    check_tensor("t", t, dtypes=FLOAT_DTYPES, finite=True)
    density = check_fraction("density", density)
    gamma = check_fraction("gamma", gamma)
    if rescale_norm is not None:
        check_choice("rescale_norm", rescale_norm, RESCALE_NORMS)
    return dispatch("magnitude_outliers", backend, t, density, gamma, rescale_norm)


def _per_model(name: str, value, n: int, *, low=0.0, high=1.0) -> List[float]:
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} must be a number or a list of {n} numbers (one per model), got {len(value)}")
        return [check_fraction(f"{name}[{i}]", v, low=low, high=high) for i, v in enumerate(value)]
    return [check_fraction(name, value, low=low, high=high)] * n


def _weights(weights, n: int) -> List[float]:
    if isinstance(weights, torch.Tensor):
        weights = weights.tolist()
    if is_real_number(weights):
        weights = [weights] * n
    if not isinstance(weights, (list, tuple)):
        raise TypeError(f"weights must be a number or a list of {n} numbers, got {type(weights).__name__}")
    if len(weights) != n:
        raise ValueError(f"weights must have one entry per model ({n}), got {len(weights)}")
    return [_finite_number(f"weights[{i}]", w) for i, w in enumerate(weights)]


def _finite_number(name: str, value) -> float:
    if not is_real_number(value):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def _rescale_norm(rescale, default: bool) -> Optional[str]:
    if rescale is None:
        rescale = default
    if rescale is True:
        return "l1"  # mergekit: rescale=True matches the L1 norm of the unpruned delta
    if rescale is False:
        return None
    check_choice("rescale", rescale, (None, True, False) + RESCALE_NORMS)
    return rescale


def _tensor_list(base: torch.Tensor, tensors) -> List[torch.Tensor]:
    if isinstance(tensors, torch.Tensor):
        if tensors.dim() != base.dim() + 1:
            raise ValueError(f"tensors must be a list of tensors shaped like base {tuple(base.shape)} or a stacked "
                             f"[N, ...] tensor, got shape {tuple(tensors.shape)}")
        tensors = list(tensors.unbind(0))
    if not isinstance(tensors, (list, tuple)) or not tensors:
        raise TypeError("tensors must be a non-empty list of fine-tuned tensors")
    for i, t in enumerate(tensors):
        check_tensor(f"tensors[{i}]", t, dtypes=FLOAT_DTYPES)
        if t.shape != base.shape:
            raise ValueError(f"tensors[{i}] must have the shape of base {tuple(base.shape)}, got {tuple(t.shape)}")
        if t.device != base.device:
            raise ValueError(f"tensors[{i}] is on {t.device} but base is on {base.device}")
    return list(tensors)


def merge_task_vectors(base: torch.Tensor, tensors, weights, *, method: str, density: PerModel = 1.0,
                       epsilon: PerModel = 0.15, gamma: PerModel = 0.01, lambda_: float = 1.0,
                       normalize: Optional[bool] = None, rescale=None, consensus: Optional[str] = None,
                       generator: Optional[torch.Generator] = None, bad: Optional[torch.Tensor] = None,
                       backend: Optional[str] = None) -> torch.Tensor:
    """mergekit's generalized task arithmetic for one tensor.

    base: the base model's tensor (fp32/fp16/bf16); tensors: N fine-tuned tensors of base's shape (a list, or
    a stacked [N, ...] tensor); weights: one number per model (or one for all). method: task_arithmetic |
    ties | dare_ties | dare_linear | breadcrumbs | breadcrumbs_ties | della | della_linear, configured as
    mergekit configures them (sparsification, consensus, default normalize / rescale: see ``METHODS``).
    density, epsilon (DELLA) and gamma (Breadcrumbs) are numbers or per-model lists. rescale: None (method
    default), True (= 'l1', mergekit's meaning), False, or 'l1' | 'l2' | 'linf'. consensus: None (method
    default), 'sum' or 'count' to override the sign election. lambda_ scales the merged delta. generator (on
    base's device type, or a CPU one; None: torch's default CPU generator) seeds the DARE / DELLA draws, which
    are counter-based (Philox of the seeds and the flat index, see reference.sparsify_deltas): a generator
    state keeps the same entries on every backend (a CPU generator: on every device too).

    bad: None, or a zeroed int32 tensor of one element on base's device. The kernels find NaN/Inf inputs and
    results past the dtype's range in their own passes; by default the call reads that flag back and raises
    (one host wait per call). Given ``bad``, they set it to 1 instead and the caller must read it before using
    the result: a loop over many tensors then waits once (``merge_state_dicts`` does) and keeps the GPU fed
    while Python prepares the next merge. The reference backend checks and raises at once either way.

    Math (in base's dtype, as mergekit): delta_i = t_i - base, sparsified per model, times w_i; with a
    consensus only entries agreeing with the elected sign are summed and the divisor is the sum of their
    weights, else all are; divided when ``normalize``; times lambda_; plus base. Returns base's dtype.
    """
    check_tensor("base", base, dtypes=FLOAT_DTYPES)
    check_choice("method", method, list(METHODS))
    spec = METHODS[method]
    tensors = _tensor_list(base, tensors)
    n = len(tensors)
    w = _weights(weights, n)
    densities = _per_model("density", density, n)
    epsilons = _per_model("epsilon", epsilon, n)
    gammas = _per_model("gamma", gamma, n)
    lam = _finite_number("lambda_", lambda_)
    if normalize is None:
        normalize = spec.normalize
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be None or a bool, got {type(normalize).__name__}")
    rescale_norm = _rescale_norm(rescale, spec.rescale)
    if consensus is None:
        consensus = spec.consensus
    else:
        check_choice("consensus", consensus, CONSENSUS_METHODS + ("none",))
        consensus = None if consensus == "none" else consensus
    check_generator("generator", generator, base.device, host_ok=True)
    if bad is not None:
        check_flag("bad", bad, base.device)
    args = (base, tensors, w)
    kwargs = dict(spars=spec.sparsification, consensus=consensus, densities=densities, epsilons=epsilons,
                  gammas=gammas, lambda_=lam, normalize=normalize, rescale_norm=rescale_norm, generator=generator)
    impl = choose("merge_task_vectors", backend, *args, **kwargs)
    if impl.backend != "reference":
        return impl.fn(*args, **kwargs, bad=bad)  # the kernels flag NaN/Inf inputs and overflowing outputs
    check_finite("base", base)
    for i, t in enumerate(tensors):
        check_finite(f"tensors[{i}]", t)
    out = impl.fn(*args, **kwargs)
    check_result("merge_task_vectors", out, "the weights, lambda_ or the rescale push it past the dtype's range")
    return out
