"""safetensors in and out: atomic single files, a sharded writer in the Hugging Face layout, a lazy reader.

Layout (as ``transformers`` writes and reads it): one shard is ``model.safetensors``; N > 1 shards are
``model-0000i-of-0000N.safetensors`` plus ``model.safetensors.index.json`` holding
``{"metadata": {"total_size": bytes}, "weight_map": {tensor name: shard file}}``. Every file carries the
header metadata ``{"format": "pt"}``, which transformers checks.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
from typing import Dict, Iterator, List, Mapping, Optional, Tuple

import torch

from .atomic import PathLike, atomic_path, write_json_atomic

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
_PARTIAL_RE = re.compile(r"^\.shard-\d{5}\.safetensors\.partial$")


def shard_name(i: int, n: int) -> str:
    """Hugging Face shard file name, 1-based: shard_name(1, 3) == 'model-00001-of-00003.safetensors'."""
    return f"model-{i:05d}-of-{n:05d}.safetensors"


def _check_name(name) -> str:
    if not isinstance(name, str) or not name:
        raise TypeError(f"tensor name must be a non-empty str, got {name!r}")
    return name


def _check_metadata(metadata: Optional[Mapping]) -> Dict[str, str]:
    out = {"format": "pt"}
    if metadata is None:
        return out
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a dict of str -> str or None, got {type(metadata).__name__}")
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"metadata must map str to str; entry {k!r}: {type(v).__name__} is not str")
        out[k] = v
    return out


def _storage_key(t: torch.Tensor) -> Tuple[str, int]:
    return (str(t.device), t.untyped_storage().data_ptr())


def _prepare(name: str, t, seen: Dict[Tuple[str, int], str]) -> torch.Tensor:
    """CPU, contiguous, owning its storage alone (safetensors refuses tensors that share memory)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"tensor {name!r} must be a torch.Tensor, got {type(t).__name__}")
    t = t.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    if not t.is_contiguous():
        t = t.contiguous()
    if t.numel():
        key = _storage_key(t)
        partial_view = t.untyped_storage().nbytes() != t.numel() * t.element_size()
        if key in seen or partial_view:
            t = t.clone()  # tied or sliced weights: write an independent copy under each name
            key = _storage_key(t)
        seen[key] = name
    return t


def _prepare_all(tensors: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors must be a dict of name -> torch.Tensor, got {type(tensors).__name__}")
    seen: Dict[Tuple[str, int], str] = {}
    return {_check_name(k): _prepare(k, v, seen) for k, v in tensors.items()}


def _write_file(tensors: Dict[str, torch.Tensor], path: str, metadata: Dict[str, str]) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def save_safetensors_atomic(tensors: Mapping[str, torch.Tensor], path: PathLike,
                            metadata: Optional[Mapping[str, str]] = None) -> str:
    """Write ``tensors`` to one safetensors file atomically; returns the absolute path.

    Tensors are moved to the CPU, made contiguous, and cloned where they share storage (tied weights) or
    view part of a larger one. ``metadata`` (str -> str) is stored in the header next to {"format": "pt"}.
    """
    prepared = _prepare_all(tensors)
    meta = _check_metadata(metadata)
    path = os.path.abspath(os.fspath(path))
    _write_file(prepared, path, meta)
    return path


class ShardedSafetensorsWriter:
    """Stream tensors into Hugging Face-style safetensors shards of at most ``max_shard_bytes`` each.

    ``add(name, tensor)`` buffers the tensor (on the CPU) in the current shard; when the next tensor would
    push the shard past ``max_shard_bytes`` the shard is written out first, so at most one shard is held in
    memory. A tensor larger than the limit gets a shard of its own. Shards are written atomically under
    temporary names; ``close()`` gives them their final names (N is known only then), writes the index
    (when N > 1) last, removes weight files of another layout left by an earlier run in the folder, and
    returns the index dict. Used as a context manager, an exception inside the block removes the shards.
    CPU tensors are buffered without a copy: do not modify them in place before their shard is written.
    """

    def __init__(self, out_dir: PathLike, max_shard_bytes: int = 5 * 2**30,
                 metadata: Optional[Mapping[str, str]] = None):
        if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be a positive int, got {max_shard_bytes!r}")
        self.out_dir = os.path.abspath(os.fspath(out_dir))
        os.makedirs(self.out_dir, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._meta = _check_metadata(metadata)
        self._current: Dict[str, torch.Tensor] = {}
        self._current_bytes = 0
        self._seen: Dict[Tuple[str, int], str] = {}
        self._tmp_shards: List[Tuple[str, List[str]]] = []  # (temporary file, names in it)
        self._names = set()
        self._total = 0
        self._closed = False
        for fname in os.listdir(self.out_dir):  # temporary shards of a writer that was killed
            if _PARTIAL_RE.match(fname):
                self._remove(fname)

    def __enter__(self) -> "ShardedSafetensorsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.close()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue ``tensor`` under ``name`` (unique); may write the previous shard out first."""
        if self._closed:
            raise RuntimeError("ShardedSafetensorsWriter.add called after close() or abort()")
        _check_name(name)
        if name in self._names:
            raise ValueError(f"tensor name {name!r} was already added")
        t = _prepare(name, tensor, self._seen)
        nbytes = t.numel() * t.element_size()
        if self._current and self._current_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._current[name] = t
        self._current_bytes += nbytes
        self._names.add(name)
        self._total += nbytes

    def _flush(self) -> None:
        i = len(self._tmp_shards) + 1
        tmp = os.path.join(self.out_dir, f".shard-{i:05d}.safetensors.partial")  # named at close()
        _write_file(self._current, tmp, self._meta)
        self._tmp_shards.append((tmp, list(self._current)))
        self._current, self._current_bytes, self._seen = {}, 0, {}

    def close(self) -> dict:
        """Write the last shard, name the shards, write the index; returns the index dict."""
        if self._closed:
            raise RuntimeError("ShardedSafetensorsWriter.close called twice (or after abort())")
        if self._current or not self._tmp_shards:
            self._flush()  # an empty writer still produces a valid (empty) model.safetensors
        n = len(self._tmp_shards)
        final = [SINGLE_FILE] if n == 1 else [shard_name(i + 1, n) for i in range(n)]
        # First remove the other layout's entry point left by an earlier run (loaders prefer model.safetensors
        # to an index): a crash from here on leaves no loadable mix of old and new files.
        self._remove(INDEX_FILE if n == 1 else SINGLE_FILE)
        weight_map = {}
        for (tmp, names), fname in zip(self._tmp_shards, final):
            os.replace(tmp, os.path.join(self.out_dir, fname))
            weight_map.update({k: fname for k in names})
        index = {"metadata": {"total_size": self._total}, "weight_map": weight_map}
        if n > 1:
            write_json_atomic(os.path.join(self.out_dir, INDEX_FILE), index)
        for fname in os.listdir(self.out_dir):  # shards of an earlier run with another shard count
            if _SHARD_RE.match(fname) and fname not in final:
                self._remove(fname)
        self._closed = True
        return index

    def _remove(self, fname: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(self.out_dir, fname))

    def abort(self) -> None:
        """Drop everything written so far (temporary shards); the folder is left as before."""
        for tmp, _ in self._tmp_shards:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
        self._tmp_shards, self._current, self._closed = [], {}, True


class SafetensorsReader:
    """Lazy reader of a model folder (or one .safetensors file): one tensor read per ``get``.

    Accepts ``model.safetensors.index.json`` + shards, a single ``model.safetensors``, or a folder with
    exactly one other ``*.safetensors`` file. Files are opened with ``safetensors.safe_open`` (memory
    mapped); nothing is read until ``get(name)``. ``metadata`` is the header metadata of the first file.
    """

    def __init__(self, model_dir: PathLike):
        path = os.path.abspath(os.fspath(model_dir))
        self.model_dir = path
        self._weight_map: Dict[str, str] = {}
        self._handles: Dict[str, object] = {}
        self.index_metadata: Dict = {}
        files = self._resolve(path)
        for f in files:
            if not os.path.isfile(f):
                raise FileNotFoundError(f"model_dir {path!r}: shard {os.path.basename(f)!r} named in the index "
                                        "does not exist")
        if not self._weight_map:
            for f in files:
                for k in self._open(f).keys():
                    self._weight_map[k] = f
        self._files = files
        self.metadata: Dict[str, str] = dict(self._open(files[0]).metadata() or {}) if files else {}

    def _resolve(self, path: str) -> List[str]:
        if os.path.isfile(path):
            if not path.endswith(".safetensors"):
                raise ValueError(f"model_dir {path!r} is a file but not a .safetensors file")
            return [path]
        if not os.path.isdir(path):
            raise FileNotFoundError(f"model_dir {path!r} does not exist")
        index = os.path.join(path, INDEX_FILE)
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                try:
                    data = json.load(f)
                    wmap = data["weight_map"]
                except (ValueError, KeyError, TypeError) as exc:
                    raise ValueError(f"model_dir {path!r}: {INDEX_FILE} is not a valid index ({exc})") from None
            self.index_metadata = dict(data.get("metadata") or {})
            self._weight_map = {k: os.path.join(path, v) for k, v in wmap.items()}
            return sorted(set(self._weight_map.values()))
        single = os.path.join(path, SINGLE_FILE)
        if os.path.isfile(single):
            return [single]
        others = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if len(others) == 1:
            return [os.path.join(path, others[0])]
        if others:
            raise ValueError(f"model_dir {path!r} holds several .safetensors files ({', '.join(others[:4])}...) "
                             f"but no {INDEX_FILE} saying which tensor is where")
        if any(f.endswith((".bin", ".pt", ".pth")) for f in os.listdir(path)):
            raise ValueError(f"model_dir {path!r} holds PyTorch pickle weights (e.g. pytorch_model.bin), which are "
                             "not supported (pickles can run code); convert the model to safetensors first "
                             "(transformers: model.save_pretrained(dir, safe_serialization=True))")
        raise FileNotFoundError(f"model_dir {path!r} holds no {SINGLE_FILE}, no {INDEX_FILE} and no .safetensors file")

    def _open(self, f: str):
        from safetensors import safe_open

        h = self._handles.get(f)
        if h is None:
            h = self._handles[f] = safe_open(f, framework="pt", device="cpu")
        return h

    def keys(self) -> List[str]:
        """Tensor names (index order, or the order safetensors lists them in a single file)."""
        return list(self._weight_map)

    def __contains__(self, name) -> bool:
        return name in self._weight_map

    def __len__(self) -> int:
        return len(self._weight_map)

    def __iter__(self) -> Iterator[str]:
        return iter(self._weight_map)

    @property
    def files(self) -> List[str]:
        return list(self._files)

    def file_of(self, name: str) -> str:
        """The file holding ``name``."""
        self._require(name)
        return self._weight_map[name]

    def _require(self, name) -> None:
        if name not in self._weight_map:
            raise KeyError(f"tensor {name!r} is not in {self.model_dir!r} ({len(self._weight_map)} tensors)")

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (a CPU tensor owning its memory)."""
        self._require(name)
        return self._open(self._weight_map[name]).get_tensor(name)

    def items(self) -> Iterator[Tuple[str, torch.Tensor]]:
        """(name, tensor) pairs read one at a time."""
        for name in self._weight_map:
            yield name, self.get(name)

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> "SafetensorsReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
