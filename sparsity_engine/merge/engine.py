"""The streaming merge job: mergekit configs merged tensor by tensor from disk to disk.

Plan (before anything is written): every input's safetensors headers are read (names, dtypes, shapes, file
offsets), every tensor's parameters resolved and checked, the output shards laid out (greedy, in the order the
base stores its tensors, at most ``max_shard_bytes`` each, as mergekit's writer does).

Run, in three kinds of threads:

* one reader per input model reads its tensors in that order with positioned reads (``io.pread_into``) at the
  offsets ``io.SafetensorsReader`` found when it checked the files (the bytes are read explicitly rather than
  memory-mapped, so host memory stays at the buffers below and no page faults are taken), asks the kernel to
  read the next tensors ahead (posix_fadvise), and on a GPU copies through two pinned 64 MiB buffers on its
  own CUDA stream; at most ``read_ahead`` tensors per model wait in its queue;
* the main thread aligns dtypes, merges on the device (``methods``), copies the result to the host;
* one writer appends results to the current shard (header first, ``io.header_bytes``: the layout is known),
  writes each shard
  atomically under its final name, and marks it done in the job file.

Host memory: about ``read_ahead`` + 1 tensors per model on the CPU path (on a GPU the read-ahead lives in GPU
memory and the host holds two 64 MiB staging buffers per model) plus the result being copied back and two
waiting for the writer. The job
folder follows ``io.jobdir`` (job file first, resume only with the same settings, overwrite removes only what
the job wrote); ``resume`` continues at the first shard not written. The index, config, tokenizer files,
``mergekit_config.yml`` and ``merge_report.json`` are written last.
"""
from __future__ import annotations

import json
import os
import queue
import resource
import shutil
import sys
import threading
import time
import zlib
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..io.safetensors_io import TensorInfo, header_bytes, pread_into
from ..io.safetensors_io import read_header as _io_read_header
from .config import MergeConfig, MergeConfigError, layer_of, load_config, num_layers
from .methods import METHODS, check_finite_params

__all__ = ["MergeInputError", "Task", "Plan", "plan_merge", "run_merge", "REPORT_FILE", "CONFIG_COPY"]

REPORT_FILE = "merge_report.json"
CONFIG_COPY = "mergekit_config.yml"
JOB_KIND = "merge"
# what mergekit copies from the donor model (merge._copy_tokenizer), plus vocabulary files other tokenizers need
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
                   "added_tokens.json", "merges.txt", "chat_template.jinja", "generation_config.json",
                   "chat_template.json", "video_preprocessor_config.json", "vocab.txt", "vocab.json",
                   "spiece.model", "sentencepiece.bpe.model")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class MergeInputError(ValueError):
    """An input model that cannot be merged (missing or corrupt files, tensors that do not match)."""


# ------------------------------------------------------------------ plan

def read_header(path: str) -> Dict[str, TensorInfo]:
    """The tensors a .safetensors file declares (io.read_header: no data read); MergeInputError naming the file if
    the header is unreadable or the file is shorter than its header says (truncated)."""
    try:
        return _io_read_header(path)[1]
    except (OSError, ValueError) as exc:
        raise MergeInputError(f"cannot read the safetensors file {path!r}: {exc}") from None


@dataclass
class Task:
    """One output tensor: its inputs' layout, dtypes, resolved parameters, and its place in the output."""
    name: str
    shape: Tuple[int, ...]
    compute_dtype: Optional[torch.dtype]  # None: not floating point, copied (all inputs must agree)
    out_dtype: torch.dtype
    shared: Dict[str, Any]
    per_input: List[Dict[str, Any]]
    in_bytes: int
    shard: int = 0

    @property
    def out_bytes(self) -> int:
        return _numel(self.shape) * self.out_dtype.itemsize


@dataclass
class Plan:
    config: MergeConfig
    tasks: List[Task]
    shard_names: List[str]
    shard_tasks: List[List[int]]
    inputs: List[Dict[str, TensorInfo]]  # per input model: where each tensor lies

    def shard_size(self, i: int) -> int:
        """Bytes of shard i on disk: its header and its tensors' data."""
        return len(_shard_header(self, i)) + sum(self.tasks[t].out_bytes for t in self.shard_tasks[i])


def _input_tensors(path: str) -> Tuple[List[str], Dict[str, TensorInfo]]:
    """(names in storage order: by shard, then by offset; name -> where it lies) of one model folder, from
    io.SafetensorsReader, which checks every file's header and the index when it opens them."""
    from ..io import SafetensorsReader

    try:
        reader = SafetensorsReader(path)
    except (OSError, ValueError) as exc:
        raise MergeInputError(f"model {path!r}: {exc}") from None
    with reader:
        files = reader.files
        infos = {name: reader.info(name) for name in reader.keys()}
    names = sorted(infos, key=lambda n: (files.index(infos[n].file), infos[n].start))
    return names, infos


def _layer_position(cfg: MergeConfig, names: Sequence[str]):
    """name -> t for gradients: layer i of L at i / (L - 1) (1 when L == 1), tensors outside the layers at 0."""
    if not cfg.uses_gradients():
        return lambda name: 0.0
    template = cfg.inputs[cfg.base if cfg.base is not None else 0].path
    count = num_layers(template)
    prefixes = {layer_of(n)[0] for n in names if layer_of(n)}
    if count is None or len(prefixes) != 1:
        raise MergeConfigError("gradient parameters (lists of values over the layers) need one stack of layers and "
                               f"its size in config.json; {template!r} has "
                               f"{len(prefixes)} layer stacks and num_hidden_layers={count}")

    def t_of(name: str) -> float:
        where = layer_of(name)
        if where is None:
            return 0.0
        return where[1] / (count - 1) if count > 1 else 1.0
    return t_of


def _check_values(cfg: MergeConfig, name: str, shared: Dict[str, Any], per_input: List[Dict[str, Any]]) -> None:
    """Values mergekit would turn into an error or an Inf/NaN mid-merge, refused before work."""
    problem = check_finite_params(cfg.method, shared, per_input, cfg.base, name)
    if problem:
        raise MergeConfigError(problem)
    for i, p in enumerate(per_input):
        where = f"model {cfg.inputs[i].path!r}, tensor {name!r}"
        d = p.get("density")
        if d is not None and d < 0:
            raise MergeConfigError(f"density must be >= 0, got {d} ({where})")
        g = p.get("gamma")
        if g is not None and not 0 <= g <= 1:
            raise MergeConfigError(f"gamma must be in [0, 1], got {g} ({where})")
        e = p.get("epsilon")
        if e is not None and d is not None and 0 < d < 1 and not (0 < d - e and d + e < 1):
            raise MergeConfigError(f"epsilon must keep density +/- epsilon inside (0, 1) (as mergekit requires), "
                                   f"got density={d}, epsilon={e} ({where})")


def plan_merge(cfg: MergeConfig, *, max_shard_bytes: int = 5 * 10**9) -> Plan:
    """Check the inputs against the configuration and lay out the work (see the module docstring).

    The output holds the tensors of the base (of the first input without a base), in its storage order;
    every input must hold each of them with the same shape. Raises MergeInputError / MergeConfigError."""
    layouts = [_input_tensors(m.path) for m in cfg.inputs]
    template = cfg.base if cfg.base is not None else 0
    names = layouts[template][0]
    for k, (_, infos) in enumerate(layouts):
        missing = [n for n in names if n not in infos]
        if missing:
            raise MergeInputError(f"model {cfg.inputs[k].path!r} lacks {len(missing)} tensor(s) of "
                                  f"{cfg.inputs[template].path!r}, e.g. {missing[:3]}; merging models of different "
                                  "architectures is not supported")
    t_of = _layer_position(cfg, names)
    spec = cfg.spec
    tasks = []
    for name in names:
        infos = [lay[1][name] for lay in layouts]
        shapes = {i.shape for i in infos}
        if len(shapes) != 1:
            raise MergeInputError(f"tensor {name!r} has shapes {[i.shape for i in infos]} in the inputs; all must "
                                  "match (vocabulary resizing is not supported)")
        floats = [i.dtype.is_floating_point for i in infos]
        if any(floats) and not all(floats):
            raise MergeInputError(f"tensor {name!r} is floating point in some inputs and not in others")
        in_bytes = sum(_numel(i.shape) * i.dtype.itemsize for i in infos)
        if not all(floats):
            if len({i.dtype for i in infos}) != 1:
                raise MergeInputError(f"tensor {name!r} has dtypes {[str(i.dtype) for i in infos]} in the inputs")
            tasks.append(Task(name, infos[0].shape, None, infos[0].dtype, {}, [], in_bytes))
            continue
        compute = _DTYPES[cfg.dtype] if cfg.dtype else _promote([i.dtype for i in infos])
        if compute not in _DTYPES.values() and (spec.task_arithmetic or compute != torch.float64):
            raise MergeConfigError(f"tensor {name!r} is stored as {compute}; set dtype: float32 (or bfloat16 / "
                                   "float16) in the configuration")
        shared, per_input = cfg.resolve(name, t_of(name))
        _check_values(cfg, name, shared, per_input)
        out = _DTYPES[cfg.out_dtype] if cfg.out_dtype else compute
        tasks.append(Task(name, infos[0].shape, compute, out, shared, per_input, in_bytes))
    if not tasks:
        raise MergeInputError(f"model {cfg.inputs[template].path!r} holds no tensors")
    return _lay_out_shards(Plan(cfg, tasks, [], [], [lay[1] for lay in layouts]), max_shard_bytes)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _promote(dtypes: Sequence[torch.dtype]) -> torch.dtype:
    out = dtypes[0]
    for d in dtypes[1:]:
        out = torch.promote_types(out, d)
    return out


def _lay_out_shards(plan: Plan, max_shard_bytes: int) -> Plan:
    """mergekit's writer: a new shard when the next tensor would push the current one past the limit."""
    from ..io import SINGLE_FILE, shard_name

    shards: List[List[int]] = [[]]
    size = 0
    for i, task in enumerate(plan.tasks):
        if shards[-1] and size + task.out_bytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        task.shard = len(shards) - 1
        size += task.out_bytes
    n = len(shards)
    plan.shard_tasks = shards
    plan.shard_names = [SINGLE_FILE] if n == 1 else [shard_name(i + 1, n) for i in range(n)]
    return plan


def _shard_header(plan: Plan, shard: int) -> bytes:
    """The safetensors header of a shard (io.header_bytes: the tensors in plan order)."""
    entries = [(plan.tasks[t].name, plan.tasks[t].out_dtype, plan.tasks[t].shape) for t in plan.shard_tasks[shard]]
    return header_bytes(entries, {"format": "pt"})[0]


# ------------------------------------------------------------------ threads

READ_CHUNK = 64 * 2**20  # bytes per read call (and per pinned staging buffer on the GPU path)


class _Source:
    """One input model's tensor bytes, read with plain positioned reads at the offsets of its headers.

    Explicit reads (not memory maps) keep host memory to the buffers below, whatever the file sizes, and need
    no page faults. ``infos``: name -> TensorInfo (SparseGPT work files override the model's own tensors).
    ``prefetch(names)`` asks the kernel to read those tensors' bytes ahead (posix_fadvise WILLNEED)."""

    def __init__(self, infos: Dict[str, TensorInfo], device: torch.device):
        self.infos = infos
        self.device = device
        self._fds: Dict[str, int] = {}
        self._advised = set()
        self._advise = hasattr(os, "posix_fadvise")
        self._staging: List[torch.Tensor] = []
        self._copied: List[Optional[torch.cuda.Event]] = []

    def _fd(self, path: str) -> int:
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        return fd

    def prefetch(self, names: Sequence[str]) -> None:
        for name in names:
            if not self._advise or name in self._advised:
                continue
            self._advised.add(name)
            info = self.infos[name]
            try:
                os.posix_fadvise(self._fd(info.file), info.start, info.nbytes, os.POSIX_FADV_WILLNEED)
            except OSError:  # a file system without read-ahead hints: plain reads still work
                self._advise = False

    def _pread(self, fd: int, view, offset: int, name: str) -> None:
        try:
            pread_into(fd, view, offset)
        except OSError as exc:
            raise MergeInputError(f"tensor {name!r}: {exc} (truncated file?)") from None

    def read(self, name: str, stream=None) -> torch.Tensor:
        """The tensor on the source's device (on the GPU through two pinned staging buffers, copies on
        ``stream``; the caller synchronises before handing it on)."""
        info = self.infos[name]
        if self.device.type == "cuda":
            with torch.cuda.stream(stream):  # allocated on the reader's stream: the consumer's record_stream
                out = torch.empty(info.shape, dtype=info.dtype, device=self.device)  # then guards its reuse
        else:
            out = torch.empty(info.shape, dtype=info.dtype)
        if info.nbytes == 0:
            return out
        fd, flat = self._fd(info.file), out.view(-1).view(torch.uint8)
        if self.device.type == "cpu":
            for pos in range(0, info.nbytes, READ_CHUNK):
                self._pread(fd, memoryview(flat[pos:pos + READ_CHUNK].numpy()), info.start + pos, name)
            return out
        if not self._staging:
            self._staging = [torch.empty(READ_CHUNK, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
            self._copied = [None, None]
        for j, pos in enumerate(range(0, info.nbytes, READ_CHUNK)):
            k = j % 2
            if self._copied[k] is not None:
                self._copied[k].synchronize()  # the buffer's last copy to the GPU is done: it may be refilled
            n = min(READ_CHUNK, info.nbytes - pos)
            buf = self._staging[k][:n]
            self._pread(fd, memoryview(buf.numpy()), info.start + pos, name)
            with torch.cuda.stream(stream):
                flat[pos:pos + n].copy_(buf, non_blocking=True)
                self._copied[k] = torch.cuda.Event()
                self._copied[k].record(stream)
        return out

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}


class _Stop(Exception):
    pass


class _Pipeline:
    """Reader threads -> main thread -> writer thread, with the first error of any thread re-raised."""

    def __init__(self, read_ahead: int):
        self.stop = threading.Event()
        self.error: Optional[BaseException] = None
        self.read_ahead = read_ahead
        self.threads: List[threading.Thread] = []
        self.lock = threading.Lock()
        # busy seconds: of the reader threads (summed), the writer, and the main thread's steps
        self.stats: Dict[str, float] = {"read_threads_s": 0.0, "write_thread_s": 0.0, "wait_read_s": 0.0,
                                        "merge_s": 0.0, "to_host_s": 0.0, "wait_write_s": 0.0}

    def add(self, key: str, seconds: float) -> None:
        with self.lock:
            self.stats[key] += seconds

    def start(self, fn, *args) -> None:
        def body():
            try:
                fn(*args)
            except _Stop:
                pass
            except BaseException as exc:  # handed to the main thread
                with self.lock:
                    if self.error is None:
                        self.error = exc
                self.stop.set()
        th = threading.Thread(target=body, daemon=True)
        th.start()
        self.threads.append(th)

    def put(self, q: queue.Queue, item) -> None:
        while True:
            if self.stop.is_set():
                raise _Stop()
            try:
                q.put(item, timeout=0.05)
                return
            except queue.Full:
                continue

    def get(self, q: queue.Queue):
        while True:
            try:
                return q.get(timeout=0.05)
            except queue.Empty:
                if self.stop.is_set():
                    raise _Stop() from None

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        self.stop.set()
        for th in self.threads:
            th.join()


def _read_loop(pipe: _Pipeline, source: _Source, names: List[str], out: queue.Queue) -> None:
    stream = torch.cuda.Stream(source.device) if source.device.type == "cuda" else None
    for i, name in enumerate(names):
        t0 = time.perf_counter()
        source.prefetch(names[i:i + pipe.read_ahead + 2])
        t = source.read(name, stream)
        if stream is not None:
            stream.synchronize()  # the tensor is complete before another stream may use it
        pipe.add("read_threads_s", time.perf_counter() - t0)
        pipe.put(out, (name, t))


def _tensor_bytes(t: torch.Tensor):
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


def _write_loop(pipe: _Pipeline, job, plan: Plan, shards: List[int], inbox: queue.Queue, written: Dict[str, int]):
    from ..io import atomic_path

    for s in shards:
        path = job.output(plan.shard_names[s])
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            f.write(_shard_header(plan, s))
            for t in plan.shard_tasks[s]:
                name, host = pipe.get(inbox)
                if name != plan.tasks[t].name:
                    raise RuntimeError(f"writer expected tensor {plan.tasks[t].name!r}, got {name!r}")
                t0 = time.perf_counter()
                f.write(_tensor_bytes(host))
                pipe.add("write_thread_s", time.perf_counter() - t0)
                written["bytes"] += host.numel() * host.element_size()
            f.flush()
        job.mark_done(f"shard:{plan.shard_names[s]}", {"tensors": len(plan.shard_tasks[s])})


# ------------------------------------------------------------------ the merge of one tensor

def _generator(seed: int, name: str, device: torch.device) -> torch.Generator:
    """One generator per tensor, seeded from (seed, name): a tensor's draw does not depend on the order of
    work or on where a resumed job restarted."""
    return torch.Generator(device=device).manual_seed(zlib.crc32(f"{seed}:{name}".encode()))


def merge_one(plan: Plan, task: Task, xs: List[torch.Tensor], *, seed: int = 0, backend: Optional[str] = None,
              device: Optional[torch.device] = None) -> torch.Tensor:
    """The merged tensor for ``task`` from its inputs ``xs`` (in input order, on one device)."""
    cfg = plan.config
    if task.compute_dtype is None:
        for i, x in enumerate(xs[1:], 1):
            if x.dtype != xs[0].dtype or not torch.equal(x, xs[0]):
                raise MergeInputError(f"non-floating tensor {task.name!r} differs between {cfg.inputs[0].path!r} "
                                      f"and {cfg.inputs[i].path!r}; it cannot be merged")
        return xs[0]
    xs = [x.to(task.compute_dtype) for x in xs]
    spec = METHODS[cfg.method]
    gen = None if spec.deterministic else _generator(seed, task.name, xs[0].device)
    out = spec.fn(xs, cfg.base, task.shared, task.per_input, generator=gen, backend=backend)
    return out.to(task.out_dtype)


# ------------------------------------------------------------------ job

def _resolve_device(device) -> torch.device:
    """The pruning job's device rule (cuda when available), its errors as MergeConfigError."""
    from ..pruning.pipeline import ConfigError, resolve_device

    try:
        return resolve_device(device)
    except ConfigError as exc:
        raise MergeConfigError(str(exc)) from None


def _settings(cfg: MergeConfig, seed: int, max_shard_bytes: int, device: torch.device, backend) -> Dict[str, Any]:
    """Everything that changes the output (compared on resume). The device and backend change the random
    draws of DARE / DELLA and SparseGPT's rounding, so they count for those; elsewhere they only round."""
    out = {"method": cfg.method, "inputs": [{"path": m.path, "parameters": m.parameters} for m in cfg.inputs],
           "base": cfg.base, "parameters": cfg.global_params, "slice_parameters": cfg.slice_params,
           "dtype": cfg.dtype, "out_dtype": cfg.out_dtype, "tokenizer_source": cfg.tokenizer_source,
           "sparsegpt": asdict(cfg.sparsegpt) if cfg.sparsegpt else None, "seed": seed,
           "max_shard_bytes": max_shard_bytes}
    if not cfg.spec.deterministic or cfg.sparsegpt:
        out["device"] = device.type
        out["backend"] = backend or "auto"
    return out


def _versions() -> Dict[str, Any]:
    """Versions from the installed packages' metadata (importing transformers only to ask costs seconds)."""
    from importlib import metadata

    import sparsity_engine

    out = {"sparsity_engine": sparsity_engine.__version__, "python": sys.version.split()[0],
           "torch": torch.__version__, "cuda_runtime": torch.version.cuda}
    for dist in ("safetensors", "triton", "transformers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _peak_rss_bytes() -> int:
    """This process's peak resident memory: VmHWM where /proc has it (ru_maxrss also counts the memory of the
    process that started this one, which Linux folds in at exec), else ru_maxrss."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class _Bar:
    """tqdm over input bytes (tensors in the postfix) when enabled and installed; else silent."""

    def __init__(self, enabled: bool, total_bytes: int, total_tensors: int, done_tensors: int):
        self.n_tensors, self.total_tensors = done_tensors, total_tensors
        self.bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                return
            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="merge",
                            dynamic_ncols=True)

    def update(self, nbytes: int) -> None:
        self.n_tensors += 1
        if self.bar is not None:
            self.bar.update(nbytes)
            self.bar.set_postfix_str(f"tensors {self.n_tensors}/{self.total_tensors}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_merge(config: Union[str, MergeConfig], out_dir: str, *, device=None, backend: Optional[str] = None,
              seed: int = 0, max_shard_bytes: int = 5 * 10**9, resume: bool = False, overwrite: bool = False,
              read_ahead: int = 2, progress: bool = True) -> Dict[str, Any]:
    """Run a mergekit configuration (a YAML path or a parsed :class:`MergeConfig`) into ``out_dir``.

    device: 'cuda' (default when available) or 'cpu'; backend: the ops' backend (None: auto); seed: the random
    draws of dare / della (per tensor, see _generator); read_ahead: tensors read ahead per model.
    Returns the report (also written as ``merge_report.json``). Raises MergeConfigError (the configuration),
    MergeInputError (an input model), io.JobFolderError (the output folder)."""
    from ..io import open_job

    t_start = time.perf_counter()
    cfg = load_config(config) if isinstance(config, str) else config
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise MergeConfigError(f"seed must be a non-negative integer, got {seed!r}")
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise MergeConfigError(f"max_shard_bytes must be a positive integer, got {max_shard_bytes!r}")
    if isinstance(read_ahead, bool) or not isinstance(read_ahead, int) or read_ahead < 1:
        raise MergeConfigError(f"read_ahead must be a positive integer, got {read_ahead!r}")
    dev = _resolve_device(device)
    plan = plan_merge(cfg, max_shard_bytes=max_shard_bytes)
    _check_tokenizers(cfg)
    t_plan = time.perf_counter() - t_start
    inputs = {f"model {i} ({os.path.basename(m.path.rstrip(os.sep))})": m.path for i, m in enumerate(cfg.inputs)}
    if cfg.sparsegpt and cfg.sparsegpt.file:
        inputs["calibration file"] = cfg.sparsegpt.file
    settings = _settings(cfg, seed, max_shard_bytes, dev, backend)
    runtime = {"device": str(dev), "backend": backend or "auto", "read_ahead": read_ahead}
    with open_job(out_dir, kind=JOB_KIND, settings=settings, inputs=inputs, runtime=runtime, resume=resume,
                  overwrite=overwrite) as job:
        if job.finished:
            with open(job.path(REPORT_FILE), encoding="utf-8") as f:
                return dict(json.load(f), already_finished=True)
        timings = {"plan_s": t_plan}
        overlays = _sparsegpt_stage(job, cfg, dev, backend, progress, timings)
        _merge_pruned_as_they_are(plan, job, overlays)
        report = _stream(job, plan, overlays, dev, backend, seed, read_ahead, progress, timings)
        t0 = time.perf_counter()
        files = _finalize(job, plan)
        for rel in overlays.values():
            job.remove(rel)
        timings["finalize_s"] = time.perf_counter() - t0
        timings["total_s"] = time.perf_counter() - t_start
        from ..pruning.pipeline import device_description

        report.update(settings=settings, runtime=runtime, versions=_versions(), device=device_description(dev),
                      timings=timings, files=files, peak_host_rss_bytes=_peak_rss_bytes(),
                      peak_gpu_bytes=torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None)
        from ..io import write_json_atomic

        write_json_atomic(job.output(REPORT_FILE), report)
        job.finish()
    return report


def _stream(job, plan: Plan, overlays: Dict[int, str], dev, backend, seed, read_ahead, progress, timings):
    """Merge every shard not yet written (resume skips the done ones)."""
    done = set(job.done)
    todo = [s for s in range(len(plan.shard_names))
            if f"shard:{plan.shard_names[s]}" not in done
            or not _complete(job.path(plan.shard_names[s]), plan.shard_size(s))]
    tasks = [t for s in todo for t in plan.shard_tasks[s]]
    names = [plan.tasks[t].name for t in tasks]
    cfg = plan.config
    pipe = _Pipeline(read_ahead)
    queues = [queue.Queue(maxsize=read_ahead) for _ in cfg.inputs]
    writer_q: queue.Queue = queue.Queue(maxsize=2)
    written = {"bytes": 0}
    sources = [_Source(_with_overlay(plan.inputs[i], job.path(overlays[i]) if i in overlays else None), dev)
               for i in range(len(cfg.inputs))]
    bar = _Bar(progress, sum(plan.tasks[t].in_bytes for t in tasks), len(plan.tasks),
               len(plan.tasks) - len(tasks))
    t_start = time.perf_counter()
    try:
        for src, q in zip(sources, queues):
            pipe.start(_read_loop, pipe, src, names, q)
        pipe.start(_write_loop, pipe, job, plan, todo, writer_q, written)
        for t in tasks:
            task = plan.tasks[t]
            t0 = time.perf_counter()
            items = [pipe.get(q) for q in queues]
            t1 = time.perf_counter()
            if any(name != task.name for name, _ in items):
                raise RuntimeError(f"reader out of order at {task.name!r}")
            if dev.type == "cuda":  # allocated on the readers' streams: not reused before this stream is past them
                for _, x in items:
                    x.record_stream(torch.cuda.current_stream(dev))
            merged = merge_one(plan, task, [x for _, x in items], seed=seed, backend=backend, device=dev)
            del items
            t2 = time.perf_counter()
            host = merged.to("cpu")
            del merged
            t3 = time.perf_counter()
            pipe.put(writer_q, (task.name, host))
            pipe.add("wait_read_s", t1 - t0)
            pipe.add("merge_s", t2 - t1)
            pipe.add("to_host_s", t3 - t2)
            pipe.add("wait_write_s", time.perf_counter() - t3)
            bar.update(task.in_bytes)
        for th in pipe.threads:
            while th.is_alive():
                th.join(timeout=0.05)
                pipe.check()
    except _Stop:
        pass
    finally:
        pipe.close()
        bar.close()
        for src in sources:
            src.close()
    pipe.check()
    stream_s = time.perf_counter() - t_start
    timings.update(stream_s=stream_s, **{k: round(v, 6) for k, v in pipe.stats.items()})
    read = sum(plan.tasks[t].in_bytes for t in tasks)
    return {"method": cfg.method, "tensors": len(plan.tasks), "tensors_merged": len(tasks),
            "tensors_resumed": len(plan.tasks) - len(tasks), "shards": plan.shard_names,
            "bytes": {"read": read, "written": written["bytes"],
                      "read_per_s": read / stream_s if stream_s > 0 else None,
                      "written_per_s": written["bytes"] / stream_s if stream_s > 0 else None}}


def _with_overlay(infos: Dict[str, TensorInfo], overlay: Optional[str]) -> Dict[str, TensorInfo]:
    """The model's tensor locations, with those of a SparseGPT work file taking precedence."""
    if overlay is None:
        return infos
    return dict(infos, **read_header(overlay))


def _complete(path: str, size: int) -> bool:
    return os.path.isfile(path) and os.path.getsize(path) == size


# ------------------------------------------------------------------ the files around the weights

def _check_tokenizers(cfg: MergeConfig) -> None:
    """tokenizer_source: base keeps the base's tokenizer; that equals mergekit's rebuilt vocabulary only when
    every model has the base's vocabulary and its embeddings have one row per token. Anything else is refused."""
    if cfg.tokenizer_source != "base":
        return
    import transformers

    def vocab(path):
        try:
            tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as exc:  # transformers raises many types for missing / broken tokenizer files
            raise MergeInputError(f"tokenizer_source: base needs every model's tokenizer; {path!r}: {exc}") from None
        return tok.get_vocab()

    base = vocab(cfg.base_ref.path)
    for m in cfg.inputs:
        if m.path != cfg.base_ref.path and vocab(m.path) != base:
            raise MergeConfigError(f"tokenizer_source: base with a vocabulary that differs from the base's "
                                   f"({m.path!r}) is not supported (mergekit would re-map embedding rows)")
        with open(os.path.join(m.path, "config.json"), encoding="utf-8") as f:
            rows = json.load(f).get("vocab_size")
        if rows is not None and rows != len(base):
            raise MergeConfigError(f"tokenizer_source: base with {rows} embedding rows for a vocabulary of "
                                   f"{len(base)} tokens ({m.path!r}) is not supported (mergekit would resize them)")


def _copy_file(job, src_dir: str, name: str, dst_name: Optional[str] = None) -> Optional[str]:
    """Copy src_dir/name into the job folder atomically, only if it is a file inside src_dir (a symlink that
    leads out of the model folder is not followed)."""
    from ..io import atomic_write

    src = os.path.join(src_dir, name)
    if not os.path.isfile(src) or not os.path.realpath(src).startswith(os.path.realpath(src_dir) + os.sep):
        return None
    with open(src, "rb") as fin, atomic_write(job.output(dst_name or name), "wb") as fout:
        shutil.copyfileobj(fin, fout)
    return dst_name or name


def _finalize(job, plan: Plan) -> List[str]:
    """Index (several shards), config.json (dtype set as mergekit sets it), tokenizer files and the config."""
    from ..io import INDEX_FILE, atomic_write, write_json_atomic

    cfg = plan.config
    files = list(plan.shard_names)
    if len(plan.shard_names) > 1:
        weight_map = {task.name: plan.shard_names[task.shard] for task in plan.tasks}
        total = sum(task.out_bytes for task in plan.tasks)
        write_json_atomic(job.output(INDEX_FILE), {"metadata": {"total_size": total}, "weight_map": weight_map})
        files.append(INDEX_FILE)
    donor = cfg.inputs[cfg.base if cfg.base is not None else 0].path
    config_path = os.path.join(donor, "config.json")
    if os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as f:
            model_config = json.load(f)
        dtype = cfg.out_dtype or cfg.dtype
        if dtype:
            keys = [k for k in ("torch_dtype", "dtype") if k in model_config] or ["torch_dtype"]
            for k in keys:
                model_config[k] = dtype
        write_json_atomic(job.output("config.json"), model_config)
        files.append("config.json")
    for name in TOKENIZER_FILES:
        if _copy_file(job, donor, name):
            files.append(name)
    with atomic_write(job.output(CONFIG_COPY), "w") as f:
        f.write(cfg.source_text)
    files.append(CONFIG_COPY)
    return files + [REPORT_FILE]


# ------------------------------------------------------------------ SparseGPT sparsification (our addition)

def _sparsegpt_stage(job, cfg: MergeConfig, dev, backend, progress, timings) -> Dict[int, str]:
    """With ``sparsification: sparsegpt``: prune each fine-tune's block-linear deltas with SparseGPT (error
    compensation on the calibration text, ``pruning.task_vectors.prune_task_vectors``) to that model's
    density, and store the pruned weights in a work file of the job folder (resume skips finished models).
    Those tensors are then merged at density 1 (already sparse; the method's sign election, weights,
    normalize and lambda apply; its own sparsification and rescale do not); every other tensor is merged as
    the method does. Returns {input index: work file}. Holds the base and one fine-tune in host memory."""
    if cfg.sparsegpt is None:
        return {}
    t0 = time.perf_counter()
    out: Dict[int, str] = {}
    loaded = None
    for k in range(len(cfg.inputs)):
        if k == cfg.base:
            continue
        rel = os.path.join(".sparsegpt", f"model{k}.safetensors")
        out[k] = rel
        if f"sparsegpt:{k}" in job.done and os.path.isfile(job.path(rel)):
            continue
        loaded = loaded or _load_base_for_sparsegpt(cfg)
        pruned, records = _prune_one_model(cfg, k, loaded, dev, backend, progress)
        from ..io import save_safetensors_atomic

        job.output_dir(".sparsegpt")
        save_safetensors_atomic(pruned, job.output(rel))
        job.mark_done(f"sparsegpt:{k}", {"layers": len(records),
                                         "rel_error_mean": sum(r["rel_error"] for r in records) / max(1, len(records))})
    timings["sparsegpt_s"] = time.perf_counter() - t0
    return out


def _merge_pruned_as_they_are(plan: Plan, job, overlays: Dict[int, str]) -> None:
    """SparseGPT-pruned tensors are already sparse: their model's density is 1 in the merge."""
    by_name = {task.name: task for task in plan.tasks}
    for k, rel in overlays.items():
        for name in read_header(job.path(rel)):
            if name in by_name and by_name[name].compute_dtype is not None:
                by_name[name].per_input[k]["density"] = 1.0


def _load_base_for_sparsegpt(cfg: MergeConfig):
    from ..pruning.pipeline import job_inputs, load_model

    sp = cfg.sparsegpt
    base, tokenizer = load_model(cfg.base_ref.path, cfg.dtype or "auto")
    _, ids = job_inputs(base, tokenizer, sp.file, nsamples=sp.nsamples, seqlen=sp.seqlen, seed=sp.seed)
    return base, ids


def _prune_one_model(cfg: MergeConfig, k: int, loaded, dev, backend, progress):
    """(pruned block-linear weights of input k by tensor name, per-layer records)."""
    from ..pruning.models import find_blocks, find_linears
    from ..pruning.pipeline import Progress, load_model
    from ..pruning.task_vectors import TaskVectorConfig, prune_task_vectors

    base, ids = loaded
    sp = cfg.sparsegpt
    ft, _ = load_model(cfg.inputs[k].path, cfg.dtype or "auto")
    layout = find_blocks(ft)
    names = [f"{n}.weight" for i in range(len(layout.blocks))
             for n in find_linears(layout.blocks[i], prefix=layout.block_name(i))]
    densities = set()
    for name in names:
        _, per_input = cfg.resolve(name, 0.0)
        densities.add(min(1.0, per_input[k].get("density", 1.0)))
    if len(densities) != 1:
        raise MergeConfigError(f"sparsification: sparsegpt needs one density per model for its block linears; model "
                               f"{cfg.inputs[k].path!r} has {sorted(densities)} (filters or gradients on density)")
    density = densities.pop()
    if density <= 0:
        raise MergeConfigError(f"sparsification: sparsegpt needs a density in (0, 1] for model {cfg.inputs[k].path!r}")
    tv = TaskVectorConfig(density=density, hessian=sp.hessian, skip=(), blocksize=sp.blocksize,
                          percdamp=sp.percdamp, batch_size=sp.batch_size, backend=backend)
    records = prune_task_vectors(base, [ft], ids, tv, device=dev, progress=Progress(progress))
    state = ft.state_dict()
    pruned = {f"{r['name']}.weight": state[f"{r['name']}.weight"].detach().cpu().contiguous() for r in records}
    return pruned, records
