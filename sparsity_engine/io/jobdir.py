"""The job-folder contract: a job writes only into a folder it made, and only what it wrote is ever removed.

Every job (``prune``, ``prune-task-vectors``, ``merge`` ...) opens its output folder with :func:`open_job`
before any work starts. The folder then holds the job file ``sparsity_job.json``::

    {"tool": "sparsity-engine", "format": 1, "job": KIND, "version": TOOL VERSION,
     "settings": {every setting that changes the output}, "runtime": {device, backend, batch size ...},
     "inputs": {name: {"path": real path, "files": {relative name: [size, mtime_ns]}}},
     "finished": false, "files": [what the job wrote, relative], "dirs": [folders it made],
     "done": {step: info}}

The rules (README "Output folders"):

1. The output folder is never an input folder, inside one, or around one (symlinks resolved).
2. A new path or an existing empty folder is taken: the job file is written before any work starts.
3. A non-empty folder whose job file does not say that a job of this kind made it is refused, whatever the
   flags, and left exactly as it was (not even temporary files are removed).
4. Our folder without ``resume``/``overwrite`` is refused (it holds a finished or an unfinished job).
   ``resume`` continues our job only when every output-affecting setting, the inputs' fingerprint and the
   tool version are the same (the error names only what differs); runtime settings (device, backend,
   batch size: rounding only) may change. A finished job is reported as done (``Job.finished``).
   ``resume`` on a new path or an empty folder starts the job.
5. ``overwrite`` of our folder removes what the job file lists (and temporary files), never other files.
6. Temporary files of a killed atomic write (``.{name}.XXXXXXXX.tmp``, ``.shard-NNNNN.safetensors.partial``)
   are removed when a run opens a folder we own.
7. A failed start (the job fails before any step is marked done) leaves nothing that blocks the next run: what
   this job wrote, its job file, and the folder itself when this run created it are removed again.
8. Paths inside the folder are checked component by component: a symlink inside the output folder is never
   followed, neither to write nor to remove.
9. One job at a time per folder (an advisory lock on the folder, released when the process ends).

Everything here raises :class:`JobFolderError` (the command line's exit code 3) for folders it refuses.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import threading
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

from .atomic import PathLike, write_json_atomic

JOB_FILE = "sparsity_job.json"
TOOL = "sparsity-engine"
FORMAT = 1
# names left by a killed write: atomic_path's mkstemp names and the sharded writer's partial shards
_TMP_RE = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$|^\.shard-\d{5}\.safetensors\.partial$")


class JobFolderError(ValueError):
    """An output folder that may not be used, or a resume that does not match (command line: exit 3)."""


# --------------------------------------------------------------------------------------------- paths

def real(p: PathLike) -> str:
    """Absolute path with every symlink resolved."""
    return os.path.realpath(os.path.abspath(os.fspath(p)))


def inside(child: str, parent: str) -> bool:
    """True when real path ``child`` is ``parent`` or lies under it."""
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def check_separate(out_dir: PathLike, inputs: Mapping[str, PathLike]) -> str:
    """Rule 1: the real output path, refusing an output that is, is inside, or contains an input."""
    out = real(out_dir)
    for name, path in inputs.items():
        inp = real(path)
        if inside(inp, out):
            what = "is" if inp == out else "contains"
            raise JobFolderError(f"output folder {out!r} {what} the {name} {inp!r}; write the output elsewhere")
        if inside(out, inp):
            raise JobFolderError(f"output folder {out!r} is inside the {name} {inp!r}; write the output elsewhere")
    return out


def _relative(rel: str) -> str:
    """A normalised relative path that stays inside its folder (no absolute path, no '..')."""
    if not isinstance(rel, str) or not rel:
        raise JobFolderError(f"a path inside the output folder must be a non-empty str, got {rel!r}")
    norm = os.path.normpath(rel)
    if os.path.isabs(norm) or norm == "." or norm == ".." or norm.startswith(".." + os.sep):
        raise JobFolderError(f"path {rel!r} leaves the output folder")
    return norm


def fingerprint(path: PathLike) -> Dict[str, Any]:
    """What identifies an input without reading it: its real path and, per file, [size, mtime_ns].

    A folder lists every file below it (hidden files and folders skipped, symlinks followed as loaders do);
    a file lists itself under its base name.
    """
    top = real(path)
    if os.path.isfile(top):
        st = os.stat(top)
        return {"path": top, "files": {os.path.basename(top): [st.st_size, st.st_mtime_ns]}}
    if not os.path.isdir(top):
        raise JobFolderError(f"input {os.fspath(path)!r} does not exist")
    files = {}
    for root, dirs, names in os.walk(top):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for n in sorted(names):
            if n.startswith("."):
                continue
            full = os.path.join(root, n)
            try:
                st = os.stat(full)
            except OSError:       # a dangling link: nothing a loader could read either
                continue
            files[os.path.relpath(full, top)] = [st.st_size, st.st_mtime_ns]
    return {"path": top, "files": files}


# --------------------------------------------------------------------------------------------- differences

def _flatten(d: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def settings_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> List[str]:
    """'key: old -> new' for each (nested, dotted) setting that differs; JSON round trip so 2 == 2.0 only
    where JSON says so and tuples equal lists."""
    a, b = _flatten(json.loads(json.dumps(old))), _flatten(json.loads(json.dumps(new)))
    missing = object()
    out = []
    for k in list(a) + [k for k in b if k not in a]:
        va, vb = a.get(k, missing), b.get(k, missing)
        if va != vb:
            out.append(f"{k}: {'(unset)' if va is missing else repr(va)} -> {'(unset)' if vb is missing else repr(vb)}")
    return out


def inputs_diff(old: Mapping[str, Any], new: Mapping[str, Any], limit: int = 4) -> List[str]:
    """What differs between two {name: fingerprint} maps, in words (path moved, file changed/added/removed)."""
    out = []
    for name in list(old) + [n for n in new if n not in old]:
        fa, fb = old.get(name), new.get(name)
        if fa is None or fb is None:
            out.append(f"{name}: {'(none)' if fa is None else fa['path']} -> {'(none)' if fb is None else fb['path']}")
            continue
        if fa["path"] != fb["path"]:
            out.append(f"{name}: {fa['path']} -> {fb['path']}")
        a, b = fa["files"], fb["files"]
        changed = [f"{f} changed" for f in a if f in b and list(a[f]) != list(b[f])]
        changed += [f"{f} removed" for f in a if f not in b] + [f"{f} added" for f in b if f not in a]
        if changed:
            more = f" and {len(changed) - limit} more" if len(changed) > limit else ""
            out.append(f"{name} files: {', '.join(changed[:limit])}{more}")
    return out


# --------------------------------------------------------------------------------------------- the job

class Job:
    """An open job folder (from :func:`open_job`). Use as a context manager: an exception inside the block
    undoes a failed start (rule 7) and the lock is released either way.

    * ``path(rel)``: the absolute path of ``rel`` inside the folder, refusing '..', absolute paths and any
      symlink on the way (rule 8);
    * ``output(rel)`` / ``output_dir(rel)``: the same, recorded in the job file *before* the caller writes it,
      so ``overwrite`` and a failed start can remove it; missing parent folders are made and recorded;
    * ``remove(rel)``: delete a file this job wrote (e.g. work files once the result is complete);
    * ``mark_done(step, info)`` / ``done``: progress that survives a crash (``resume`` continues from it);
    * ``finish(**extra)``: the job is complete (``finished: true``); ``extra`` is stored in the job file.
    """

    def __init__(self, out_dir: str, data: Dict[str, Any], *, made: List[str], lock_fd: Optional[int],
                 resumed: bool):
        self.out_dir = out_dir
        self.data = data
        self.resumed = resumed
        self._made = made            # folders this run created (outermost first): removed on a failed start
        self._lock_fd = lock_fd
        self._mutex = threading.RLock()   # a background writer may record and mark steps too

    # state -------------------------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        return self.data["job"]

    @property
    def finished(self) -> bool:
        return bool(self.data.get("finished"))

    @property
    def done(self) -> Dict[str, Any]:
        return self.data["done"]

    @property
    def files(self) -> List[str]:
        return list(self.data["files"])

    def _save(self) -> None:
        with self._mutex:
            write_json_atomic(os.path.join(self.out_dir, JOB_FILE), self.data)

    def mark_done(self, step, info: Optional[Dict[str, Any]] = None) -> None:
        """Record ``step`` (an int or str, stored as str) as finished, with a JSON-serialisable ``info``."""
        info = {} if info is None else json.loads(json.dumps(info, allow_nan=False))
        with self._mutex:
            self.data["done"][str(step)] = info
            self._save()

    def finish(self, **extra: Any) -> None:
        with self._mutex:
            self.data.update(extra)
            self.data["finished"] = True
            self._save()

    # paths -------------------------------------------------------------------------------------------
    def path(self, rel: str) -> str:
        """Absolute path of ``rel`` inside the folder; JobFolderError if any existing part is a symlink."""
        norm = _relative(rel)
        cur = self.out_dir
        for part in norm.split(os.sep):
            cur = os.path.join(cur, part)
            if os.path.islink(cur):
                raise JobFolderError(f"{cur!r} in the output folder is a symlink; a job never follows a "
                                     "symlink out of its folder (remove it, or choose another output folder)")
        return cur

    def _record(self, key: str, norm: str) -> None:
        with self._mutex:
            if norm not in self.data[key]:
                self.data[key].append(norm)
                self._save()

    def output_dir(self, rel: str) -> str:
        """Make the folder ``rel`` (and missing parents) inside the job folder, recorded; returns its path."""
        norm = _relative(rel)
        parts = norm.split(os.sep)
        for i in range(1, len(parts) + 1):
            sub = os.sep.join(parts[:i])
            p = self.path(sub)
            if not os.path.isdir(p):
                if os.path.lexists(p):
                    raise JobFolderError(f"{p!r} exists and is not a folder")
                self._record("dirs", sub)
                os.mkdir(p)
        return self.path(norm)

    def output(self, rel: str) -> str:
        """The path to write ``rel`` to, recorded in the job file first; its folder is made if missing."""
        norm = _relative(rel)
        parent = os.path.dirname(norm)
        if parent:
            self.output_dir(parent)
        p = self.path(norm)
        if os.path.isdir(p):
            raise JobFolderError(f"{p!r} is a folder; the job needs to write a file there")
        self._record("files", norm)
        return p

    def remove(self, rel: str) -> None:
        """Remove a file (or an emptied folder) this job recorded, and forget it."""
        norm = _relative(rel)
        _remove_recorded(self.out_dir, [norm] if norm in self.data["files"] else [],
                         [norm] if norm in self.data["dirs"] else [])
        self.data["files"] = [f for f in self.data["files"] if f != norm]
        self.data["dirs"] = [d for d in self.data["dirs"] if d != norm]
        self._save()

    # life cycle --------------------------------------------------------------------------------------
    def abandon_start(self) -> None:
        """Rule 7: before any step is done, remove what this job wrote, its job file, and the folders this
        run made; after that (progress exists), keep everything for ``resume``."""
        if self.done or self.finished:
            return
        _remove_recorded(self.out_dir, self.data["files"], self.data["dirs"])
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(self.out_dir, JOB_FILE))
        _remove_tmp_files(self.out_dir)
        for d in reversed(self._made):       # innermost first; only if nothing else appeared there
            with contextlib.suppress(OSError):
                os.rmdir(d)

    def close(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)      # releases the flock
            self._lock_fd = None

    def __enter__(self) -> "Job":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is not None:
                self.abandon_start()
        finally:
            self.close()


def _remove_recorded(out_dir: str, files: Iterable[str], dirs: Iterable[str]) -> None:
    """Remove recorded files, then recorded folders that are empty (deepest first); never through a symlink:
    a path whose parent chain holds a symlink is skipped, a recorded path that is itself a symlink loses
    only the link."""
    def safe(rel: str) -> Optional[str]:
        try:
            norm = _relative(rel)
        except JobFolderError:
            return None
        cur = out_dir
        parts = norm.split(os.sep)
        for part in parts[:-1]:
            cur = os.path.join(cur, part)
            if os.path.islink(cur) or not os.path.isdir(cur):
                return None
        return os.path.join(cur, parts[-1])

    for rel in files:
        p = safe(rel)
        if p is not None and (os.path.islink(p) or os.path.isfile(p)):
            os.remove(p)
    for rel in sorted(dirs, key=lambda d: d.count(os.sep), reverse=True):
        p = safe(rel)
        if p is not None and os.path.isdir(p) and not os.path.islink(p):
            _remove_tmp_files(p)
            with contextlib.suppress(OSError):
                os.rmdir(p)


def _remove_tmp_files(folder: str) -> List[str]:
    """Rule 6: temporary files of killed writes anywhere below ``folder`` (symlinked folders not entered)."""
    removed = []
    for root, dirs, names in os.walk(folder):          # os.walk does not follow symlinked folders
        for n in names:
            if _TMP_RE.match(n):
                p = os.path.join(root, n)
                if os.path.islink(p) or os.path.isfile(p):
                    os.remove(p)
                    removed.append(os.path.relpath(p, folder))
    return removed


def _lock(folder: str) -> Optional[int]:
    try:
        import fcntl
    except ImportError:      # not POSIX: no lock
        return None
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise JobFolderError(f"another job is running in the output folder {folder!r}; wait for it to end "
                             "or choose another folder") from None
    return fd


def _make_dirs(out: str) -> List[str]:
    """os.makedirs that returns the folders it created, outermost first."""
    missing = []
    p = out
    while not os.path.lexists(p):
        missing.append(p)
        p = os.path.dirname(p)
    if not os.path.isdir(p):
        raise JobFolderError(f"cannot make the output folder {out!r}: {p!r} is not a folder")
    made = []
    for d in reversed(missing):
        os.mkdir(d)
        made.append(d)
    return made


def read_job_file(out_dir: str) -> Optional[Dict[str, Any]]:
    """The job file of ``out_dir`` when it is a readable job file of this tool, else None."""
    p = os.path.join(out_dir, JOB_FILE)
    if os.path.islink(p) or not os.path.isfile(p):
        return None
    try:
        with open(p, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    keys = ("job", "settings", "inputs", "files", "dirs", "done", "finished")
    if not isinstance(data, dict) or data.get("tool") != TOOL or data.get("format") != FORMAT or \
            any(k not in data for k in keys):
        return None
    return data


def open_job(out_dir: PathLike, *, kind: str, settings: Mapping[str, Any], inputs: Mapping[str, PathLike],
             runtime: Optional[Mapping[str, Any]] = None, resume: bool = False, overwrite: bool = False,
             version: Optional[str] = None, flag_names: Tuple[str, str] = ("--resume", "--overwrite")) -> Job:
    """Open (or create) the output folder of a job of ``kind`` under the rules of the module docstring.

    settings: every setting that changes the output (compared on resume); inputs: {name: path} of every
    input folder or file (fingerprinted, compared on resume, never overlapping the output); runtime:
    settings that change only rounding (recorded, not compared); flag_names: how the caller's user spells
    resume / overwrite in messages. Returns a :class:`Job`; raises JobFolderError for a refused folder.
    """
    if resume and overwrite:
        raise JobFolderError(f"{flag_names[0]} and {flag_names[1]} contradict each other: one continues the "
                             "job in the folder, the other starts it again; pass one of them")
    if not isinstance(out_dir, (str, os.PathLike)) or not os.fspath(out_dir):
        raise JobFolderError(f"the output folder must be a non-empty path, got {out_dir!r}")
    if version is None:
        from .. import __version__ as version
    out = check_separate(out_dir, inputs)
    prints = {name: fingerprint(p) for name, p in inputs.items()}
    fresh = {"tool": TOOL, "format": FORMAT, "job": kind, "version": version,
             "settings": json.loads(json.dumps(dict(settings), allow_nan=False)),
             "runtime": json.loads(json.dumps(dict(runtime or {}), allow_nan=False)),
             "inputs": prints, "finished": False, "files": [], "dirs": [], "done": {}}
    if os.path.lexists(out) and not os.path.isdir(out):
        raise JobFolderError(f"output path {out!r} exists and is not a folder")
    try:
        made = _make_dirs(out)
    except PermissionError as exc:
        raise JobFolderError(f"cannot make the output folder {out!r}: {exc.strerror}") from None
    lock = _lock(out)
    try:
        job = _take(out, fresh, made, lock, resume=resume, overwrite=overwrite, flag_names=flag_names)
    except BaseException:
        if lock is not None:
            os.close(lock)
        for d in reversed(made):
            with contextlib.suppress(OSError):
                os.rmdir(d)
        raise
    return job


def _take(out: str, fresh: Dict[str, Any], made: List[str], lock: Optional[int], *, resume: bool,
          overwrite: bool, flag_names: Tuple[str, str]) -> Job:
    kind = fresh["job"]
    if not os.listdir(out):                            # rule 2: new or empty
        job = Job(out, fresh, made=made, lock_fd=lock, resumed=False)
        job._save()
        return job
    old = read_job_file(out)
    if old is None or old["job"] != kind:              # rule 3: not ours, untouched
        what = ("holds no job file of sparsity-engine" if old is None else
                f"holds a {old['job']!r} job, not a {kind!r} job")
        raise JobFolderError(f"output folder {out!r} is not empty and {what}; it was left as it was. Choose a "
                             f"new or empty folder ({flag_names[0]} and {flag_names[1]} only apply to a folder "
                             f"that a {kind} job of sparsity-engine made)")
    state = f"a finished {kind} job" if old["finished"] else \
        f"an unfinished {kind} job ({len(old['done'])} step{'s' if len(old['done']) != 1 else ''} done)"
    if overwrite:                                      # rule 5
        _remove_recorded(out, old["files"], old["dirs"])
        _remove_tmp_files(out)                         # rule 6
        job = Job(out, fresh, made=made, lock_fd=lock, resumed=False)
        job._save()
        return job
    if not resume:                                     # rule 4
        raise JobFolderError(f"output folder {out!r} holds {state}; pass {flag_names[0]} to "
                             f"continue it or {flag_names[1]} to start again, or choose another folder")
    diffs = settings_diff(old["settings"], fresh["settings"]) + inputs_diff(old["inputs"], fresh["inputs"])
    if old.get("version") != fresh["version"]:
        diffs.append(f"sparsity-engine version: {old.get('version')!r} -> {fresh['version']!r}")
    if diffs:
        raise JobFolderError(f"{flag_names[0]}: {state} in {out!r} was made with other settings "
                             f"or inputs ({'; '.join(diffs)}); use the same ones, or {flag_names[1]} to start "
                             "again")
    if old["finished"]:                                # reported as done; the folder is not touched
        return Job(out, old, made=made, lock_fd=lock, resumed=True)
    _remove_tmp_files(out)                             # rule 6
    job = Job(out, dict(old, runtime=fresh["runtime"]), made=made, lock_fd=lock, resumed=True)
    job._save()
    return job
