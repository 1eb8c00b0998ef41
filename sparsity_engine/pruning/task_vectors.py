"""Task-vector pruning for merges: SparseGPT on ``delta = W_finetuned - W_base``, block by block.

For a base model and K fine-tuned models of the same architecture, per block and per Linear / Conv1D:

* the Hessian ``H = 2/n X^T X`` comes from each fine-tuned model's own calibration activations
  (``hessian='per-model'``: X propagated through that model's already-pruned blocks) or from the base
  model's activations (``hessian='shared'``: one H per layer for every model);
* the delta is pruned to ``density`` (or N:M) with SparseGPT's error compensation
  (:func:`sparsity_engine.prune_task_vector`), the fine-tuned layer becomes ``base + pruned delta``, and in
  per-model mode the block is re-run so the next block sees the updated inputs.

Output: ``OUT/task_vectors/<k>_<name>.safetensors`` (every tensor's delta: pruned for the block linears,
exact for the rest, in the model's own state-dict names and orientation), a JSON report, and with
``merge`` a merged model folder ``OUT/merged`` (mergekit's generalized task arithmetic through
:func:`sparsity_engine.merge_task_vectors`; the pruned linears are merged at density 1, since they are
already sparse, the other tensors at ``merge_density``).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .._validate import check_fraction, check_int, is_real_number
from .capture import capture_block_inputs, collect_hessians, run_block
from .layer_pruners import output_energy
from .models import DEFAULT_SKIP, find_blocks, find_linears, matches, set_weight_out_in_, weight_out_in
from .progress import Progress
from .settings import ConfigError, InputError, NMPattern, as_pattern, check_blocksize_fits, check_percdamp

HESSIAN_MODES = ("per-model", "shared")
JOB_KIND = "prune-task-vectors"
REPORT_JSON = "task_vector_report.json"


def _checked(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from None


@dataclass
class TaskVectorConfig:
    """Task-vector pruning (and optional merge) settings; every one checked on construction.

    ``pattern`` (N:M, keep N of every M) overrides ``density``; ``weights`` (one finite number per fine-tuned
    model) and ``lambda_`` (finite) are the merge's; their count is checked against the models at job start.
    """

    density: float = 0.1
    pattern: Optional[NMPattern] = None
    rescale: bool = False
    hessian: str = "per-model"
    skip: Tuple[str, ...] = DEFAULT_SKIP
    blocksize: int = 128
    percdamp: float = 0.01
    batch_size: int = 8
    backend: Optional[str] = None
    merge: Optional[str] = None
    weights: Optional[List[float]] = None
    merge_density: float = 1.0
    lambda_: float = 1.0
    extra: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.density = _checked(check_fraction, "density", self.density, low=0.0, low_inclusive=False)
        self.pattern = as_pattern(self.pattern)
        if self.hessian not in HESSIAN_MODES:
            raise ConfigError(f"hessian must be one of {HESSIAN_MODES}, got {self.hessian!r}")
        self.blocksize = _checked(check_int, "blocksize", self.blocksize, minimum=1)
        self.batch_size = _checked(check_int, "batch_size", self.batch_size, minimum=1)
        self.percdamp = check_percdamp(self.percdamp)
        check_blocksize_fits(self.blocksize, self.pattern, "the task vectors")
        self.merge_density = _checked(check_fraction, "merge_density", self.merge_density, low=0.0,
                                      low_inclusive=False)
        if not is_real_number(self.lambda_) or not math.isfinite(float(self.lambda_)):
            raise ConfigError(f"lambda must be a finite number, got {self.lambda_!r}")
        if self.weights is not None:
            self.weights = list(self.weights)
            bad = [w for w in self.weights if not is_real_number(w) or not math.isfinite(float(w))]
            if bad or not self.weights:
                raise ConfigError(f"weights must be finite numbers, one per fine-tuned model, got {self.weights!r}")
        self.skip = tuple(self.skip)
        if self.merge is not None:
            from ..ops.merge import METHODS as MERGE_METHODS

            if self.merge not in MERGE_METHODS:
                raise ConfigError(f"merge must be one of {', '.join(MERGE_METHODS)}, got {self.merge!r}")

    def check_models(self, count: int) -> None:
        """The settings that depend on how many fine-tuned models there are."""
        if self.weights is not None and len(self.weights) != count:
            raise ConfigError(f"weights needs one number per fine-tuned model ({count}), got {len(self.weights)}")

    @property
    def effective_density(self) -> float:
        return self.pattern.density if self.pattern is not None else float(self.density)

    def output_settings(self) -> Dict[str, Any]:
        return {"density": self.effective_density, "pattern": None if self.pattern is None else self.pattern.label(),
                "rescale": self.rescale, "hessian": self.hessian, "skip": list(self.skip),
                "blocksize": self.blocksize, "percdamp": self.percdamp, "merge": self.merge,
                "weights": self.weights, "merge_density": self.merge_density, "lambda": float(self.lambda_)}


def _check_same_architecture(folders) -> None:
    """Every fine-tuned folder holds the base's architecture and tensors, with the same shapes (from the
    safetensors headers: nothing is loaded)."""
    base = folders[0]
    ref = {k: tuple(base.reader.info(k).shape) for k in base.reader.keys()}
    for f in folders[1:]:
        if f.cls is not base.cls:
            raise InputError(f"{f.path} is a {f.cls.__name__}, the base is a {base.cls.__name__}")
        shapes = {k: tuple(f.reader.info(k).shape) for k in f.reader.keys()}
        if shapes != ref:
            diff = sorted(set(shapes.items()) ^ set(ref.items()))[:4]
            raise InputError(f"{f.path} does not have the base model's tensors (first differences: {diff})")


def _check_widths(model, config: TaskVectorConfig) -> None:
    """An N:M pattern's M divides the input width of every pruned layer (on the skeleton, before any work)."""
    if config.pattern is None:
        return
    layout = find_blocks(model)
    for i, block in enumerate(layout.blocks):
        for name, mod in find_linears(block, prefix=layout.block_name(i)).items():
            cols = weight_out_in(mod).shape[1]
            if not matches(name, config.skip) and cols % config.pattern.m:
                raise ConfigError(f"layer {name} has {cols} input columns, not a multiple of M={config.pattern.m} "
                                  f"of the {config.pattern.label()} pattern; skip it (--skip)")


@torch.no_grad()
def prune_task_vectors(base, fts: List[torch.nn.Module], calib_ids: torch.Tensor, config: TaskVectorConfig, *,
                       device=None, progress: Optional[Progress] = None) -> List[Dict[str, Any]]:
    """Prune every fine-tuned model's block-linear deltas in place (each becomes base + pruned delta)."""
    from ..ops.obs import prune_task_vector

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    progress = progress or Progress(False)
    base.eval()
    for m in fts:
        m.eval()
    lb, lfs = find_blocks(base), [find_blocks(m) for m in fts]
    shared = config.hessian == "shared"
    if shared:
        inputs = [capture_block_inputs(base, lb, calib_ids, device=device, batch_size=config.batch_size)]
    else:
        inputs = [capture_block_inputs(m, lf, calib_ids, device=device, batch_size=config.batch_size)
                  for m, lf in zip(fts, lfs)]
    nm_args = config.pattern.sparsegpt_args() if config.pattern is not None else {}
    records: List[Dict[str, Any]] = []
    bar = progress.bar(len(lb), "blocks")
    for i in range(len(lb)):
        bblock = lb.blocks[i].to(device)
        prefix = lb.block_name(i)
        names = [nm for nm in find_linears(bblock, prefix=prefix) if not matches(nm, config.skip)]
        base_layers = find_linears(bblock, prefix=prefix)
        if shared:
            hs = collect_hessians(bblock, {k: base_layers[k] for k in names}, inputs[0], device=device,
                                  backend=config.backend)
        for k, (model, lf) in enumerate(zip(fts, lfs)):
            fblock = lf.blocks[i].to(device)
            ft_layers = find_linears(fblock, prefix=lf.block_name(i))
            if not shared:
                hs = collect_hessians(fblock, {nm: ft_layers[nm] for nm in names}, inputs[k], device=device,
                                      backend=config.backend)
            for nm in names:
                t0 = time.perf_counter()
                wb, wf = weight_out_in(base_layers[nm]).detach(), weight_out_in(ft_layers[nm]).detach()
                delta = wf - wb
                res = prune_task_vector(delta, hs[nm].H, density=config.effective_density, rescale=config.rescale,
                                        **nm_args, blocksize=config.blocksize, percdamp=config.percdamp,
                                        backend=config.backend)
                energy = output_energy(delta, hs[nm].H)
                set_weight_out_in_(ft_layers[nm], wb + res.weight)
                loss = float(res.loss.sum())
                records.append({"model": k, "block": i, "name": nm, "shape": list(delta.shape),
                                "density": float((res.weight != 0).float().mean()), "loss": loss,
                                "rel_error": loss / energy if energy > 0 else 0.0,
                                "seconds": time.perf_counter() - t0})
            if not shared:
                run_block(fblock, inputs[k], replace=True)
            lf.blocks[i].to("cpu")
        if shared:
            run_block(bblock, inputs[0], replace=True)
        lb.blocks[i].to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()
        bar.update(1)
    bar.close()
    return records


def merge_models(base, fts, config: TaskVectorConfig, pruned_names: set, *, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Merged state dict: merge_task_vectors per tensor (density 1 for the already-pruned linears)."""
    from ..ops.merge import merge_task_vectors
    from .model_io import unique_state_dict

    config.check_models(len(fts))
    gen = torch.Generator().manual_seed(seed)
    weights = config.weights or [1.0] * len(fts)
    ft_sds = [m.state_dict() for m in fts]
    merged = {}
    for name, tb in unique_state_dict(base).items():
        if not tb.is_floating_point():
            merged[name] = tb
            continue
        density = 1.0 if name.removesuffix(".weight") in pruned_names else config.merge_density
        merged[name] = merge_task_vectors(tb, [sd[name] for sd in ft_sds], weights, method=config.merge,
                                          density=density, lambda_=config.lambda_, generator=gen,
                                          backend=config.backend)
    return merged


def run_task_vector_job(base_dir: str, ft_dirs: Sequence[str], out_dir: str, config: TaskVectorConfig, *,
                        calib: Optional[str] = None, nsamples: int = 128, seqlen: int = 2048, seed: int = 0,
                        device: Optional[str] = None, dtype: str = "auto", overwrite: bool = False,
                        progress: Optional[Progress] = None) -> str:
    """Prune the task vectors of ``ft_dirs`` against ``base_dir`` into the job folder ``out_dir``.

    Every setting, model folder and the calibration data are checked before the folder is touched; the folder
    follows io.jobdir (``overwrite`` removes only what an earlier run of this job wrote, e.g. a stale merged/).
    """
    from ..io import open_job, save_safetensors_atomic, write_json_atomic
    from . import jobstate
    from .model_io import (ModelFolder, copy_model_files, device_description, load_model, resolve_device,
                           unique_state_dict, write_weights)
    from .report import versions

    t0 = time.perf_counter()
    config.check_models(len(ft_dirs))
    jobstate.check_run_settings(nsamples=nsamples, seqlen=seqlen, seed=seed, max_shard_bytes=1)
    jobstate.check_file("calibration file", calib)
    dev = resolve_device(device)
    folders = [ModelFolder(d, dtype) for d in [base_dir, *ft_dirs]]
    _check_same_architecture(folders)
    _check_widths(folders[0].skeleton(), config)
    ids = jobstate.calibration(folders[0], folders[0].tokenizer(), calib, nsamples=nsamples, seqlen=seqlen,
                               seed=seed)
    settings = {"task_vectors": config.output_settings(), "calib": os.path.abspath(calib) if calib else
                "<bundled corpus>", "nsamples": nsamples, "seqlen": seqlen, "seed": seed,
                "dtype": str(folders[0].dtype).replace("torch.", "")}
    inputs = {"base model": folders[0].path, **{f"fine-tuned model {k + 1}": f.path for k, f in enumerate(folders[1:])},
              **({"calibration file": calib} if calib else {})}
    runtime = {"device": str(dev), "backend": config.backend, "batch_size": config.batch_size}
    with open_job(out_dir, kind=JOB_KIND, settings=settings, inputs=inputs, runtime=runtime,
                  overwrite=overwrite) as job:
        base, _ = load_model(folders[0].path, dtype)
        fts = [load_model(f.path, dtype)[0] for f in folders[1:]]
        records = prune_task_vectors(base, fts, ids, config, device=dev, progress=progress)
        pruned = {r["name"] for r in records}
        base_sd = unique_state_dict(base)
        files = []
        for k, (model, f) in enumerate(zip(fts, folders[1:])):
            sd = model.state_dict()
            deltas = {name: (sd[name] - tb).contiguous() for name, tb in base_sd.items() if tb.is_floating_point()}
            rel = os.path.join("task_vectors", f"{k}_{os.path.basename(f.path.rstrip(os.sep))}.safetensors")
            save_safetensors_atomic(deltas, job.output(rel), metadata={"base": folders[0].path, "finetuned": f.path})
            files.append(rel)
        if config.merge:
            merged = merge_models(base, fts, config, pruned, seed=seed)
            write_weights(merged, lambda rel: job.output(os.path.join("merged", rel)))
            copy_model_files(folders[0].path, lambda rel: job.output(os.path.join("merged", rel)),
                             lambda rel: job.output_dir(os.path.join("merged", rel)))
            files.append("merged/")
        report = {"settings": {**settings, **runtime, "base": folders[0].path,
                               "finetuned": [f.path for f in folders[1:]]},
                  "versions": versions(), "device": device_description(dev),
                  "timings": {"total_s": time.perf_counter() - t0}, "layers": records, "files": files}
        write_json_atomic(job.output(REPORT_JSON), report)
        job.finish()
    return job.out_dir
