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

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .layer_pruners import output_energy
from .models import DEFAULT_SKIP, find_blocks, find_linears, matches, set_weight_out_in_, weight_out_in
from .pipeline import (cli_words, ConfigError, InputError, Progress, capture_block_inputs, collect_hessians, copy_model_files,
                       job_inputs,
                       device_description, load_model, resolve_device, run_block, unique_state_dict, _io, _versions)

HESSIAN_MODES = ("per-model", "shared")


@dataclass
class TaskVectorConfig:
    density: float = 0.1
    pattern: Optional[Tuple[int, int]] = None
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
        if not 0.0 < float(self.density) <= 1.0:
            raise ConfigError(f"density must be in (0, 1], got {self.density}")
        if self.hessian not in HESSIAN_MODES:
            raise ConfigError(f"hessian must be one of {HESSIAN_MODES}, got {self.hessian!r}")
        if self.pattern is not None and not 0 < self.pattern[0] < self.pattern[1]:
            raise ConfigError(f"pattern N:M needs 0 < N < M, got {self.pattern}")
        if self.merge is not None:
            from ..ops.merge import METHODS as MERGE_METHODS

            if self.merge not in MERGE_METHODS:
                raise ConfigError(f"merge must be one of {', '.join(MERGE_METHODS)}, got {self.merge!r}")

    @property
    def nm(self) -> Tuple[int, int]:
        return self.pattern if self.pattern is not None else (0, 0)

    @property
    def effective_density(self) -> float:
        return self.pattern[0] / self.pattern[1] if self.pattern is not None else float(self.density)


def _check_same_architecture(base, fts, dirs: Sequence[str]) -> None:
    ref = {k: tuple(v.shape) for k, v in base.state_dict().items()}
    for model, d in zip(fts, dirs):
        if type(model) is not type(base):
            raise InputError(f"{d} is a {type(model).__name__}, the base is a {type(base).__name__}")
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        if shapes != ref:
            diff = sorted(set(shapes.items()) ^ set(ref.items()))[:4]
            raise InputError(f"{d} does not have the base model's tensors (first differences: {diff})")


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
    n, m = config.nm
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
                                        prune_n=n, prune_m=m, blocksize=config.blocksize, percdamp=config.percdamp,
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

    gen = torch.Generator().manual_seed(seed)
    weights = config.weights or [1.0] * len(fts)
    if len(weights) != len(fts):
        raise ConfigError(f"--weights needs one number per fine-tuned model ({len(fts)}), got {len(weights)}")
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
    se_io = _io()
    dev = resolve_device(device)
    base_dir, out_dir = os.path.abspath(base_dir), os.path.abspath(out_dir)
    ft_dirs = [os.path.abspath(d) for d in ft_dirs]
    try:
        se_io.prepare_output_dir(out_dir, input_dirs=[base_dir, *ft_dirs], resume=False, overwrite=overwrite)
    except (ValueError, FileExistsError, NotADirectoryError, PermissionError) as exc:
        raise InputError(cli_words(str(exc))) from None
    t0 = time.perf_counter()
    base, tokenizer = load_model(base_dir, dtype)
    fts = [load_model(d, dtype)[0] for d in ft_dirs]
    _check_same_architecture(base, fts, ft_dirs)
    _, ids = job_inputs(base, tokenizer, calib, nsamples=nsamples, seqlen=seqlen, seed=seed)
    records = prune_task_vectors(base, fts, ids, config, device=dev, progress=progress)
    pruned = {r["name"] for r in records}
    base_sd = unique_state_dict(base)
    os.makedirs(os.path.join(out_dir, "task_vectors"), exist_ok=True)
    files = []
    for k, (model, d) in enumerate(zip(fts, ft_dirs)):
        sd = model.state_dict()
        deltas = {name: (sd[name] - tb).contiguous() for name, tb in base_sd.items() if tb.is_floating_point()}
        path = os.path.join(out_dir, "task_vectors", f"{k}_{os.path.basename(d.rstrip(os.sep))}.safetensors")
        se_io.save_safetensors_atomic(deltas, path, metadata={"base": base_dir, "finetuned": d})
        files.append(os.path.relpath(path, out_dir))
    if config.merge:
        merged_dir = os.path.join(out_dir, "merged")
        os.makedirs(merged_dir, exist_ok=True)
        writer = se_io.ShardedSafetensorsWriter(merged_dir)
        for name, t in merge_models(base, fts, config, pruned, seed=seed).items():
            writer.add(name, t.contiguous())
        writer.close()
        copy_model_files(base_dir, merged_dir)
        files.append("merged/")
    report = {"settings": {"base": base_dir, "finetuned": ft_dirs, "config": asdict(config), "calib": calib,
                           "nsamples": nsamples, "seqlen": seqlen, "seed": seed, "dtype": dtype},
              "versions": _versions(), "device": device_description(dev),
              "timings": {"total_s": time.perf_counter() - t0}, "layers": records, "files": files}
    se_io.write_json_atomic(os.path.join(out_dir, "task_vector_report.json"), report)
    return out_dir
