"""Atomic file writes: a temporary file in the destination folder, flushed, fsynced, then renamed.

A reader (or a crashed job) sees either the old file or the complete new one, never a partial write:
``os.replace`` is atomic within one file system, which is why the temporary file lives in the same folder.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any, Iterator, Union

PathLike = Union[str, "os.PathLike[str]"]
_TEXT_MODES = ("w", "wt")
_BINARY_MODES = ("wb",)


def _fsync_dir(folder: str) -> None:
    # the rename itself lives in the folder's metadata; without this a power loss can undo it
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # e.g. Windows cannot open folders; the rename is still atomic there
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _destination(path: PathLike) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"path {path!r}: its folder {folder!r} does not exist")
    if os.path.isdir(path):
        raise IsADirectoryError(f"path {path!r} is a folder, expected a file path")
    return path


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[str]:
    """Yield a temporary file name next to ``path``; on success it is fsynced and renamed onto ``path``.

    For writers that need a file name rather than a file object (safetensors' ``save_file``). On any
    exception the temporary file is removed and ``path`` is left as it was.
    """
    path = _destination(path)
    folder, base = os.path.split(path)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{base}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a model folder should be readable like any other file
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    _fsync_dir(folder)


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "wb") -> Iterator[Any]:
    """Context manager yielding a file object; ``path`` appears only when the block completes.

    mode: 'wb' (bytes) or 'w' / 'wt' (UTF-8 text). The data goes to a temporary file in the same folder,
    which is flushed, fsynced and moved onto ``path`` with ``os.replace``; if the block raises, the
    temporary file is removed, the exception propagates, and ``path`` keeps its old content (or stays absent).
    """
    if mode not in _TEXT_MODES + _BINARY_MODES:
        raise ValueError(f"mode must be one of {list(_TEXT_MODES + _BINARY_MODES)}, got {mode!r}")
    with atomic_path(path) as tmp:
        kwargs = {"encoding": "utf-8"} if mode in _TEXT_MODES else {}
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()


def write_json_atomic(path: PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically (serialised first: a TypeError leaves no file)."""
    try:
        text = json.dumps(obj, indent=2, sort_keys=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"obj is not JSON-serialisable (finite numbers, str, list, dict, bool, None): {exc}") from None
    with atomic_write(path, "w") as f:
        f.write(text + "\n")
