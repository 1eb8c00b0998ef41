"""Model I/O for jobs: a model folder read without loading its weights, blocks streamed in and out.

* :class:`ModelFolder` checks a Hugging Face folder before any work (config.json, a known architecture, every
  safetensors header, every tensor the model needs, with its shape) and builds the model *skeleton*: the
  architecture's own modules with every parameter on the ``meta`` device (no memory) and the small buffers
  (rotary tables, position ids) real, as ``from_pretrained`` would compute them.
* :class:`WeightLoader` reads tensors with ``pread`` into (pinned, on CUDA) host buffers on background threads,
  so block i+1 is read while block i runs, and places them on the device (``non_blocking``). It counts the host
  bytes it holds (``live_bytes``, ``peak_live_bytes``), which bounds the job's host memory.
* :class:`BlockWriter` copies a finished block to pinned host memory (``non_blocking``) and, on a background
  thread, writes it into the planned output shards, measures the sparsity of what it wrote, makes it durable,
  and only then marks the block done in the job file (so a resumed job never trusts a block that is not on disk).
* :func:`copy_model_files`: everything a loader needs besides the weights (config, tokenizer, sub-folders such as
  sentence-transformers' ``1_Pooling/``), with the symlink rules of the README.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import queue
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .models import BlockLayout, find_blocks
from .settings import ConfigError, InputError

# files of a model folder that hold weights: the pruned weights replace the top-level ones
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".index.json", ".gguf")
DTYPES = {"auto": None, "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
OUTSIDE = "outside"          # the job-file step of the tensors outside the blocks


# --------------------------------------------------------------------------------------------- devices

def resolve_device(device: Optional[str]) -> torch.device:
    """'cuda' when there is a GPU (or asked for), else 'cpu'; ConfigError for a device that cannot run."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} was asked for but torch sees no CUDA GPU "
                          f"(torch {torch.__version__}); use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"device {device!r}: torch sees {torch.cuda.device_count()} GPU(s)")
    return dev


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


# --------------------------------------------------------------------------------------------- model folder

@contextlib.contextmanager
def _parameters_on_meta():
    """Every parameter registered inside the block lands on the meta device; buffers are created normally,
    so the values a module computes in ``__init__`` (rotary frequencies, position ids) stay real."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        p = module._parameters.get(name)
        if p is not None and p.device.type != "meta":
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    return transformers


class ModelFolder:
    """A local Hugging Face model folder, checked without reading its weights (see the module docstring)."""

    def __init__(self, path: str, dtype: str = "auto"):
        from ..io import SafetensorsReader

        self.path = os.path.abspath(path)
        if not os.path.isdir(self.path):
            raise InputError(f"model folder {path!r} does not exist or is not a folder")
        if not os.path.isfile(os.path.join(self.path, "config.json")):
            raise InputError(f"model folder {path!r} has no config.json; expected a Hugging Face model folder")
        if dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        transformers = _transformers()
        try:
            self.config = transformers.AutoConfig.from_pretrained(self.path, local_files_only=True)
        except Exception as exc:  # transformers raises many types for a broken or unknown config
            raise InputError(f"cannot read {os.path.join(path, 'config.json')}: {exc}") from None
        archs = getattr(self.config, "architectures", None) or []
        if not archs:
            raise InputError(f"{os.path.join(path, 'config.json')} names no architecture (\"architectures\": "
                             "[...]); cannot tell which model class to build")
        self.cls = getattr(transformers, archs[0], None)
        if not isinstance(self.cls, type) or not issubclass(self.cls, nn.Module):
            raise InputError(f"{os.path.join(path, 'config.json')} names the architecture {archs[0]!r}, which "
                             f"transformers {transformers.__version__} does not know")
        try:
            self.reader = SafetensorsReader(self.path)
        except (ValueError, FileNotFoundError) as exc:
            raise InputError(str(exc)) from None
        self.dtype = DTYPES[dtype] or self._saved_dtype()

    def _saved_dtype(self) -> torch.dtype:
        d = getattr(self.config, "dtype", None) or getattr(self.config, "torch_dtype", None)
        if isinstance(d, str):
            d = getattr(torch, d, None)
        if isinstance(d, torch.dtype) and d.is_floating_point:
            return d
        for name in self.reader.keys():
            if self.reader.info(name).dtype.is_floating_point:
                return self.reader.info(name).dtype
        return torch.float32

    def max_positions(self) -> Optional[int]:
        """The longest sequence the model's position embeddings cover, when the config says."""
        for key in ("max_position_embeddings", "n_positions", "n_ctx"):
            v = getattr(self.config, key, None)
            if isinstance(v, int) and v > 0:
                return v
        return None

    def tokenizer(self):
        try:
            return _transformers().AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        except Exception:  # no tokenizer files: pre-tokenised data is still usable
            return None

    def skeleton(self) -> nn.Module:
        """The model with every parameter on the meta device (see :func:`_parameters_on_meta`), in eval mode."""
        with _parameters_on_meta():
            try:
                model = self.cls._from_config(self.config, dtype=self.dtype)
            except TypeError:        # transformers < 4.56 spells it torch_dtype
                model = self.cls._from_config(self.config, torch_dtype=self.dtype)
        return model.eval()


# --------------------------------------------------------------------------------------------- tensors of a model

class ModelTensors:
    """The tensors of a skeleton and where each comes from in the checkpoint.

    ``names``: every parameter (tied ones once) and persistent buffer the checkpoint provides, in state-dict order
    (what ``save_pretrained`` writes); ``source[name]``: its checkpoint name (the model's base prefix added or
    removed where the checkpoint was saved from the bare model or the wrapper). Missing parameters or shapes
    that differ from the config are refused before any work.
    """

    def __init__(self, model: nn.Module, reader, folder: str):
        self.model = model
        self._aliases: Dict[int, List[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            self._aliases.setdefault(id(p), []).append(name)
        params = dict(model.named_parameters())
        persistent = self._persistent_buffers(model)
        prefix = getattr(model, "base_model_prefix", "") or ""
        self.source: Dict[str, str] = {}
        missing, wrong = [], []
        for name in model.state_dict(keep_vars=True):
            if name not in params and name not in persistent:
                continue                      # a tied alias, or a non-persistent buffer
            src = self._find(name, reader, prefix)
            if src is None:
                if name in params:
                    missing.append(name)
                continue
            t = params.get(name, persistent.get(name))
            if tuple(reader.info(src).shape) != tuple(t.shape):
                wrong.append(f"{src} {list(reader.info(src).shape)} (the config says {list(t.shape)})")
            self.source[name] = src
        if missing:
            raise InputError(f"model folder {folder!r}: the checkpoint lacks {len(missing)} tensor(s) that "
                             f"{type(model).__name__} needs, e.g. {missing[:3]}")
        if wrong:
            raise InputError(f"model folder {folder!r}: tensor shapes differ from config.json: {wrong[:3]}")
        self.names = list(self.source)
        self._meta = {n: self._get(n) for n in self.names}

    @staticmethod
    def _persistent_buffers(model: nn.Module) -> Dict[str, torch.Tensor]:
        out = {}
        for mod_name, mod in model.named_modules():
            for key, b in mod._buffers.items():
                if b is not None and key not in mod._non_persistent_buffers_set:
                    out[f"{mod_name}.{key}" if mod_name else key] = b
        return out

    @staticmethod
    def _find(name: str, reader, prefix: str) -> Optional[str]:
        candidates = [name]
        if prefix:
            candidates += [name[len(prefix) + 1:]] if name.startswith(prefix + ".") else [f"{prefix}.{name}"]
        return next((c for c in candidates if c in reader), None)

    def _get(self, name: str) -> torch.Tensor:
        mod, key = self._owner(name)
        return mod._parameters[key] if key in mod._parameters else mod._buffers[key]

    def _owner(self, name: str) -> Tuple[nn.Module, str]:
        path, _, key = name.rpartition(".")
        return (self.model.get_submodule(path) if path else self.model), key

    def dtype_of(self, name: str) -> torch.dtype:
        return self._meta[name].dtype

    def shape_of(self, name: str) -> Tuple[int, ...]:
        return tuple(self._meta[name].shape)

    def under(self, prefix: str) -> List[str]:
        return [n for n in self.names if n.startswith(prefix + ".")]

    def outside(self, layout: BlockLayout) -> List[str]:
        return [n for n in self.names if not n.startswith(layout.prefix + ".")]

    def set(self, tensors: Dict[str, torch.Tensor]) -> None:
        """Put ``tensors`` into the model (every tied alias of a parameter too)."""
        for name, t in tensors.items():
            old = self._get(name)
            if isinstance(old, nn.Parameter):
                new = nn.Parameter(t, requires_grad=False)
                for alias in self._aliases.get(id(old), [name]):
                    mod, key = self._owner(alias)
                    mod._parameters[key] = new
            else:
                mod, key = self._owner(name)
                mod._buffers[key] = t

    def release(self, names: Iterable[str]) -> None:
        """Give ``names`` their meta placeholders back (the weights' memory is freed)."""
        self.set({n: self._meta[n] for n in names})

    def current(self, names: Iterable[str]) -> Dict[str, torch.Tensor]:
        return {n: self._get(n).detach() for n in names}


def move_buffers(module: nn.Module, device) -> None:
    """Move the (non-weight) buffers of ``module`` and its children, e.g. a block's causal-mask table."""
    for mod in module.modules():
        for key, b in mod._buffers.items():
            if b is not None and b.device != torch.device(device) and b.device.type != "meta":
                mod._buffers[key] = b.to(device)


# --------------------------------------------------------------------------------------------- reading

class WeightLoader:
    """Read checkpoint tensors on background threads into host buffers, then place them on the device.

    ``submit(names)`` starts reading (pinned buffers when the device is a GPU) and returns a Future of
    {name: host tensor}; ``place(host)`` moves them to the device in the model's dtype (non-blocking from
    pinned memory). Every buffer's storage is followed by a weak reference, so ``live_bytes`` is the host memory
    of loaded weights that anything (a module, a queued write) still holds, and ``peak_live_bytes`` its maximum,
    taken at each allocation: a count, not a timer, and what bounds the job's host memory.
    """

    def __init__(self, reader, tensors: ModelTensors, device: torch.device, *, threads: int = 4):
        self.reader = reader
        self.tensors = tensors
        self.device = device
        self.pin = device.type == "cuda"
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="se-read")
        self._lock = threading.Lock()
        self._held: List[Tuple[Any, int]] = []      # (weak reference to a buffer's storage, bytes)
        self.peak_live_bytes = 0

    @property
    def live_bytes(self) -> int:
        """Bytes of the host buffers this loader allocated whose memory is still referenced by anything."""
        with self._lock:
            self._held = [(ref, n) for ref, n in self._held if not ref.expired()]
            return sum(n for _, n in self._held)

    def _track(self, buf: torch.Tensor) -> None:
        # memory only grows here, so the peak measured at each allocation is the true peak
        from torch.multiprocessing.reductions import StorageWeakRef

        n = buf.numel()
        live = self.live_bytes + n
        with self._lock:
            self._held.append((StorageWeakRef(buf.untyped_storage()), n))
            self.peak_live_bytes = max(self.peak_live_bytes, live)

    def _read(self, reader, source: str) -> torch.Tensor:
        info = reader.info(source)
        buf = torch.empty(info.nbytes, dtype=torch.uint8, pin_memory=self.pin)
        self._track(buf)
        return reader.read_into(source, buf.view(info.dtype) if info.nbytes else torch.empty(0, dtype=info.dtype))

    def submit(self, names: Sequence[str], *, reader=None, sources: Optional[Dict[str, str]] = None) -> Future:
        """Start reading ``names`` (from ``reader``, default the model folder, under their checkpoint names
        ``sources``, default the model's own map); the Future gives {name: host tensor}."""
        reader = reader or self.reader
        sources = sources or self.tensors.source
        futures = {n: self._pool.submit(self._read, reader, sources[n]) for n in names}
        out: Future = Future()
        lock = threading.Lock()

        def gather(_):
            with lock:
                if out.done() or not all(f.done() for f in futures.values()):
                    return
                try:
                    out.set_result({n: f.result() for n, f in futures.items()})
                except BaseException as exc:     # a read error surfaces where the job waits for the block
                    out.set_exception(exc)
                futures.clear()                  # no reference cycle keeps the buffers alive until a GC

        pending = list(futures.values())
        if not pending:
            out.set_result({})
        for f in pending:
            f.add_done_callback(gather)
        return out

    def place(self, host: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """{name: tensor on the device in the model's dtype}."""
        out = {}
        for name, t in host.items():
            dtype = self.tensors.dtype_of(name)
            if self.device.type == "cpu":
                out[name] = t if t.dtype == dtype else t.to(dtype)
            else:
                out[name] = t.to(self.device, non_blocking=True).to(dtype)
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=True)


# --------------------------------------------------------------------------------------------- writing

class BlockWriter:
    """Write finished groups of tensors (a block, the tensors outside the blocks) on background threads.

    ``submit(step, tensors, measure, info)``: device tensors are copied into pinned host buffers with
    ``non_blocking`` copies queued behind the work that produced them (no host synchronisation). The writer
    thread waits for the copy, counts the zeros of the tensors named in ``measure`` (the sparsity of what is
    written), writes them into the planned shards (page cache) and lets the buffers go; the sync thread makes
    the writes durable, batching whatever groups are waiting (a slow disk means fewer, larger syncs, never a
    stalled writer), and only then calls ``on_done(step, info, measured)`` for each, in order. At most
    ``depth`` groups wait for the writer, so host memory stays bounded; an error on either thread is raised
    by the next call.
    """

    def __init__(self, shards, on_done: Callable[[str, Dict[str, Any], Dict[str, float]], None], *,
                 depth: int = 1):
        self.shards = shards
        self.on_done = on_done
        self._queue: "queue.Queue" = queue.Queue(maxsize=depth)
        self._synced: "queue.Queue" = queue.Queue()
        self._error: Optional[BaseException] = None
        self.seconds = 0.0          # writer thread: waiting for copies, counting, writing
        self.sync_seconds = 0.0     # sync thread
        self._threads = [threading.Thread(target=self._write_loop, name="se-write", daemon=True),
                         threading.Thread(target=self._sync_loop, name="se-sync", daemon=True)]
        for t in self._threads:
            t.start()

    def submit(self, step: str, tensors: Dict[str, torch.Tensor], measure: Sequence[str] = (),
               info: Optional[Dict[str, Any]] = None) -> None:
        self._raise()
        host, event = {}, None
        for name, t in tensors.items():
            if t.device.type == "cpu":
                host[name] = t.contiguous()
            else:
                buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                buf.copy_(t, non_blocking=True)
                host[name] = buf
        if any(t.device.type == "cuda" for t in tensors.values()):
            event = torch.cuda.Event()
            event.record()
        while True:                      # bounded wait that still notices a failed writer
            try:
                self._queue.put((step, host, event, list(measure), info or {}), timeout=0.5)
                return
            except queue.Full:
                self._raise()

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    self._synced.put(None)
                    return
                if self._error is None:
                    self._synced.put(self._write(*item))
            except BaseException as exc:   # noqa: BLE001 - raised in the job's thread by the next call
                self._error = exc
            finally:
                item = None                # the host copies go now, not when the next item arrives
                self._queue.task_done()

    def _write(self, step, host, event, measure, info) -> tuple:
        t0 = time.perf_counter()
        if event is not None:
            event.synchronize()
        measured = {n: 1.0 - float(torch.count_nonzero(host[n])) / max(1, host[n].numel()) for n in measure}
        for name, t in host.items():
            self.shards.write(name, t)
        self.seconds += time.perf_counter() - t0
        return step, info, measured

    def _sync_loop(self) -> None:
        while True:
            batch = [self._synced.get()]
            while True:                    # whatever else is already waiting joins this sync
                try:
                    batch.append(self._synced.get_nowait())
                except queue.Empty:
                    break
            done = [b for b in batch if b is not None]
            try:
                if done and self._error is None:
                    t0 = time.perf_counter()
                    self.shards.sync()
                    self.sync_seconds += time.perf_counter() - t0
                    for step, info, measured in done:
                        self.on_done(step, info, measured)
            except BaseException as exc:   # noqa: BLE001
                self._error = exc
            finally:
                for _ in batch:
                    self._synced.task_done()
            if len(done) < len(batch):
                return

    def _raise(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def drain(self) -> None:
        """Wait until everything submitted is written, synced and marked done (raising a writer error)."""
        self._queue.join()
        self._synced.join()
        self._raise()

    def close(self) -> None:
        """Drain, then end the threads (a second call only re-raises nothing)."""
        if self._threads[0].is_alive():
            self._queue.put(None)
        for t in self._threads:
            t.join()
        self._raise()


# --------------------------------------------------------------------------------------------- other files

def _hf_blobs(model_dir: str) -> Optional[str]:
    """The blobs/ folder of a Hugging Face cache repo when ``model_dir`` is one of its snapshots."""
    real = os.path.realpath(model_dir)
    snapshots = os.path.dirname(real)
    repo = os.path.dirname(snapshots)
    if os.path.basename(snapshots) == "snapshots" and os.path.isdir(os.path.join(repo, "blobs")):
        return os.path.join(repo, "blobs")
    return None


def _module_folders(model_dir: str) -> set:
    """Sub-folders that sentence-transformers' modules.json lists: copied whole (their weights included)."""
    try:
        with open(os.path.join(model_dir, "modules.json"), encoding="utf-8") as f:
            mods = json.load(f)
        return {os.path.normpath(m["path"]) for m in mods if isinstance(m, dict) and m.get("path")}
    except (OSError, ValueError, TypeError, KeyError):
        return set()


def files_to_copy(model_dir: str, skip_names: Sequence[str] = ()) -> Tuple[List[str], List[str], List[str]]:
    """(files, folders, skipped) relative to ``model_dir`` that the output keeps besides the pruned weights.

    Kept: every file and folder below the model folder except hidden ones, the top-level weight files (the
    pruned weights replace them), weight files in sub-folders that are not sentence-transformers modules
    (e.g. a second copy of the original weights), and ``skip_names`` at the top (the job's own files).
    A symlink is kept only when it resolves inside the model folder, or, for a Hugging Face cache snapshot,
    inside its repository's blobs/; any other link is skipped (and listed), never followed.
    """
    top = os.path.realpath(model_dir)
    allowed = [top] + ([_hf_blobs(model_dir)] if _hf_blobs(model_dir) else [])
    modules = _module_folders(model_dir)
    files, dirs, skipped = [], [], []

    def ok_link(p: str) -> bool:
        target = os.path.realpath(p)
        return any(target == a or target.startswith(a + os.sep) for a in allowed)

    for root, subdirs, names in os.walk(top):
        rel_root = os.path.relpath(root, top)
        keep_dirs = []
        for d in sorted(subdirs):
            rel = os.path.normpath(os.path.join(rel_root, d))
            if d.startswith("."):
                continue
            if os.path.islink(os.path.join(root, d)):
                skipped.append(rel + "/ (symlinked folder)")
                continue
            keep_dirs.append(d)
            dirs.append(rel)
        subdirs[:] = keep_dirs
        in_module = any(rel_root == m or rel_root.startswith(m + os.sep) for m in modules)
        for n in sorted(names):
            rel = os.path.normpath(os.path.join(rel_root, n))
            p = os.path.join(root, n)
            if n.startswith(".") or (rel_root == "." and (n in skip_names or n.endswith(WEIGHT_SUFFIXES))):
                continue
            if rel_root != "." and n.endswith(WEIGHT_SUFFIXES) and not in_module:
                skipped.append(rel + " (weights outside the pruned model)")
                continue
            if os.path.islink(p) and not ok_link(p):
                skipped.append(rel + " (symlink to outside the model folder)")
                continue
            if os.path.isfile(p):
                files.append(rel)
    return files, dirs, skipped


def copy_model_files(model_dir: str, out_path: Callable[[str], str], out_dir: Callable[[str], str], *,
                     skip_names: Sequence[str] = (), config_dtype: Optional[torch.dtype] = None
                     ) -> Tuple[List[str], List[str]]:
    """Copy :func:`files_to_copy` into the output: ``out_dir(rel)`` makes a folder, ``out_path(rel)`` gives the
    path to write a file (a job folder records both first). Each file is written atomically; config.json gets
    ``config_dtype`` as its dtype when the weights were converted. Returns (copied files, skipped)."""
    from ..io import atomic_write

    files, dirs, skipped = files_to_copy(model_dir, skip_names)
    for d in dirs:
        out_dir(d)
    for rel in files:
        src = os.path.join(model_dir, rel)
        with open(src, "rb") as fin, atomic_write(out_path(rel), "wb") as fout:
            if rel == "config.json" and config_dtype is not None:
                fout.write(_config_with_dtype(fin.read(), config_dtype))
            else:
                shutil.copyfileobj(fin, fout, 1 << 20)
    return files, skipped


def _config_with_dtype(raw: bytes, dtype: torch.dtype) -> bytes:
    cfg = json.loads(raw.decode("utf-8"))
    name = str(dtype).replace("torch.", "")
    changed = False
    for key in ("dtype", "torch_dtype"):
        if key in cfg and cfg[key] != name:
            cfg[key], changed = name, True
    if not changed and "dtype" not in cfg and "torch_dtype" not in cfg:
        cfg["torch_dtype"], changed = name, True
    return (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode("utf-8") if changed else raw


def layout_of(model: nn.Module) -> BlockLayout:
    try:
        return find_blocks(model)
    except ValueError as exc:
        raise InputError(str(exc)) from None


# --------------------------------------------------------------------------------------------- whole models in memory

def load_model(model_dir: str, dtype: str = "auto"):
    """(model on the CPU, tokenizer or None) from a local folder with its own architecture class, after the
    checks of :class:`ModelFolder` (for jobs that hold whole models: task vectors, the demo)."""
    folder = ModelFolder(model_dir, dtype)
    kwargs = {"local_files_only": True}
    try:
        try:
            model = folder.cls.from_pretrained(folder.path, dtype=folder.dtype, **kwargs)
        except TypeError:
            model = folder.cls.from_pretrained(folder.path, torch_dtype=folder.dtype, **kwargs)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot load the model in {model_dir!r} with {folder.cls.__name__}: {exc}") from None
    return model.eval(), folder.tokenizer()


def unique_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """state_dict without the second name of tied tensors (lm_head tied to the embeddings)."""
    out, seen = {}, set()
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype) if t.numel() else None
        if key is not None and key in seen:
            continue
        seen.add(key)
        out[name] = t
    return out


def write_weights(tensors: Dict[str, torch.Tensor], path_of: Callable[[str], str], *,
                  max_shard_bytes: int = 5 * 2**30) -> dict:
    """Write a state dict as Hugging Face safetensors shards (``path_of(relative name)`` gives each file's path,
    e.g. a job folder's ``output``); returns the index."""
    from ..io import PlannedShardWriter, ShardPlan

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    plan = ShardPlan.make([(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()], max_shard_bytes)
    writer = PlannedShardWriter(None, plan, path_of=path_of)
    try:
        for k, v in tensors.items():
            writer.write(k, v)
        return writer.close()
    finally:
        writer.abort()
