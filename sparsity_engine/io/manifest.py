"""Job bookkeeping: which blocks are finished (resume) and where a job may write (never into its input)."""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterable, Optional, Set

from .atomic import PathLike, write_json_atomic

MANIFEST_FILE = "progress.json"
_VERSION = 1


class Manifest:
    """Finished blocks of a job, persisted atomically as ``out_dir/progress.json``.

    ``mark_done(block, info)`` rewrites the file (temp file + rename) after each block, so after a crash the
    file names exactly the blocks whose outputs were completely written (write the block's output first,
    then mark it done). ``Manifest(out_dir)`` loads an existing file, which is how a job resumes.
    """

    def __init__(self, out_dir: PathLike):
        self.out_dir = os.path.abspath(os.fspath(out_dir))
        self.path = os.path.join(self.out_dir, MANIFEST_FILE)
        self._blocks: Dict[int, Dict[str, Any]] = {}
        if os.path.isfile(self.path):
            self._load()

    def _load(self) -> None:
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
            self._blocks = {int(k): dict(v) for k, v in data["blocks"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{self.path} is not a valid progress manifest ({exc}); delete it to start over") from None

    @property
    def done(self) -> Set[int]:
        """Indices of the finished blocks."""
        return set(self._blocks)

    def info(self, block: int) -> Optional[Dict[str, Any]]:
        """What ``mark_done`` recorded for ``block`` (a copy), or None if it is not finished."""
        rec = self._blocks.get(self._check_block(block))
        return None if rec is None else json.loads(json.dumps(rec))

    @staticmethod
    def _check_block(block) -> int:
        if isinstance(block, bool) or not isinstance(block, int) or block < 0:
            raise ValueError(f"block must be a non-negative int, got {block!r}")
        return block

    def mark_done(self, block: int, info: Optional[Dict[str, Any]] = None) -> None:
        """Record ``block`` as finished with ``info`` (JSON-serialisable dict) and persist atomically."""
        block = self._check_block(block)
        info = {} if info is None else info
        if not isinstance(info, dict):
            raise TypeError(f"info must be a dict or None, got {type(info).__name__}")
        try:
            info = json.loads(json.dumps(info, allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise TypeError(f"info must be JSON-serialisable: {exc}") from None
        blocks = dict(self._blocks)
        blocks[block] = info
        self._save(blocks)
        self._blocks = blocks

    def reset(self) -> None:
        """Forget every finished block (and remove the file)."""
        self._blocks = {}
        if os.path.isfile(self.path):
            os.remove(self.path)

    def _save(self, blocks: Dict[int, Dict[str, Any]]) -> None:
        os.makedirs(self.out_dir, exist_ok=True)
        payload = {"version": _VERSION, "blocks": {str(k): blocks[k] for k in sorted(blocks)}}
        write_json_atomic(self.path, payload)


def _real(p: PathLike) -> str:
    return os.path.realpath(os.path.abspath(os.fspath(p)))


def _inside(child: str, parent: str) -> bool:
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def prepare_output_dir(out_dir: PathLike, *, input_dirs: Iterable[PathLike], resume: bool = False,
                       overwrite: bool = False) -> str:
    """Check and create a job's output folder; returns its absolute path.

    Refused (ValueError): ``out_dir`` equal to one of ``input_dirs``, inside one, or containing one
    (symlinks resolved); an existing non-folder; a non-empty folder unless ``resume=True`` (continue an
    interrupted job: its progress manifest is kept) or ``overwrite=True`` (start over: the old progress
    manifest is removed so no block counts as done; other files are replaced as the job rewrites them);
    both flags at once.
    """
    if not isinstance(out_dir, (str, os.PathLike)) or not os.fspath(out_dir):
        raise TypeError(f"out_dir must be a non-empty path, got {out_dir!r}")
    if isinstance(input_dirs, (str, os.PathLike)):
        input_dirs = [input_dirs]
    input_dirs = list(input_dirs)
    if resume and overwrite:
        raise ValueError("resume=True and overwrite=True contradict each other: resume keeps the finished "
                         "blocks, overwrite starts over; pass one of them")
    out = _real(out_dir)
    for i, d in enumerate(input_dirs):
        if not isinstance(d, (str, os.PathLike)):
            raise TypeError(f"input_dirs[{i}] must be a path, got {type(d).__name__}")
        inp = _real(d)
        if out == inp:
            raise ValueError(f"out_dir {out!r} is the input folder input_dirs[{i}]; write the output elsewhere")
        if _inside(out, inp):
            raise ValueError(f"out_dir {out!r} is inside the input folder input_dirs[{i}] ({inp!r}); "
                             "write the output elsewhere")
        if _inside(inp, out):
            raise ValueError(f"out_dir {out!r} contains the input folder input_dirs[{i}] ({inp!r}); "
                             "choose a folder that does not hold the input")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"out_dir {out!r} exists and is not a folder")
    if os.path.isdir(out) and os.listdir(out):
        if not (resume or overwrite):
            raise ValueError(f"out_dir {out!r} is not empty; pass resume=True to continue an interrupted job "
                             "there or overwrite=True to start over and replace its contents")
        stale = os.path.join(out, MANIFEST_FILE)
        if overwrite and os.path.isfile(stale):
            os.remove(stale)
    os.makedirs(out, exist_ok=True)
    return out

