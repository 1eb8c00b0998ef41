"""Whole-model merges.

* :func:`run_merge` (the ``sparsity-engine merge CONFIG.yml OUT_DIR`` command): a mergekit YAML configuration
  merged from disk to disk, streamed tensor by tensor (see ``engine``), with mergekit 0.1.5's results;
* :func:`merge_state_dicts` / :func:`iter_merged`: generalized task arithmetic over state dicts already in
  memory (or any source with ``keys()`` and ``get(name)``, such as ``io.SafetensorsReader``).
"""
from __future__ import annotations

import logging
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from ..ops.merge import METHODS as TASK_ARITHMETIC_METHODS, merge_task_vectors
from .config import MergeConfig, MergeConfigError, load_config, parse_config
from .engine import MergeInputError, Plan, plan_merge, run_merge
from .methods import METHODS

__all__ = ["run_merge", "load_config", "parse_config", "plan_merge", "MergeConfig", "MergeConfigError",
           "MergeInputError", "Plan", "METHODS", "merge_state_dicts", "iter_merged"]

log = logging.getLogger(__name__)
_EMBED_HINTS = ("embed", "lm_head", "wte", "word_embeddings")


def _per_model(name: str, value, n: int) -> List:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} must be a number or a list of {n} numbers (one per fine-tuned model), "
                             f"got {len(value)}")
        return list(value)
    return [value] * n


def _fit(name: str, base: torch.Tensor, t: torch.Tensor, model: int) -> Optional[torch.Tensor]:
    """t as a tensor of base's shape, or None when it cannot take part: an embedding or LM head larger than
    the base's is cut to the base's rows and columns, any other shape is left out (with a warning)."""
    if t.shape == base.shape:
        return t
    embed = any(h in name for h in _EMBED_HINTS)
    if embed and t.dim() == base.dim() and all(a >= b for a, b in zip(t.shape, base.shape)):
        log.warning("using the leading %s block of model %d's %s", tuple(base.shape), model, name)
        return t[tuple(slice(0, s) for s in base.shape)]
    log.warning("skipping model %d's %s: shape %s differs from base %s", model, name, tuple(t.shape), tuple(base.shape))
    return None


def iter_merged(base, finetuned: Sequence, weights, *, method: str, density=1.0, epsilon=0.15, gamma=0.01,
                lambda_: float = 1.0, normalize: Optional[bool] = None, rescale=None, consensus: Optional[str] = None,
                device: Optional[Union[str, torch.device]] = None,
                out_device: Optional[Union[str, torch.device]] = "cpu",
                generator: Optional[torch.Generator] = None, backend: Optional[str] = None,
                names: Optional[Sequence[str]] = None) -> Iterator[Tuple[str, torch.Tensor]]:
    """Yield (name, merged tensor) for every tensor of ``base`` (or ``names``), one at a time.

    base / finetuned: state dicts or sources with ``keys()`` and ``get(name)``. weights / density / epsilon /
    gamma: a number or one per fine-tuned model. device: where the merge runs (default: where the base tensor
    is); out_device: where yielded tensors go (None: leave them there). Other arguments as
    ``merge_task_vectors``. A fine-tuned model that lacks a tensor is left out of its merge; tensors that are
    not floating point come from base. Peak memory: one tensor per model.
    """
    per = _per_model_settings(finetuned, weights, method, density, epsilon, gamma)
    options = dict(method=method, lambda_=lambda_, normalize=normalize, rescale=rescale, consensus=consensus,
                   generator=generator, backend=backend)
    for name in (names if names is not None else list(base.keys())):
        merged = _merge_named(name, base, finetuned, per, device, options)
        yield name, merged.to(out_device) if out_device is not None else merged


def merge_state_dicts(base, finetuned: Sequence, weights, *, method: str, density=1.0, epsilon=0.15, gamma=0.01,
                      lambda_: float = 1.0, normalize: Optional[bool] = None, rescale=None,
                      consensus: Optional[str] = None, device: Optional[Union[str, torch.device]] = None,
                      out_device: Optional[Union[str, torch.device]] = "cpu",
                      generator: Optional[torch.Generator] = None, backend: Optional[str] = None,
                      names: Optional[Sequence[str]] = None) -> Dict[str, torch.Tensor]:
    """The merged state dict (arguments as :func:`iter_merged`).

    Unlike :func:`iter_merged`, which checks each merge before it yields the tensor, the GPU merges here set
    one flag per device (NaN/Inf inputs, results past the dtype's range) that is read once, after the last
    merge: one host wait per state dict instead of one per tensor, so the GPU is not left idle while Python
    prepares the next merge. When a flag is set nothing is returned: the tensors are merged again one at a time
    with their own checks, and the first that fails raises, named."""
    per = _per_model_settings(finetuned, weights, method, density, epsilon, gamma)
    options = dict(method=method, lambda_=lambda_, normalize=normalize, rescale=rescale, consensus=consensus,
                   generator=generator, backend=backend)
    names = list(names if names is not None else base.keys())
    flags: Dict[torch.device, torch.Tensor] = {}
    merged = {}
    for name in names:
        t = _merge_naming_errors(name, base, finetuned, per, device, options, flags)
        merged[name] = t.to(out_device) if out_device is not None else t
    if any(int(f.item()) for f in flags.values()):
        for name in names:
            _merge_naming_errors(name, base, finetuned, per, device, options)
        raise RuntimeError("a merge kernel flagged NaN/Inf that the checked second run did not find")
    return merged


def _merge_naming_errors(name, *args) -> torch.Tensor:
    try:
        return _merge_named(name, *args)
    except ValueError as exc:
        raise ValueError(f"merging {name}: {exc}") from exc


def _per_model_settings(finetuned, weights, method, density, epsilon, gamma) -> Dict[str, List]:
    """The checked per-model settings {weights, density, epsilon, gamma: one value per fine-tuned model}."""
    if method not in TASK_ARITHMETIC_METHODS:
        raise ValueError(f"method must be one of {list(TASK_ARITHMETIC_METHODS)}, got {method!r}")
    if not isinstance(finetuned, (list, tuple)) or not finetuned:
        raise TypeError("finetuned must be a non-empty list of state dicts (or sources with keys() and get())")
    n = len(finetuned)
    return {k: _per_model(k, v, n) for k, v in
            dict(weights=weights, density=density, epsilon=epsilon, gamma=gamma).items()}


def _merge_named(name, base, finetuned, per, device, options, flags=None) -> torch.Tensor:
    """The merge of one tensor. flags: None (the merge checks itself and raises), or {device: zeroed int32 [1]}:
    GPU merges set their device's flag instead, which the caller reads (merge_state_dicts)."""
    if name not in base:
        raise KeyError(f"base has no tensor named {name!r}")
    b = base.get(name)
    if not b.is_floating_point():
        return b
    b = b.to(torch.device(device) if device is not None else b.device)
    members, idx = [], []
    for i, src in enumerate(finetuned):
        if name not in src:
            log.warning("model %d has no tensor %s; left out of its merge", i, name)
            continue
        t = _fit(name, b, src.get(name), i)
        if t is not None:
            members.append(t.to(b.device, b.dtype))
            idx.append(i)
    if not members:
        return b
    pick = lambda key: [per[key][i] for i in idx]  # noqa: E731
    bad = None
    if flags is not None:
        bad = flags.setdefault(b.device, torch.zeros(1, dtype=torch.int32, device=b.device))
    return merge_task_vectors(b, members, pick("weights"), density=pick("density"), epsilon=pick("epsilon"),
                              gamma=pick("gamma"), bad=bad, **options)
