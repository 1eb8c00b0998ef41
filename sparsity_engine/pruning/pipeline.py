"""Sequential, block-by-block pruning of a Hugging Face model (SparseGPT's recipe, generalised).

1. Run the model on the calibration ids up to block 0 and capture that block's inputs (hidden states plus
   every other argument the block is called with: masks, position embeddings ...). A forward pre-hook on
   block 0 records them and raises a private exception, so nothing past the embeddings runs.
2. For each block, on ``device`` (the other blocks stay on the CPU):
   a. one forward pass over the calibration inputs with hooks on every Linear / Conv1D accumulating its
      Hessian ``H = 2/n X^T X`` (layers fed the same tensor, e.g. q/k/v, share one accumulator);
   b. prune each layer (sparsegpt | wanda | magnitude; unstructured or N:M; per-layer overrides; skips);
   c. run the *pruned* block on the same inputs: its outputs are the next block's inputs;
   d. move the block back to the CPU, free the Hessians, report.

:func:`prune_model` does this in memory; :func:`run_prune_job` wraps it with a model folder on disk,
calibration data, a resumable output folder (a manifest entry per finished block), safetensors output that
``from_pretrained`` loads, a JSON report and a PNG plot.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .._validate import check_fraction, check_int
from .layer_pruners import METHODS, LayerSpec, output_energy, prune_layer
from .models import (DEFAULT_SKIP, BlockLayout, find_blocks, find_linears, matches, set_weight_out_in_,
                     weight_out_in)

REPORT_JSON = "sparsity_report.json"
REPORT_PNG = "sparsity_report.png"
JOB_JSON = "sparsity_job.json"
BLOCKS_DIR = ".sparsity_blocks"
# files of a model folder that are weights (never copied: the pruned weights replace them)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".index.json")


class InputError(ValueError):
    """The model folder, calibration data or output folder cannot be used (CLI exit code 3)."""


class ConfigError(ValueError):
    """A bad pruning setting (CLI exit code 2)."""


# --------------------------------------------------------------------------------------------- settings

def parse_target(text: str, method: str) -> LayerSpec:
    """'0.5' -> unstructured 50%; '2:4' -> N:M; 'wanda:0.5' / 'magnitude:2:4' also set the method."""
    text = str(text).strip()
    head, _, rest = text.partition(":")
    if head in METHODS:
        method, text = head, rest
    if ":" in text:
        n_s, _, m_s = text.partition(":")
        try:
            n, m = int(n_s), int(m_s)
        except ValueError:
            raise ConfigError(f"pattern must be N:M with integers, e.g. 2:4, got {text!r}") from None
        if not (0 < n < m):
            raise ConfigError(f"pattern N:M needs 0 < N < M, got {text!r}")
        return LayerSpec(method, 1.0 - n / m, n, m)
    try:
        sparsity = float(text)
    except ValueError:
        raise ConfigError(f"sparsity must be a number in [0, 1) or an N:M pattern, got {text!r}") from None
    if not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"sparsity must be in [0, 1), got {sparsity}")
    return LayerSpec(method, sparsity)


@dataclass
class PruneConfig:
    """What to prune and how. ``pattern`` (n, m) overrides ``sparsity``; ``overrides`` maps a layer-name
    pattern (fnmatch, or a name suffix) to a target such as '0.3', '2:4' or 'wanda:0.6' (first match wins;
    a target of 0 skips the layer); ``skip`` patterns are never pruned."""

    method: str = "sparsegpt"
    sparsity: float = 0.5
    pattern: Optional[Tuple[int, int]] = None
    overrides: List[Tuple[str, str]] = field(default_factory=list)
    skip: Tuple[str, ...] = DEFAULT_SKIP
    blocksize: int = 128
    percdamp: float = 0.01
    batch_size: int = 8
    backend: Optional[str] = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        try:
            check_fraction("sparsity", self.sparsity, high=1.0, high_inclusive=False)
            check_int("blocksize", self.blocksize, minimum=1)
            check_fraction("percdamp", self.percdamp, low=0.0, low_inclusive=False, high=float("inf"))
            check_int("batch_size", self.batch_size, minimum=1)
            if self.pattern is not None:
                n, m = self.pattern
                check_int("pattern N", n, minimum=1)
                check_int("pattern M", m, minimum=2)
                if n >= m:
                    raise ValueError(f"pattern N:M needs N < M, got {n}:{m}")
        except (TypeError, ValueError) as exc:
            raise ConfigError(str(exc)) from None
        self.skip = tuple(self.skip)
        self._override_specs = [(pat, parse_target(t, self.method)) for pat, t in self.overrides]

    def default_spec(self) -> LayerSpec:
        if self.pattern is not None:
            n, m = self.pattern
            return LayerSpec(self.method, 1.0 - n / m, n, m)
        return LayerSpec(self.method, self.sparsity)

    def spec_for(self, name: str) -> Optional[LayerSpec]:
        """The target of layer ``name`` (qualified), None when it is skipped."""
        if matches(name, self.skip):
            return None
        for pat, spec in self._override_specs:
            if matches(name, [pat]):
                return None if (not spec.structured and spec.sparsity == 0) else spec
        spec = self.default_spec()
        return None if (not spec.structured and spec.sparsity == 0) else spec

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["pattern"] = None if self.pattern is None else f"{self.pattern[0]}:{self.pattern[1]}"
        d["skip"] = list(self.skip)
        d["overrides"] = [list(o) for o in self.overrides]
        return d


# --------------------------------------------------------------------------------------------- progress

class Progress:
    """tqdm bars when tqdm is installed and ``enabled``; otherwise silent (or one line per block)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        try:
            from tqdm.auto import tqdm
        except ImportError:
            tqdm = None
        self._tqdm = tqdm if enabled else None

    def bar(self, total: int, desc: str, *, leave: bool = True, position: int = 0):
        if self._tqdm is None:
            return _NullBar(desc if self.enabled and leave else None)
        return self._tqdm(total=total, desc=desc, leave=leave, position=position, dynamic_ncols=True)

    def write(self, msg: str) -> None:
        if not self.enabled:
            return
        if self._tqdm is not None:
            self._tqdm.write(msg)
        else:
            print(msg, flush=True)


class _NullBar:
    def __init__(self, desc: Optional[str]):
        self.desc, self.n = desc, 0

    def update(self, k: int = 1) -> None:
        self.n += k

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------------------------- capture

class _StopForward(Exception):
    """Raised by the block-0 pre-hook once its inputs are recorded: nothing past the embeddings runs."""


@dataclass
class BlockInputs:
    """The calibration activations entering the current block, one entry per batch.

    ``hidden[b]``: [batch, seqlen, hidden]; ``extra_args[b]`` / ``kwargs[b]``: the block's other positional
    and keyword arguments for that batch (masks, position embeddings ...), on the compute device.
    """

    hidden: List[torch.Tensor]
    extra_args: List[tuple]
    kwargs: List[dict]

    @property
    def nsamples(self) -> int:
        return sum(h.shape[0] for h in self.hidden)


def _modules_outside(model: nn.Module, layout: BlockLayout) -> List[nn.Module]:
    inside = {id(m) for m in layout.blocks.modules()}
    return [m for m in model.modules() if id(m) not in inside]


def _move_own_tensors(module: nn.Module, device) -> None:
    for key, p in module._parameters.items():
        if p is not None and p.device != torch.device(device):
            p.data = p.data.to(device)
    for key, b in module._buffers.items():
        if b is not None:
            module._buffers[key] = b.to(device)


def move_outside_blocks(model: nn.Module, layout: BlockLayout, device) -> None:
    """Move embeddings, norms, heads, rotary tables (everything but the blocks) to ``device``."""
    for mod in _modules_outside(model, layout):
        _move_own_tensors(mod, device)


def _forward_kwargs(model: nn.Module, ids: torch.Tensor) -> Dict[str, Any]:
    import inspect

    kw: Dict[str, Any] = {"input_ids": ids}
    params = inspect.signature(model.forward).parameters
    if "attention_mask" in params:
        kw["attention_mask"] = torch.ones_like(ids)
    if "use_cache" in params:
        kw["use_cache"] = False
    return kw


@torch.no_grad()
def capture_block_inputs(model: nn.Module, layout: BlockLayout, ids: torch.Tensor, *, device,
                         batch_size: int = 8) -> BlockInputs:
    """Run the model's head on ``ids`` [nsamples, seqlen] and record block 0's inputs per batch."""
    record = BlockInputs([], [], [])

    def hook(module, args, kwargs):
        if args:
            hidden, rest = args[0], tuple(args[1:])
        else:
            kwargs = dict(kwargs)
            hidden, rest = kwargs.pop("hidden_states"), ()
        record.hidden.append(hidden.detach())
        record.extra_args.append(rest)
        record.kwargs.append(dict(kwargs))
        raise _StopForward

    move_outside_blocks(model, layout, device)
    handle = layout.blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, ids.shape[0], batch_size):
            batch = ids[start:start + batch_size].to(device)
            try:
                model(**_forward_kwargs(model, batch))
            except _StopForward:
                continue
            raise RuntimeError(f"{type(model).__name__}'s forward never reached block 0 "
                               f"('{layout.block_name(0)}'); cannot capture calibration inputs")
    finally:
        handle.remove()
        move_outside_blocks(model, layout, "cpu")
    return record


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs, *, replace: bool) -> Optional[List[torch.Tensor]]:
    """Forward every batch through ``block``; with ``replace`` the outputs become ``inputs.hidden``."""
    for b, hidden in enumerate(inputs.hidden):
        out = _first(block(hidden, *inputs.extra_args[b], **inputs.kwargs[b]))
        if replace:
            inputs.hidden[b] = out
    return None


# --------------------------------------------------------------------------------------------- Hessians

@torch.no_grad()
def collect_hessians(block: nn.Module, layers: Dict[str, nn.Module], inputs: BlockInputs, *,
                     device, backend: Optional[str] = None) -> Dict[str, Any]:
    """One forward pass of ``block`` with hooks: a HessianAccumulator per distinct input of ``layers``.

    Returns {layer name: accumulator}; layers that read the very same tensor (q/k/v, gate/up) share one.
    """
    from ..ops.hessian import HessianAccumulator

    accs: Dict[str, Any] = {}
    leader: Dict[str, str] = {}          # layer -> layer whose accumulator it shares (decided on batch 0)
    # input identity -> (first layer that saw it, the tensor): holding the tensor until the batch ends keeps
    # its address from being reused by a later, different input of the same shape
    seen: Dict[tuple, tuple] = {}

    def make_hook(name: str, columns: int):
        def hook(module, args, output):
            x = args[0]
            key = (x.data_ptr(), tuple(x.shape), x.dtype)
            first = seen.setdefault(key, (name, x))[0]
            if name not in leader:
                leader[name] = first
            elif first != leader[name]:
                raise RuntimeError(f"layer {name} shared its input with {leader[name]} on the first batch "
                                   f"but not on a later one; cannot share its Hessian")
            if leader[name] == name:
                if name not in accs:
                    accs[name] = HessianAccumulator(columns, device=device, backend=backend)
                accs[name].add_batch(x)
        return hook

    handles = [mod.register_forward_hook(make_hook(name, weight_out_in(mod).shape[1]))
               for name, mod in layers.items()]
    try:
        for b, hidden in enumerate(inputs.hidden):
            seen.clear()
            block(hidden, *inputs.extra_args[b], **inputs.kwargs[b])
    finally:
        for h in handles:
            h.remove()
    return {name: accs[leader[name]] for name in layers if name in leader}


# --------------------------------------------------------------------------------------------- pruning

@dataclass
class LayerRecord:
    block: int
    name: str
    method: str
    target: str
    shape: Tuple[int, int]
    sparsity: float
    loss: float
    rel_error: float
    seconds: float


@torch.no_grad()
def prune_block(block: nn.Module, index: int, layout: BlockLayout, inputs: BlockInputs, config: PruneConfig, *,
                device, progress: Optional[Progress] = None) -> List[LayerRecord]:
    """Prune the linears of one block in place (block already on ``device``), returning one record each."""
    prefix = layout.block_name(index)
    layers = find_linears(block, prefix=prefix)
    specs = {name: config.spec_for(name) for name in layers}
    targets = {name: layers[name] for name, spec in specs.items() if spec is not None}
    if not targets:
        return []
    hessians = collect_hessians(block, targets, inputs, device=device, backend=config.backend)
    records = []
    bar = (progress or Progress(False)).bar(len(targets), f"block {index}", leave=False, position=1)
    try:
        for name, mod in targets.items():
            records.append(_prune_one(name, mod, specs[name], hessians[name].H, index, config))
            bar.set_postfix_str(f"{name.rsplit('.', 2)[-2:]} err {records[-1].rel_error:.3g}")
            bar.update(1)
    finally:
        bar.close()
    del hessians
    return records


def _prune_one(name: str, mod: nn.Module, spec: LayerSpec, H: torch.Tensor, index: int,
               config: PruneConfig) -> LayerRecord:
    t0 = time.perf_counter()
    w = weight_out_in(mod).detach()
    if spec.structured and w.shape[1] % spec.prune_m:
        raise ConfigError(f"layer {name} has {w.shape[1]} input columns, not divisible by M={spec.prune_m} "
                          f"of the {spec.prune_n}:{spec.prune_m} pattern; skip it (--skip) or override it")
    res = prune_layer(w, H, spec, blocksize=config.blocksize, percdamp=config.percdamp, backend=config.backend)
    if not bool(torch.isfinite(res.weight).all()):
        raise FloatingPointError(f"pruning layer {name} produced NaN/Inf weights")
    energy = output_energy(w, H)
    set_weight_out_in_(mod, res.weight)
    if w.is_cuda:
        torch.cuda.synchronize(w.device)
    loss = float(res.loss.sum())
    zeros = float((weight_out_in(mod) == 0).float().mean())
    target = f"{spec.prune_n}:{spec.prune_m}" if spec.structured else f"{spec.sparsity:g}"
    return LayerRecord(index, name, spec.method, target, tuple(w.shape), zeros, loss,
                       loss / energy if energy > 0 else 0.0, time.perf_counter() - t0)


def prune_model(model: nn.Module, calib_ids: torch.Tensor, config: PruneConfig, *, device=None,
                progress: Optional[Progress] = None, start_block: int = 0,
                load_block: Optional[Callable[[int, nn.Module], None]] = None,
                on_block_done: Optional[Callable[[int, nn.Module, List[LayerRecord], Dict[str, float]], None]] = None
                ) -> List[LayerRecord]:
    """Prune ``model`` (on the CPU) in place, block by block on ``device``; returns every layer's record.

    Blocks before ``start_block`` are already pruned (``load_block(i, block)`` restores them, e.g. from a
    resumed job): they are only run forward, to rebuild the next block's inputs.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    progress = progress or Progress(False)
    layout = find_blocks(model)
    model.eval()
    inputs = capture_block_inputs(model, layout, calib_ids, device=device, batch_size=config.batch_size)
    records: List[LayerRecord] = []
    bar = progress.bar(len(layout), "blocks")
    try:
        for i, block in enumerate(layout.blocks):
            t0 = time.perf_counter()
            block.to(device)
            if i < start_block:
                if load_block is not None:
                    load_block(i, block)
                block_records = []
            else:
                block_records = prune_block(block, i, layout, inputs, config, device=device, progress=progress)
            t1 = time.perf_counter()
            run_block(block, inputs, replace=True)
            block.to("cpu")
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.empty_cache()
            timing = {"prune_s": t1 - t0, "propagate_s": time.perf_counter() - t1}
            records.extend(block_records)
            if on_block_done is not None and i >= start_block:
                on_block_done(i, block, block_records, timing)
            bar.update(1)
    finally:
        bar.close()
    return records


# --------------------------------------------------------------------------------------------- job (disk)

def _versions() -> Dict[str, Any]:
    import sparsity_engine

    out = {"python": platform.python_version(), "torch": torch.__version__,
           "sparsity_engine": sparsity_engine.__version__, "cuda_runtime": torch.version.cuda}
    for mod in ("transformers", "triton", "safetensors"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = None
    return out


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def resolve_device(device: Optional[str]) -> torch.device:
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
    return dev


DTYPES = {"auto": None, "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def load_model(model_dir: str, dtype: str = "auto"):
    """(model on the CPU, tokenizer or None) from a local folder, offline, with its own architecture class."""
    if not os.path.isdir(model_dir):
        raise InputError(f"model folder {model_dir!r} does not exist or is not a folder")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise InputError(f"model folder {model_dir!r} has no config.json; expected a Hugging Face model folder")
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except Exception as exc:  # transformers raises many types for a broken config
        raise InputError(f"cannot read the config of {model_dir!r}: {exc}") from None
    archs = getattr(config, "architectures", None) or []
    cls = getattr(transformers, archs[0], None) if archs else None
    cls = cls or transformers.AutoModel
    torch_dtype = DTYPES[dtype] if DTYPES[dtype] is not None else "auto"
    try:
        try:
            model = cls.from_pretrained(model_dir, dtype=torch_dtype, local_files_only=True)
        except TypeError:
            model = cls.from_pretrained(model_dir, torch_dtype=torch_dtype, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot load the model in {model_dir!r} with {cls.__name__}: {exc}") from None
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception:  # no tokenizer files: pre-tokenised calibration data is still usable
        tokenizer = None
    return model, tokenizer


def cli_words(msg: str) -> str:
    """io's messages speak Python (resume=True); the command line says --resume."""
    for a, b in (("resume=True", "--resume"), ("overwrite=True", "--overwrite"), ("out_dir", "output folder"),
                 ("input_dirs[0]", "")):
        msg = msg.replace(a, b)
    return re.sub(r"  +", " ", msg).replace(" ;", ";").replace(" ,", ",")


def _io():
    from .. import io as se_io

    return se_io


def _file_digest(path: Optional[str]) -> Optional[str]:
    if path is None:
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def copy_model_files(model_dir: str, out_dir: str) -> List[str]:
    """Copy config, tokenizer and other small non-weight files (top level and one level down) atomically."""
    se_io = _io()
    copied = []
    for root, dirs, files in os.walk(model_dir):
        rel = os.path.relpath(root, model_dir)
        if rel.count(os.sep) >= 1 or rel.startswith("."):
            dirs[:] = []
            if rel != "." and rel.count(os.sep) >= 1:
                continue
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for fname in files:
            if fname.endswith(_WEIGHT_SUFFIXES) or fname.startswith("."):
                continue
            src = os.path.join(root, fname)
            dst = os.path.normpath(os.path.join(out_dir, rel, fname))
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            with open(src, "rb") as fin, se_io.atomic_write(dst, "wb") as fout:
                shutil.copyfileobj(fin, fout)
            copied.append(os.path.relpath(dst, out_dir))
    return copied


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


def save_model_weights(model: nn.Module, out_dir: str, *, max_shard_bytes: int = 5 * 2**30) -> Any:
    se_io = _io()
    writer = se_io.ShardedSafetensorsWriter(out_dir, max_shard_bytes=max_shard_bytes)
    for name, t in unique_state_dict(model).items():
        writer.add(name, t.detach().to("cpu").contiguous())
    return writer.close()


def block_file(out_dir: str, index: int) -> str:
    return os.path.join(out_dir, BLOCKS_DIR, f"block_{index:05d}.safetensors")


def _save_block(out_dir: str, layout: BlockLayout, index: int, block: nn.Module) -> str:
    se_io = _io()
    prefix = layout.block_name(index)
    tensors = {f"{prefix}.{k}": v.detach().to("cpu").contiguous() for k, v in block.state_dict().items()}
    path = block_file(out_dir, index)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    se_io.save_safetensors_atomic(tensors, path)
    return path


def _load_block(out_dir: str, layout: BlockLayout, index: int, block: nn.Module) -> None:
    from safetensors.torch import load_file

    path = block_file(out_dir, index)
    if not os.path.isfile(path):
        raise InputError(f"resume: block {index} is marked finished but {path} is missing; "
                         "start again with --overwrite")
    prefix = layout.block_name(index) + "."
    tensors = {k[len(prefix):]: v for k, v in load_file(path).items()}
    missing, unexpected = block.load_state_dict(tensors, strict=False)
    if unexpected or [m for m in missing if m in dict(block.named_parameters())]:
        raise InputError(f"resume: {path} does not match block {index} (missing {missing}, extra {unexpected})")


def _resume_start(manifest, nblocks: int) -> int:
    done = set(manifest.done)
    start = 0
    while start < nblocks and start in done:
        start += 1
    return start


def _check_resume_settings(out_dir: str, settings: Dict[str, Any]) -> None:
    path = os.path.join(out_dir, JOB_JSON)
    if not os.path.isfile(path):
        raise InputError(f"--resume: {out_dir!r} holds no {JOB_JSON}; it was not started by 'sparsity-engine "
                         "prune' (drop --resume, or use --overwrite to start again)")
    with open(path) as f:
        previous = json.load(f)
    keys = ("model_dir", "config", "calib", "calib_digest", "nsamples", "seqlen", "seed", "dtype")
    diff = [k for k in keys if previous.get(k) != settings.get(k)]
    if diff:
        raise ConfigError("--resume with different settings than the interrupted job (" +
                          ", ".join(f"{k}: {previous.get(k)!r} -> {settings.get(k)!r}" for k in diff) +
                          "); use the same arguments, or --overwrite to start again")


def plot_errors(records: Sequence[Dict[str, Any]], path: str, title: str) -> Optional[str]:
    """PNG of the relative reconstruction error per layer (log scale), one colour per layer kind."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    se_io = _io()
    kinds: Dict[str, List[Tuple[int, float]]] = {}
    for i, r in enumerate(records):
        kind = r["name"].rsplit(".", 1)[-1]
        kinds.setdefault(kind, []).append((i, max(r["rel_error"], 1e-12)))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for kind, pts in kinds.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3, lw=0.8, label=kind)
    ax.set_yscale("log")
    ax.set_xlabel("layer (in block order)")
    ax.set_ylabel("relative output error  tr(dW H dW^T) / tr(W H W^T)")
    ax.set_title(title)
    if len(kinds) <= 12:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    with se_io.atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return path


def _finished_job(out_dir: str) -> Optional["JobResult"]:
    """The JobResult of a job that already finished in ``out_dir`` (job.json says so and the report exists)."""
    try:
        with open(os.path.join(out_dir, JOB_JSON)) as f:
            finished = json.load(f).get("finished")
        if not finished:
            return None
        with open(os.path.join(out_dir, REPORT_JSON)) as f:
            report = json.load(f)
    except (OSError, ValueError):
        return None
    return JobResult(out_dir, report.get("layers", []), report, report.get("model", {}).get("blocks", 0))


def job_inputs(model: nn.Module, tokenizer, calib: Optional[str], *, nsamples: int, seqlen: int,
               seed: int) -> Tuple[BlockLayout, torch.Tensor]:
    """The model's block layout and the calibration ids [nsamples, seqlen]; InputError naming what is wrong."""
    from .calibration import CalibrationError, calibration_ids

    try:
        layout = find_blocks(model)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    try:
        ids = calibration_ids(calib, tokenizer, nsamples=nsamples, seqlen=seqlen, seed=seed,
                              vocab_size=getattr(model.config, "vocab_size", None))
    except CalibrationError as exc:
        raise InputError(str(exc)) from None
    return layout, ids


@dataclass
class JobResult:
    out_dir: str
    records: List[Dict[str, Any]]
    report: Dict[str, Any]
    resumed_from: int


def run_prune_job(model_dir: str, out_dir: str, config: PruneConfig, *, calib: Optional[str] = None,
                  nsamples: int = 128, seqlen: int = 2048, seed: int = 0, device: Optional[str] = None,
                  dtype: str = "auto", resume: bool = False, overwrite: bool = False,
                  progress: Optional[Progress] = None, max_shard_bytes: int = 5 * 2**30) -> JobResult:
    """Prune the model in ``model_dir`` into ``out_dir`` (never into the input; resumable); see module doc."""
    se_io = _io()
    progress = progress or Progress(False)
    dev = resolve_device(device)
    model_dir, out_dir = os.path.abspath(model_dir), os.path.abspath(out_dir)
    if not os.path.isdir(model_dir):
        raise InputError(f"model folder {model_dir!r} does not exist or is not a folder")
    if calib is not None and not os.path.isfile(calib):
        raise InputError(f"calibration file {calib!r} does not exist or is not a file")
    try:
        se_io.prepare_output_dir(out_dir, input_dirs=[model_dir], resume=resume, overwrite=overwrite)
    except (ValueError, FileExistsError, NotADirectoryError, PermissionError) as exc:
        raise InputError(cli_words(str(exc))) from None
    settings = {"model_dir": model_dir, "config": config.to_dict(), "calib": os.path.abspath(calib) if calib else
                "<bundled corpus>", "calib_digest": _file_digest(calib), "nsamples": nsamples, "seqlen": seqlen,
                "seed": seed, "dtype": dtype, "device": str(dev)}
    manifest = se_io.Manifest(out_dir)
    if resume and manifest.done:
        _check_resume_settings(out_dir, settings)
        finished = _finished_job(out_dir)
        if finished is not None:  # --resume of a job that already ran to the end: nothing left to do
            progress.write(f"{out_dir} already holds the finished job; nothing to resume")
            return finished
    elif not resume or not os.path.isfile(os.path.join(out_dir, JOB_JSON)):
        se_io.write_json_atomic(os.path.join(out_dir, JOB_JSON), {**settings, "finished": False})

    t_start = time.perf_counter()
    model, tokenizer = load_model(model_dir, dtype)
    layout, ids = job_inputs(model, tokenizer, calib, nsamples=nsamples, seqlen=seqlen, seed=seed)
    start = _resume_start(manifest, len(layout)) if resume else 0
    if start:
        progress.write(f"resuming: blocks 0-{start - 1} already pruned, continuing at block {start}")
    block_timings: Dict[int, Dict[str, float]] = {}
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    def done(i, block, recs, timing):
        path = _save_block(out_dir, layout, i, block)
        block_timings[i] = timing
        manifest.mark_done(i, {"file": os.path.relpath(path, out_dir), "timing": timing,
                               "layers": [asdict(r) for r in recs]})
        worst = max((r.rel_error for r in recs), default=0.0)
        progress.write(f"block {i}: {len(recs)} layers pruned in {timing['prune_s']:.2f}s, "
                       f"worst relative error {worst:.3g}")

    prune_model(model, ids, config, device=dev, progress=progress, start_block=start,
                load_block=lambda i, b: _load_block(out_dir, layout, i, b), on_block_done=done)
    t_pruned = time.perf_counter()
    index = save_model_weights(model, out_dir, max_shard_bytes=max_shard_bytes)
    copied = copy_model_files(model_dir, out_dir)
    records = []
    for i in range(len(layout)):
        info = manifest.info(i) or {}
        records.extend(info.get("layers", []))
        block_timings.setdefault(i, info.get("timing", {}))
    report = {
        "settings": settings, "versions": _versions(), "device": device_description(dev),
        "model": {"class": type(model).__name__, "blocks": len(layout), "block_path": layout.prefix},
        "resumed_from_block": start,
        "timings": {"total_s": time.perf_counter() - t_start, "prune_s": t_pruned - t_start,
                    "per_block": {str(k): v for k, v in sorted(block_timings.items())}},
        "peak_gpu_memory_bytes": torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None,
        "summary": _summary(records),
        "layers": records, "files": {"weights": index, "copied": copied},
    }
    se_io.write_json_atomic(os.path.join(out_dir, REPORT_JSON), report)
    plot_errors(records, os.path.join(out_dir, REPORT_PNG), f"{type(model).__name__}: "
                f"{config.default_spec().label()}, {nsamples}x{seqlen} calibration tokens")
    se_io.write_json_atomic(os.path.join(out_dir, JOB_JSON), {**settings, "finished": True})
    shutil.rmtree(os.path.join(out_dir, BLOCKS_DIR), ignore_errors=True)
    return JobResult(out_dir, records, report, start)


def _summary(records: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    if not records:
        return {"layers": 0}
    total = sum(r["shape"][0] * r["shape"][1] for r in records)
    zeros = sum(r["sparsity"] * r["shape"][0] * r["shape"][1] for r in records)
    errs = sorted(r["rel_error"] for r in records)
    return {"layers": len(records), "sparsity": zeros / total, "rel_error_median": errs[len(errs) // 2],
            "rel_error_max": errs[-1]}
