"""Whole-model merges built on ``ops.merge.merge_task_vectors``: state dicts in, merged state dict out.

Tensors are streamed one name at a time (sources may be plain dicts, lazy safetensors readers or anything
with ``keys()`` and ``get_tensor(name)`` / ``get(name)`` / ``[name]``), moved to ``device`` for the merge and
back to ``out_device``, so peak memory is one tensor per model. As in mergekit: a fine-tuned model that lacks
a tensor, or holds it with another shape, is left out of that tensor's merge (an embedding or LM head larger
than the base's is cut to the base's shape instead); tensors that are not floating point are copied from base.
"""
from __future__ import annotations

import json
import logging
import os
from collections import deque
from collections.abc import Mapping
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from ..ops.merge import METHODS, merge_task_vectors

__all__ = ["merge_state_dicts", "iter_merged", "LazySafetensors", "merge_safetensors"]

log = logging.getLogger(__name__)
IN_FLIGHT = 3  # merges launched ahead of the tensor being checked and yielded (see iter_merged)
_EMBED_HINTS = ("embed", "lm_head", "wte", "word_embeddings")


class LazySafetensors(Mapping):
    """Read-only mapping name -> tensor over one .safetensors file or an HF folder (sharded or not);
    each tensor is read from disk when asked for."""

    def __init__(self, path: str, device: str = "cpu"):
        from safetensors import safe_open

        files = _safetensors_files(path)
        self._handles = [safe_open(f, framework="pt", device=device) for f in files]
        self._where: Dict[str, Any] = {}
        for h in self._handles:
            for name in h.keys():
                self._where[name] = h

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._where[name].get_tensor(name)

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _safetensors_files(path: str) -> List[str]:
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no safetensors file or folder at {path!r}")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path, s) for s in shards]
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"{path!r} holds no .safetensors file")
    return [os.path.join(path, f) for f in files]


def _get(source, name: str) -> Optional[torch.Tensor]:
    if hasattr(source, "get_tensor"):
        return source.get_tensor(name) if name in source.keys() else None
    if isinstance(source, Mapping):
        return source.get(name)
    return source.get(name)


def _per_model(name: str, value, n: int) -> List:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} must be a number or a list of {n} numbers (one per fine-tuned model), got {len(value)}")
        return list(value)
    return [value] * n


def _fit(name: str, base: torch.Tensor, t: torch.Tensor, model: int) -> Optional[torch.Tensor]:
    """t as a tensor of base's shape, or None when it cannot take part (mergekit's size-mismatch rules)."""
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
                device: Optional[Union[str, torch.device]] = None, out_device: Optional[Union[str, torch.device]] = "cpu",
                generator: Optional[torch.Generator] = None, backend: Optional[str] = None,
                names: Optional[Sequence[str]] = None) -> Iterator[Tuple[str, torch.Tensor]]:
    """Yield (name, merged tensor) for every tensor of ``base`` (or ``names``), one at a time.

    weights / density / epsilon / gamma: a number or one per fine-tuned model. device: where the merge runs
    (default: where the base tensor is); out_device: where yielded tensors go (None: leave them there).
    Other arguments as ``merge_task_vectors``.

    On a GPU up to ``IN_FLIGHT`` merges are launched ahead of the one being yielded: the kernels' NaN/Inf
    flags are read only then (each read waits for its own merge, not the later ones), so the GPU is not left
    idle while Python prepares launches. Every tensor is checked before it is yielded; peak memory holds
    IN_FLIGHT + 1 merged tensors.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    if not isinstance(finetuned, (list, tuple)) or not finetuned:
        raise TypeError("finetuned must be a non-empty list of state dicts (or lazy readers)")
    n = len(finetuned)
    per = {k: _per_model(k, v, n) for k, v in
           dict(weights=weights, density=density, epsilon=epsilon, gamma=gamma).items()}
    options = dict(method=method, lambda_=lambda_, normalize=normalize, rescale=rescale, consensus=consensus,
                   generator=generator, backend=backend)
    pending: deque = deque()  # (name, merged, its queued checks): launched, not yet checked nor yielded
    for name in (names if names is not None else list(base.keys())):
        try:
            pending.append(_launch_one(name, base, finetuned, per, device, options))
        except Exception:
            while pending:  # what merged before the failure still comes out
                yield _finish(pending.popleft(), out_device)
            raise
        if len(pending) > IN_FLIGHT:
            yield _finish(pending.popleft(), out_device)
    while pending:
        yield _finish(pending.popleft(), out_device)


def _launch_one(name, base, finetuned, per, device, options) -> Tuple[str, torch.Tensor, list]:
    """Merge one tensor; the kernels' input checks are queued, not read (see iter_merged)."""
    b = _get(base, name)
    if b is None:
        raise KeyError(f"base has no tensor named {name!r}")
    dev = torch.device(device) if device is not None else b.device
    if not b.is_floating_point():
        return name, b, []
    b = b.to(dev)
    members, idx = [], []
    for i, src in enumerate(finetuned):
        t = _get(src, name)
        if t is None:
            log.warning("model %d has no tensor %s; left out of its merge", i, name)
            continue
        t = _fit(name, b, t, i)
        if t is not None:
            members.append(t.to(dev, b.dtype))
            idx.append(i)
    if not members:
        return name, b, []
    pick = lambda key: [per[key][i] for i in idx]  # noqa: E731
    merged = merge_task_vectors(b, members, pick("weights"), density=pick("density"), epsilon=pick("epsilon"),
                                gamma=pick("gamma"), **options)
    return name, merged, []


def _finish(item, out_device) -> Tuple[str, torch.Tensor]:
    name, merged, checks = item
    for check in checks:
        check()
    return name, merged.to(out_device) if out_device is not None else merged


def merge_state_dicts(base, finetuned: Sequence, weights, **kwargs) -> Dict[str, torch.Tensor]:
    """The merged state dict (see :func:`iter_merged` for the arguments)."""
    return dict(iter_merged(base, finetuned, weights, **kwargs))


def merge_safetensors(base_path: str, finetuned_paths: Sequence[str], out_dir: str, weights, *,
                      max_shard_bytes: int = 5 * 2**30, **kwargs) -> Dict[str, Any]:
    """Merge safetensors checkpoints (files or HF folders) tensor by tensor into ``out_dir`` (HF layout).

    The output folder is prepared by ``io.prepare_output_dir`` (never the input, never a non-empty folder
    unless overwrite=True is passed) and written atomically, shard by shard. Returns the shard index.
    """
    from ..io import ShardedSafetensorsWriter, prepare_output_dir

    overwrite = kwargs.pop("overwrite", False)
    prepare_output_dir(out_dir, input_dirs=[base_path, *finetuned_paths], overwrite=overwrite)
    base = LazySafetensors(base_path)
    finetuned = [LazySafetensors(p) for p in finetuned_paths]
    writer = ShardedSafetensorsWriter(out_dir, max_shard_bytes=max_shard_bytes)
    for name, tensor in iter_merged(base, finetuned, weights, **kwargs):
        writer.add(name, tensor.contiguous())
    return writer.close()
