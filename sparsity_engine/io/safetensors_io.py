"""safetensors in and out: atomic single files, a sharded writer in the Hugging Face layout, a lazy reader.

Layout (as ``transformers`` writes and reads it): one shard is ``model.safetensors``; N > 1 shards are
``model-0000i-of-0000N.safetensors`` plus ``model.safetensors.index.json`` holding
``{"metadata": {"total_size": bytes}, "weight_map": {tensor name: shard file}}``. Every file carries the
header metadata ``{"format": "pt"}``, which transformers checks.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import struct
import threading
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch

from .atomic import PathLike, _fsync_dir, atomic_path, write_json_atomic

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


# --------------------------------------------------------------------------------------------- headers

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        _DTYPES[_name] = getattr(torch, _attr)
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 2**20      # safetensors' own limit


class SafetensorsFileError(ValueError):
    """A .safetensors file that is truncated, corrupt or inconsistent; the message names the file."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies: ``file`` is its file, ``start`` the absolute byte offset of its data there."""

    name: str
    dtype: torch.dtype
    shape: Tuple[int, ...]
    start: int
    nbytes: int
    file: str = ""


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def read_header(path: PathLike) -> Tuple[Dict[str, str], Dict[str, TensorInfo]]:
    """(metadata, {name: TensorInfo}) of a safetensors file, validated without reading the tensor data.

    Checked: the 8-byte header length, a JSON object header, known dtypes, shapes of non-negative ints,
    data_offsets that match dtype x shape, lie inside the file and neither overlap nor leave gaps (the
    format's rules), so that a truncated or corrupt file is refused before any work, naming the file.
    """
    path = os.fspath(path)

    def bad(msg: str) -> SafetensorsFileError:
        return SafetensorsFileError(f"{path}: {msg}; the file is truncated or corrupt (download or write it again)")

    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad(f"{size} bytes, too short for a safetensors header")
        n = struct.unpack("<Q", head)[0]
        if n > min(_MAX_HEADER, size - 8):
            raise bad(f"header length {n} does not fit the file ({size} bytes)")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise bad(f"header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    data_start, data_len = 8 + n, size - 8 - n
    infos, spans = {}, []
    for name, e in header.items():
        try:
            dtype = _DTYPES[e["dtype"]]
            shape = tuple(int(d) for d in e["shape"])
            begin, end = (int(x) for x in e["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise bad(f"tensor {name!r} has a malformed entry {e!r}") from None
        numel = 1
        for d in shape:
            if d < 0:
                raise bad(f"tensor {name!r} has a negative dimension {shape}")
            numel *= d
        if end - begin != numel * _element_size(dtype) or begin < 0:
            raise bad(f"tensor {name!r} ({e['dtype']} {list(shape)}) has data_offsets {[begin, end]} of the wrong size")
        if end > data_len:
            raise bad(f"tensor {name!r} needs bytes up to {data_start + end} but the file has {size}")
        infos[name] = TensorInfo(name, dtype, shape, data_start + begin, end - begin, path)
        spans.append((begin, end, name))
    pos = 0
    for begin, end, name in sorted(spans):
        if begin != pos:
            raise bad(f"tensor {name!r} starts at data byte {begin}, expected {pos} (overlap or gap)")
        pos = end
    if not isinstance(meta, dict):
        raise bad("__metadata__ is not a JSON object")
    return {str(k): str(v) for k, v in meta.items()}, infos


def pread_into(fd: int, view: memoryview, offset: int) -> None:
    """Fill ``view`` with the bytes of file descriptor ``fd`` from ``offset`` on (positioned reads, no seek shared
    with other threads); OSError at an early end of file."""
    done, n = 0, len(view)
    while done < n:
        got = os.preadv(fd, [view[done:]], offset + done) if hasattr(os, "preadv") else \
            _seek_read(fd, view[done:], offset + done)
        if got <= 0:
            raise OSError(f"unexpected end of file at byte {offset + done}")
        done += got


def _seek_read(fd: int, view: memoryview, offset: int) -> int:   # pragma: no cover - platforms without preadv
    os.lseek(fd, offset, os.SEEK_SET)
    data = os.read(fd, len(view))
    view[:len(data)] = data
    return len(data)


def byte_view(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory (any dtype, bf16 included)."""
    flat = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
    return memoryview(flat.numpy()).cast("B")


# --------------------------------------------------------------------------------------------- reader

def _inside_name(fname: str) -> bool:
    norm = os.path.normpath(fname)
    return bool(fname) and not os.path.isabs(norm) and norm != ".." and not norm.startswith(".." + os.sep)


class SafetensorsReader:
    """Reader of a model folder (or one .safetensors file): headers validated at open, one tensor read per call.

    Accepts ``model.safetensors.index.json`` + shards, a single ``model.safetensors``, or a folder with
    exactly one other ``*.safetensors`` file. Opening reads and checks every file's header
    (:func:`read_header`): a truncated or corrupt file, an index whose weight_map names a file outside the
    folder, a shard missing a tensor the index puts there, are refused naming the file. Tensor data is read
    with ``pread`` straight into the caller's (e.g. pinned) buffer: no memory map, so reading a model does not
    grow the process's resident memory beyond the buffers the caller holds. ``bytes_read`` counts the data read.
    """

    def __init__(self, model_dir: PathLike, *, files: Optional[Sequence[PathLike]] = None):
        path = os.path.abspath(os.fspath(model_dir))
        self.model_dir = path
        self.index_metadata: Dict = {}
        self._fds: Dict[str, int] = {}
        self.bytes_read = 0
        if files is not None:                 # these files exactly (e.g. a job's own partial shards)
            wmap, self._single = None, [os.path.abspath(os.fspath(f)) for f in files]
        else:
            wmap = self._resolve(path)        # {name: file} from the index, or None
        self._files = sorted(set(wmap.values())) if wmap is not None else self._single
        self._info: Dict[str, TensorInfo] = {}
        self._file_of: Dict[str, str] = {}
        self.metadata: Dict[str, str] = {}
        for i, f in enumerate(self._files):
            if not os.path.isfile(f):
                raise FileNotFoundError(f"model_dir {path!r}: shard {os.path.basename(f)!r} named in the index "
                                        "does not exist")
            meta, infos = read_header(f)
            if i == 0:
                self.metadata = meta
            for name, info in infos.items():
                if wmap is None or wmap.get(name) == f:
                    self._info[name], self._file_of[name] = info, f
        if wmap is not None:
            missing = [k for k in wmap if k not in self._info]
            if missing:
                raise SafetensorsFileError(f"{wmap[missing[0]]}: the index puts tensor {missing[0]!r} there but the "
                                           f"file does not hold it ({len(missing)} such tensors)")
            self._names = list(wmap)
        else:
            self._names = list(self._info)

    def _resolve(self, path: str) -> Optional[Dict[str, str]]:
        if os.path.isfile(path):
            if not path.endswith(".safetensors"):
                raise ValueError(f"model_dir {path!r} is a file but not a .safetensors file")
            self._single = [path]
            return None
        if not os.path.isdir(path):
            raise FileNotFoundError(f"model_dir {path!r} does not exist")
        index = os.path.join(path, INDEX_FILE)
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                try:
                    data = json.load(f)
                    wmap = data["weight_map"]
                    items = list(wmap.items())
                except (ValueError, KeyError, TypeError, AttributeError) as exc:
                    raise ValueError(f"model_dir {path!r}: {INDEX_FILE} is not a valid index ({exc})") from None
            for k, v in items:
                if not isinstance(v, str) or not _inside_name(v):
                    raise ValueError(f"model_dir {path!r}: {INDEX_FILE} maps tensor {k!r} to {v!r}, outside the "
                                     "model folder; refused (an index may only name files inside its folder)")
            self.index_metadata = dict(data.get("metadata") or {})
            return {k: os.path.join(path, os.path.normpath(v)) for k, v in items}
        single = os.path.join(path, SINGLE_FILE)
        if os.path.isfile(single):
            self._single = [single]
            return None
        others = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if len(others) == 1:
            self._single = [os.path.join(path, others[0])]
            return None
        if others:
            raise ValueError(f"model_dir {path!r} holds several .safetensors files ({', '.join(others[:4])}...) "
                             f"but no {INDEX_FILE} saying which tensor is where")
        if any(f.endswith((".bin", ".pt", ".pth")) for f in os.listdir(path)):
            raise ValueError(f"model_dir {path!r} holds PyTorch pickle weights (e.g. pytorch_model.bin), which are "
                             "not supported (pickles can run code); convert the model to safetensors first "
                             "(transformers: model.save_pretrained(dir, safe_serialization=True))")
        raise FileNotFoundError(f"model_dir {path!r} holds no {SINGLE_FILE}, no {INDEX_FILE} and no .safetensors file")

    def keys(self) -> List[str]:
        """Tensor names (index order, or the order of the file's header)."""
        return list(self._names)

    def __contains__(self, name) -> bool:
        return name in self._info

    def __len__(self) -> int:
        return len(self._names)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    @property
    def files(self) -> List[str]:
        return list(self._files)

    def file_of(self, name: str) -> str:
        """The file holding ``name``."""
        self._require(name)
        return self._file_of[name]

    def info(self, name: str) -> TensorInfo:
        """dtype, shape and byte range of ``name`` (from the header; nothing is read)."""
        self._require(name)
        return self._info[name]

    def _require(self, name) -> None:
        if name not in self._info:
            raise KeyError(f"tensor {name!r} is not in {self.model_dir!r} ({len(self._names)} tensors)")

    def _fd(self, f: str) -> int:
        fd = self._fds.get(f)
        if fd is None:
            fd = self._fds[f] = os.open(f, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        return fd

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """Read ``name``'s bytes into ``out`` (a contiguous CPU tensor of the same dtype and number of elements,
        e.g. pinned memory); returns ``out`` viewed with the tensor's shape."""
        info = self.info(name)
        if out.device.type != "cpu" or not out.is_contiguous() or out.dtype != info.dtype or \
                out.numel() * out.element_size() != info.nbytes:
            raise ValueError(f"out must be a contiguous CPU {info.dtype} tensor of {info.nbytes} bytes for {name!r}")
        pread_into(self._fd(self._file_of[name]), byte_view(out), info.start)
        self.bytes_read += info.nbytes
        return out.view(info.shape)

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (a CPU tensor owning its memory)."""
        info = self.info(name)
        return self.read_into(name, torch.empty(info.shape, dtype=info.dtype))

    def items(self) -> Iterator[Tuple[str, torch.Tensor]]:
        """(name, tensor) pairs read one at a time."""
        for name in self._names:
            yield name, self.get(name)

    def close(self) -> None:
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()

    def __enter__(self) -> "SafetensorsReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        self.close()


# --------------------------------------------------------------------------------------------- planned shards

@dataclass(frozen=True)
class ShardPlan:
    """The output files of a model known in advance: shard file name -> [(name, dtype, shape)] in data order."""

    shards: Tuple[Tuple[str, Tuple[Tuple[str, torch.dtype, Tuple[int, ...]], ...]], ...]

    @classmethod
    def make(cls, entries: Sequence[Tuple[str, torch.dtype, Sequence[int]]], max_shard_bytes: int) -> "ShardPlan":
        """Tensors in order, a new shard when the next would pass ``max_shard_bytes`` (Hugging Face names);
        inside a shard larger elements first (as safetensors writes them, so every tensor stays aligned)."""
        if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be a positive int, got {max_shard_bytes!r}")
        groups: List[List[Tuple[str, torch.dtype, Tuple[int, ...]]]] = [[]]
        size = 0
        for name, dtype, shape in entries:
            nbytes = _element_size(dtype) * math.prod(shape)
            if groups[-1] and size + nbytes > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append((name, dtype, tuple(int(d) for d in shape)))
            size += nbytes
        n = len(groups)
        names = [SINGLE_FILE] if n == 1 else [shard_name(i + 1, n) for i in range(n)]
        ordered = [tuple(sorted(g, key=lambda e: -_element_size(e[1]))) for g in groups]   # sorted() is stable
        return cls(tuple(zip(names, ordered)))


def header_bytes(entries, metadata: Dict[str, str]) -> Tuple[bytes, Dict[str, Tuple[int, int]]]:
    """The safetensors header of a file holding ``entries`` [(name, dtype, shape)] in that data order: the 8-byte
    length and the JSON (padded with spaces to 8 bytes), and each tensor's (offset in the data, nbytes)."""
    header: Dict[str, object] = {"__metadata__": metadata}
    spans, pos = {}, 0
    for name, dtype, shape in entries:
        nbytes = _element_size(dtype) * math.prod(shape)
        header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        spans[name] = (pos, nbytes)
        pos += nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, spans


class PlannedShardWriter:
    """Fill the shards of a :class:`ShardPlan` tensor by tensor, in any order, from any number of calls.

    Each shard is first a preallocated ``.{name}.partial`` file whose header is written at once; ``write``
    puts a tensor's bytes at its planned offset (pwrite, into the page cache: fast); ``sync`` makes everything
    written so far durable and gives each shard whose every tensor is written its final name (fsync, rename);
    ``close`` syncs and writes the index (several shards) last, atomically. ``write`` and ``sync`` may run on
    different threads (a job writes on one and syncs on another, so a slow disk never stalls the writes).
    Reopening the same plan in the same folder (a resumed job) keeps the partial shards (after checking their
    headers) and the finished ones; ``written(names)`` tells it which tensors earlier runs already wrote.
    ``path_of(relative name)`` returns where to put a file (a job folder uses it to record the file before it
    exists). ``bytes_written`` counts the data written.
    """

    def __init__(self, out_dir: Optional[PathLike], plan: ShardPlan, *, metadata: Optional[Mapping[str, str]] = None,
                 path_of=None):
        if path_of is None:
            folder = os.path.abspath(os.fspath(out_dir))
            path_of = lambda rel: os.path.join(folder, rel)  # noqa: E731
        self.plan = plan
        self._path_of = path_of
        meta = _check_metadata(metadata)
        self._lock = threading.Lock()
        self._where: Dict[str, Tuple[int, int, int]] = {}       # name -> (shard index, file offset, nbytes)
        self._pending: List[set] = []
        self._fds: Dict[int, int] = {}
        self.bytes_written = 0
        for i, (fname, entries) in enumerate(plan.shards):
            head, spans = header_bytes(entries, meta)
            for name, (off, nbytes) in spans.items():
                self._where[name] = (i, len(head) + off, nbytes)
            self._pending.append({e[0] for e in entries})
            final = self._path_of(fname)
            if os.path.isfile(final) and not os.path.islink(final):
                self._pending[-1] = set()                      # finished by an earlier run
                continue
            partial = self._path_of(f".{fname}.partial")
            total = len(head) + sum(n for _, n in spans.values())
            if os.path.isfile(partial) and not os.path.islink(partial):
                fd = os.open(partial, os.O_RDWR)
                if os.pread(fd, len(head), 0) != head or os.fstat(fd).st_size != total:
                    os.close(fd)
                    raise SafetensorsFileError(f"{partial}: an earlier run's partial shard does not match this "
                                               "job's plan; start again (overwrite)")
            else:
                fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                os.pwrite(fd, head, 0)
                os.ftruncate(fd, total)
            self._fds[i] = fd

    def names(self) -> List[str]:
        return list(self._where)

    def written(self, names: Iterable[str]) -> None:
        """Tensors an earlier run wrote (and synced)."""
        with self._lock:
            for name in names:
                self._pending[self._where[name][0]].discard(name)

    def write(self, name: str, tensor: torch.Tensor) -> bool:
        """Write ``tensor`` (CPU, contiguous, planned dtype and shape) at its place; False when its shard was
        finished by an earlier run (nothing written)."""
        i, offset, nbytes = self._where[name]
        with self._lock:
            fd = self._fds.get(i)
        if fd is None:
            return False
        if tensor.device.type != "cpu" or not tensor.is_contiguous() or \
                tensor.numel() * tensor.element_size() != nbytes:
            raise ValueError(f"tensor {name!r} must be a contiguous CPU tensor of {nbytes} bytes")
        view, done = byte_view(tensor), 0
        while done < nbytes:
            done += os.pwrite(fd, view[done:], offset + done)
        with self._lock:
            self.bytes_written += nbytes
            self._pending[i].discard(name)
        return True

    def sync(self) -> None:
        """Make everything written so far durable; shards that are complete get their final names."""
        with self._lock:
            open_fds = dict(self._fds)
            complete = [i for i in open_fds if not self._pending[i]]
        for fd in open_fds.values():
            (os.fdatasync if hasattr(os, "fdatasync") else os.fsync)(fd)
        for i in complete:
            fname = self.plan.shards[i][0]
            with self._lock:
                fd = self._fds.pop(i)
            os.fsync(fd)
            os.close(fd)
            os.replace(self._path_of(f".{fname}.partial"), self._path_of(fname))
            _fsync_dir(os.path.dirname(self._path_of(fname)))

    def close(self) -> dict:
        """Sync; every tensor must have been written; writes the index (several shards) and returns it."""
        missing = [n for p in self._pending for n in p]
        if missing:
            raise RuntimeError(f"{len(missing)} planned tensors were never written, e.g. {missing[0]!r}")
        self.sync()
        weight_map = {name: fname for fname, entries in self.plan.shards for name, _, _ in entries}
        total = sum(n for _, _, n in self._where.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        if len(self.plan.shards) > 1:
            write_json_atomic(self._path_of(INDEX_FILE), index)
        return index

    def abort(self) -> None:
        """Close the partial shards, keeping them (a resumed job continues them)."""
        with self._lock:
            fds, self._fds = list(self._fds.values()), {}
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
