"""Sequential, block-by-block pruning of a Hugging Face model (SparseGPT's recipe, generalised).

1. Capture block 0's inputs on the calibration ids (:mod:`.capture`).
2. For each block, on ``device``:
   a. one forward pass over the calibration inputs with hooks accumulating each Linear / Conv1D's Hessian
      ``H = 2/n X^T X`` (layers fed the same tensor, e.g. q/k/v, share one accumulator);
   b. prune each layer (sparsegpt | wanda | magnitude; unstructured or N:M; per-layer overrides; skips);
   c. run the *pruned* block on the same inputs: its outputs are the next block's inputs.
   Magnitude pruning reads no activations: when no layer needs them, there is no capture and no forward.

:func:`prune_model` does this to a model in memory. :func:`run_prune_job` does it from a model folder on disk
to an output folder on disk, streaming: the model is a skeleton without weights; each block's tensors are
read from the safetensors shards when the block is reached (block i+1 read while block i runs), and each
finished block is written into the output shards at once by a background writer; host memory holds a few
blocks (plus the calibration activations when they do not fit the GPU), whatever the depth of the model.
The job folder follows :mod:`sparsity_engine.io.jobdir` (resume, overwrite, failed starts).
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from .capture import BlockInputs, capture_block_inputs, collect_hessians, move_outside_blocks, run_block
from .layer_pruners import energy, prune_layer
from .models import BlockLayout, find_blocks, find_linears, set_weight_out_in_, weight_out_in
from .progress import Progress
from .model_io import device_description, load_model, resolve_device  # noqa: F401  (the merge job imports them here)
from .report import PhaseTimer
from .settings import ConfigError, InputError, LayerSpec, NMPattern, PruneConfig, parse_target  # noqa: F401

REPORT_JSON = "sparsity_report.json"
REPORT_PNG = "sparsity_report.png"


# --------------------------------------------------------------------------------------------- one block

@dataclass
class LayerRecord:
    """One pruned layer: ``sparsity`` as measured on its weight, ``loss`` = 1/2 tr(dW H dW^T) and
    ``rel_error`` = loss / (1/2 tr(W H W^T)) (None for magnitude layers pruned without calibration)."""

    block: int
    name: str
    method: str
    target: str
    shape: Tuple[int, int]
    sparsity: float
    loss: Optional[float]
    rel_error: Optional[float]


def block_targets(block: nn.Module, prefix: str, config: PruneConfig) -> Dict[str, Tuple[nn.Module, LayerSpec]]:
    """{layer name: (module, its target)} for the layers of ``block`` that are pruned."""
    out = {}
    for name, mod in find_linears(block, prefix=prefix).items():
        spec = config.spec_for(name)
        if spec is not None:
            out[name] = (mod, spec)
    return out


def check_model_fits(model: nn.Module, layout: BlockLayout, config: PruneConfig) -> None:
    """Every N:M target divides its layer's input width (checked on the skeleton, before any work)."""
    for i, block in enumerate(layout.blocks):
        for name, (mod, spec) in block_targets(block, layout.block_name(i), config).items():
            cols = weight_out_in(mod).shape[1]
            if spec.structured and cols % spec.pattern.m:
                raise ConfigError(f"layer {name} has {cols} input columns, not a multiple of M={spec.pattern.m} "
                                  f"of the {spec.pattern.label()} pattern; skip it (--skip) or override it")


@torch.no_grad()
def prune_block(block: nn.Module, index: int, layout: BlockLayout, inputs: Optional[BlockInputs],
                config: PruneConfig, *, device, progress: Optional[Progress] = None,
                timer: Optional[PhaseTimer] = None, lazy: bool = False, measure: bool = False, dist=None):
    """Prune the linears of one block in place (block on ``device``), returning one record each.

    Hessians are accumulated only for layers whose method reads activations (``inputs`` may be None when none
    does), or for every layer with ``measure`` (the loss of magnitude layers is then reported too). Losses and sparsities stay on the device: with ``lazy`` a function is returned that reads them
    (one synchronisation, called once the block's other work is queued), else the records themselves.
    With ``dist`` (several processes, :mod:`.distributed`) the Hessians are summed over the ranks, each rank
    prunes the layers it owns and every pruned layer is then broadcast from its owner.
    """
    targets = block_targets(block, layout.block_name(index), config)
    if not targets:
        return (lambda: []) if lazy else []
    need = {n: mod for n, (mod, spec) in targets.items() if measure or spec.method != "magnitude"}
    hessians = collect_hessians(block, need, inputs, device=device, backend=config.backend) if need else {}
    if dist is not None:
        dist.sum_hessians(hessians)
        owners = dist.owners([(n, tuple(weight_out_in(m).shape), s.method) for n, (m, s) in targets.items()])
    if timer is not None:
        timer.mark("hessian")
    results = {}
    bar = (progress or Progress(False)).bar(len(targets), f"block {index}", leave=False, position=1)
    try:
        for name, (mod, spec) in targets.items():
            if dist is None or owners[name] == dist.rank:
                H = hessians[name].H if name in hessians else None
                results[name] = _prune_one(mod, spec, H, config)
            bar.update(1)
    finally:
        bar.close()
    if dist is not None:
        for name, (mod, spec) in targets.items():
            results[name] = _share_pruned(dist, mod, owners[name], results.get(name), name in hessians)
    del hessians
    pending = [(name, spec, results[name]) for name, (_, spec) in targets.items()]
    if timer is not None:
        timer.mark("prune")
    return (lambda: _records(index, pending)) if lazy else _records(index, pending)


def _prune_one(mod: nn.Module, spec: LayerSpec, H: Optional[torch.Tensor], config: PruneConfig) -> tuple:
    """Prune one layer in place; returns device scalars (finite flag, zeros, loss, energy, shape)."""
    w = weight_out_in(mod).detach()
    res = prune_layer(w, H, spec, blocksize=config.blocksize, percdamp=config.percdamp, backend=config.backend)
    finite = torch.isfinite(res.weight).all()
    if H is not None:
        total, loss = energy(w, H), res.loss.sum()
    else:
        total = loss = None
    set_weight_out_in_(mod, res.weight)
    zeros = (weight_out_in(mod) == 0).sum()
    return finite, zeros, loss, total, tuple(w.shape)


def _share_pruned(dist, mod: nn.Module, owner: int, result: Optional[tuple], measured: bool) -> tuple:
    """The pruned weight of ``mod`` and its numbers (:func:`_prune_one`'s tuple) on every rank, broadcast from the
    rank that pruned it (``result`` is that rank's tuple, None elsewhere)."""
    w = mod.weight.data
    if result is not None:
        finite, zeros, loss, total, _ = result
        nothing = torch.zeros((), dtype=torch.float32, device=w.device)
        numbers = torch.stack([finite.float(), zeros.float()] +
                              ([loss.float(), total.float()] if measured else [nothing, nothing]))
    else:
        numbers = torch.empty(4, dtype=torch.float32, device=w.device)
    dist.broadcast_(w, owner)
    dist.broadcast_(numbers, owner)
    finite, zeros, loss, total = numbers.unbind()
    return finite > 0, zeros, loss if measured else None, total if measured else None, tuple(weight_out_in(mod).shape)


def _records(index: int, pending) -> List[LayerRecord]:
    """Read every layer's scalars with one transfer and check them (NaN/Inf weights stop the job here)."""
    scalars = []
    for _, _, (finite, zeros, loss, total, _) in pending:
        scalars += [finite.float(), zeros.float()] + ([loss.float(), total.float()] if loss is not None else [])
    values = torch.stack(scalars).tolist() if scalars else []
    out, k = [], 0
    for name, spec, (_, _, loss, _, shape) in pending:
        finite, zeros = values[k], values[k + 1]
        k += 2
        loss_v = energy_v = None
        if loss is not None:
            loss_v, energy_v = values[k], values[k + 1]
            k += 2
        if not finite:
            raise FloatingPointError(f"pruning layer {name} produced NaN/Inf weights")
        rel = None if loss_v is None else (loss_v / energy_v if energy_v > 0 else 0.0)
        out.append(LayerRecord(index, name, spec.method, spec.target(), shape, zeros / (shape[0] * shape[1]),
                               loss_v, rel))
    return out


def auto_batch_size(layout: BlockLayout, seqlen: int, nsamples: int, device: torch.device) -> int:
    """Sequences per forward when none is given: 8 on the CPU; on a GPU the largest power of two up to 32 whose
    activations inside a block (~1.5 x seqlen x the sum of the block's linear outputs, per sequence) take at
    most a tenth of the GPU's memory. Larger batches mean fewer, larger kernels; the result changes only
    rounding (the Hessian is an average over the same samples)."""
    if device.type != "cuda":
        return min(8, nsamples)
    outs = sum(weight_out_in(m).shape[0] for m in find_linears(layout.blocks[0]).values())
    elem = next(iter(layout.blocks[0].parameters())).element_size()
    per_sample = 1.5 * seqlen * outs * elem
    budget = torch.cuda.get_device_properties(device).total_memory / 10
    b = 32
    while b > 1 and b * per_sample > budget:
        b //= 2
    return max(1, min(b, nsamples))


def needs_calibration(model: nn.Module, layout: BlockLayout, config: PruneConfig) -> bool:
    return any(config.needs_calibration(list(find_linears(b, prefix=layout.block_name(i))))
               for i, b in enumerate(layout.blocks))


# --------------------------------------------------------------------------------------------- in memory

def prune_model(model: nn.Module, calib_ids: Optional[torch.Tensor], config: PruneConfig, *, device=None,
                progress: Optional[Progress] = None, measure: bool = False,
                on_block_done: Optional[Callable[[int, nn.Module, List[LayerRecord], Dict[str, float]], None]] = None
                ) -> List[LayerRecord]:
    """Prune ``model`` (on the CPU) in place, block by block on ``device``; returns every layer's record.

    ``on_block_done(i, block, records, timing)`` is called after each block (timing: hessian_s, prune_s,
    propagate_s). ``calib_ids`` may be None when every pruned layer uses magnitude and ``measure`` is off
    (``measure``: Hessians for magnitude layers too, so that their reconstruction error is reported).
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    progress = progress or Progress(False)
    layout = find_blocks(model)
    model.eval()
    check_model_fits(model, layout, config)
    calibrate = measure or needs_calibration(model, layout, config)
    if calibrate and calib_ids is None:
        raise ConfigError("calib_ids are needed: a method other than magnitude reads activations")
    batch = config.batch_size or (auto_batch_size(layout, calib_ids.shape[1], calib_ids.shape[0], device)
                                  if calibrate else 1)
    inputs = capture_block_inputs(model, layout, calib_ids, device=device, batch_size=batch) if calibrate else None
    records: List[LayerRecord] = []
    bar = progress.bar(len(layout), "blocks")
    try:
        for i, block in enumerate(layout.blocks):
            block.to(device)
            timer = PhaseTimer(device)
            block_records = prune_block(block, i, layout, inputs, config, device=device, progress=progress,
                                        timer=timer, measure=measure)
            if inputs is not None and i + 1 < len(layout):
                run_block(block, inputs, replace=True)
            timer.mark("propagate")
            block.to("cpu")
            records.extend(block_records)
            if on_block_done is not None:
                on_block_done(i, block, block_records, {f"{k}_s": v for k, v in timer.seconds().items()})
            bar.update(1)
    finally:
        bar.close()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return records


def job_inputs(model: nn.Module, tokenizer, calib: Optional[str], *, nsamples: int, seqlen: int,
               seed: int) -> Tuple[BlockLayout, torch.Tensor]:
    """(block layout, calibration ids [nsamples, seqlen]) for a model held in memory (the merge job's SparseGPT
    sparsification uses it); InputError / ConfigError naming what is wrong."""
    from .calibration import CalibrationError, calibration_ids
    from .model_io import layout_of

    layout = layout_of(model)
    limit = next((v for v in (getattr(model.config, k, None) for k in ("max_position_embeddings", "n_positions"))
                  if isinstance(v, int) and v > 0), None)
    if limit is not None and seqlen > limit:
        raise ConfigError(f"seqlen {seqlen} is longer than the model's {limit} positions (config.json)")
    try:
        ids = calibration_ids(calib, tokenizer, nsamples=nsamples, seqlen=seqlen, seed=seed,
                              vocab_size=getattr(model.config, "vocab_size", None))
    except CalibrationError as exc:
        raise InputError(str(exc)) from None
    return layout, ids


# --------------------------------------------------------------------------------------------- on disk

@dataclass
class JobResult:
    out_dir: str
    records: List[Dict[str, Any]]
    report: Dict[str, Any]
    resumed_from: int


def run_prune_job(model_dir: str, out_dir: str, config: PruneConfig, *, calib: Optional[str] = None,
                  nsamples: int = 128, seqlen: int = 2048, seed: int = 0, device: Optional[str] = None,
                  dtype: str = "auto", resume: bool = False, overwrite: bool = False,
                  progress: Optional[Progress] = None, max_shard_bytes: int = 5 * 2**30,
                  evaluate: bool = False, eval_text: Optional[str] = None, eval_nsamples: Optional[int] = None,
                  eval_seqlen: Optional[int] = None, dist=None) -> JobResult:
    """Prune the model in ``model_dir`` into ``out_dir``, streaming (module docstring); resumable.

    Every setting, the model folder (config, architecture, safetensors headers, tensor shapes, N:M widths,
    positions) and the calibration data are checked before the output folder is touched. ``evaluate`` adds the
    dense and the pruned perplexity (:mod:`.evaluate`) of ``eval_text`` to the report, computed in the same pass.
    ``dist`` (:func:`.distributed.launch`): one of several processes, on ``dist.device``; rank 0 writes and gets
    the report, the other ranks get a JobResult with no records and an empty report.
    """
    from . import jobstate
    from .model_io import ModelFolder, ModelTensors, layout_of, resolve_device

    progress = progress or Progress(False)
    t_start = time.perf_counter()
    jobstate.check_run_settings(nsamples=nsamples, seqlen=seqlen, seed=seed, max_shard_bytes=max_shard_bytes)
    jobstate.check_file("calibration file", calib)
    jobstate.check_file("evaluation text", eval_text if evaluate else None)
    dev = resolve_device(device) if dist is None else dist.device
    folder = ModelFolder(model_dir, dtype)
    skeleton = folder.skeleton()
    layout = layout_of(skeleton)
    tensors = ModelTensors(skeleton, folder.reader, folder.path)
    check_model_fits(skeleton, layout, config)
    calibrate = needs_calibration(skeleton, layout, config)
    tokenizer = folder.tokenizer() if calibrate or evaluate else None
    if calibrate and dist is not None:
        dist.check_calibration(nsamples)
    ids = jobstate.calibration(folder, tokenizer, calib, nsamples=nsamples, seqlen=seqlen, seed=seed) \
        if calibrate else None
    eval_ids = None
    if evaluate:
        from .evaluate import check_causal_lm, eval_windows

        check_causal_lm(skeleton)
        eval_ids = eval_windows(folder, tokenizer, eval_text, seqlen=eval_seqlen, nsamples=eval_nsamples)
    settings = jobstate.prune_settings(config, calib=calib, nsamples=nsamples, seqlen=seqlen, seed=seed,
                                       dtype=folder.dtype, max_shard_bytes=max_shard_bytes)
    inputs = {"model folder": folder.path, **({"calibration file": calib} if calib else {})}
    batch = config.batch_size or auto_batch_size(layout, seqlen, nsamples, dev)
    runtime = {"device": str(dev), "backend": config.backend, "batch_size": batch,
               "processes": 1 if dist is None else dist.world}

    def open_job():
        return jobstate.open_prune_job(out_dir, settings, inputs, runtime, resume=resume, overwrite=overwrite)

    job = open_job() if dist is None else dist.open_job(open_job)
    with job:
        if job.finished:
            progress.write(f"{job.out_dir} already holds this finished job; nothing to do")
            return jobstate.finished_result(job, REPORT_JSON) if dist is None or dist.writes else \
                JobResult(job.out_dir, [], {}, 0)
        run = _StreamingRun(job, folder, skeleton, layout, tensors, config, dev, progress,
                            max_shard_bytes=max_shard_bytes, convert_dtype=dtype != "auto", batch_size=batch,
                            dist=dist)
        if dist is not None:         # each rank runs its own share of the sequences and windows
            ids = None if ids is None else dist.share(ids)
            eval_ids = None if eval_ids is None else dist.share(eval_ids)
        report = run.run(ids, eval_ids)
        if report is None:           # not the rank that writes
            return JobResult(job.out_dir, [], {}, run.start)
        report["settings"] = {**settings, **runtime, "model_dir": folder.path, "calib": calib,
                              "nsamples": nsamples, "seqlen": seqlen, "seed": seed}
        report["timings"]["total_s"] = time.perf_counter() - t_start
        return jobstate.finish(job, report, REPORT_JSON, REPORT_PNG,
                               title=f"{type(skeleton).__name__}: {config.default_spec().label()}"
                               + (f", {nsamples}x{seqlen} calibration tokens" if calibrate else ""))


class _StreamingRun:
    """The streaming engine of :func:`run_prune_job` (one object per run, so the loop reads plainly)."""

    def __init__(self, job, folder, skeleton, layout, tensors, config: PruneConfig, device: torch.device,
                 progress: Progress, *, max_shard_bytes: int, convert_dtype: bool, batch_size: int, dist=None):
        from ..io import PlannedShardWriter, ShardPlan
        from .model_io import OUTSIDE, BlockWriter, WeightLoader

        self.job, self.folder, self.model, self.layout, self.tensors = job, folder, skeleton, layout, tensors
        self.config, self.device, self.progress = config, device, progress
        self.convert_dtype, self.batch_size = convert_dtype, batch_size
        self.dist = dist
        self.writes = dist is None or dist.writes     # several processes: rank 0 alone writes
        self.nblocks = len(layout)
        self.block_names = [tensors.under(layout.block_name(i)) for i in range(self.nblocks)]
        self.outside = tensors.outside(layout)
        self.plan = ShardPlan.make([(n, tensors.dtype_of(n), tensors.shape_of(n)) for n in tensors.names],
                                   max_shard_bytes)
        done = job.done
        self.start = 0
        while self.start < self.nblocks and str(self.start) in done:
            self.start += 1
        self.shards = self.writer = None
        if self.writes:
            self.shards = PlannedShardWriter(job.out_dir, self.plan, path_of=job.output)
            self.shards.written([n for i in range(self.start) for n in self.block_names[i]] +
                                (self.outside if OUTSIDE in done else []))
            self.writer = BlockWriter(self.shards, self._on_written)
        self.loader = WeightLoader(folder.reader, tensors, device)
        self.per_block: Dict[str, Dict[str, float]] = {}
        self._outside_written = False

    # the writer thread calls this once a group is on disk: only then is it done. The tensors outside the
    # blocks are marked done with the first block, so that a job that fails before its first block counts as a
    # failed start (io.jobdir removes it) rather than as progress.
    def _on_written(self, step: str, info: Dict[str, Any], measured: Dict[str, float]) -> None:
        from .model_io import OUTSIDE

        if step == OUTSIDE:
            self._outside_written = True
            return
        for r in info.get("layers", []):
            r["sparsity"] = measured[r["name"] + ".weight"]
        if self._outside_written:
            self.job.mark_done(OUTSIDE)
            self._outside_written = False
        self.job.mark_done(step, info)

    def _own_reader(self):
        """A reader over this job's own shards (finished or partial), for blocks an earlier run pruned."""
        from ..io import SafetensorsReader

        files = []
        for fname, _ in self.plan.shards:
            final = self.job.path(fname)
            files.append(final if os.path.isfile(final) else self.job.path(f".{fname}.partial"))
        return SafetensorsReader(self.job.out_dir, files=files)

    def _load(self, future) -> None:
        self.tensors.set(self.loader.place(future.result()))

    def run(self, ids: Optional[torch.Tensor], eval_ids: Optional[torch.Tensor]) -> Optional[Dict[str, Any]]:
        """Prune (and evaluate) every block not done yet; the report, or None on a rank that does not write."""
        from .model_io import OUTSIDE, move_buffers

        dev = self.device
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        own = self._own_reader() if self.start else None
        outside_host = self.loader.submit(self.outside).result()
        self.tensors.set(self.loader.place(outside_host))
        move_outside_blocks(self.model, self.layout, dev)
        if OUTSIDE not in self.job.done and self.writes:
            self.writer.submit(OUTSIDE, {n: t if t.dtype == self.tensors.dtype_of(n) else
                                         t.to(self.tensors.dtype_of(n)) for n, t in outside_host.items()})
        del outside_host
        # blocks before self.start are only replayed to rebuild the next block's inputs (and the eval's): when
        # every block is already done and there is no eval, nothing needs to run
        first = 0 if eval_ids is not None or self.start < self.nblocks else self.nblocks
        nxt = self._submit_block(first, own) if first < self.nblocks else None
        batch = self.batch_size
        inputs = capture_block_inputs(self.model, self.layout, ids, device=dev, batch_size=batch, move=False) \
            if ids is not None and first < self.nblocks else None
        evals = None
        if eval_ids is not None:
            from .evaluate import PerplexityPair

            evals = PerplexityPair(self.model, self.layout, eval_ids, dev, batch, dist=self.dist)
        self._place_activations(inputs, evals)
        self.tensors.release(self.outside)
        capture_s = time.perf_counter() - t0
        if self.start:
            self.progress.write(f"resuming: blocks 0-{self.start - 1} already pruned, continuing at block "
                                f"{self.start}")
        bar = self.progress.bar(self.nblocks, "blocks", initial=first)
        try:
            for i in range(first, self.nblocks):
                block = self.layout.blocks[i]
                t_read = time.perf_counter()
                dense = None
                if i < self.start and evals is not None:     # the dense eval needs the input's weights
                    dense = self.loader.submit(self.block_names[i])
                self._load(nxt)                              # the future goes: it holds no buffer after this
                nxt = self._submit_block(i + 1, own) if i + 1 < self.nblocks else None
                move_buffers(block, dev)
                read_s = time.perf_counter() - t_read
                timer = PhaseTimer(dev)
                if i < self.start:
                    self._replay_block(block, inputs, evals, dense)
                else:
                    self._prune_block(i, block, inputs, evals, timer, read_s)
                self.tensors.release(self.block_names[i])
                bar.update(1)
            if self.writes:
                self.writer.close()
                index = self.shards.close()
                files, skipped = self._copy_files()
            ev = evals.finish(self.loader, self.tensors, self.outside) if evals is not None else None
        finally:
            bar.close()
            if self.writes:
                with contextlib.suppress(BaseException):   # blocks already on disk get marked done
                    self.writer.close()
            self.loader.close()
            if self.writes:
                self.shards.abort()
        if not self.writes:
            return None
        report = self._report(index, capture_s, ev)
        report["files"].update(copied=files, skipped=skipped)
        return report

    def _copy_files(self):
        from .model_io import copy_model_files

        own = {os.path.basename(p) for p in (REPORT_JSON, REPORT_PNG)} | {"sparsity_job.json"}
        return copy_model_files(self.folder.path, self.job.output, self.job.output_dir, skip_names=sorted(own),
                                config_dtype=self.folder.dtype if self.convert_dtype else None)

    def _submit_block(self, i: int, own):
        if i < self.start:
            return self.loader.submit(self.block_names[i], reader=own, sources={n: n for n in self.block_names[i]})
        return self.loader.submit(self.block_names[i])

    # the share of the GPU's memory that calibration (and eval) activations may take and stay there
    ACTIVATIONS_ON_GPU = 0.25

    def _place_activations(self, inputs: Optional[BlockInputs], evals) -> None:
        """Calibration (and eval) activations stay on the GPU when together they take at most a quarter of its
        memory; otherwise they move to pinned host memory and travel one batch at a time."""
        if self.device.type != "cuda":
            return
        sets = [x for x in [inputs] + (evals.inputs() if evals is not None else []) if x is not None]
        total = sum(x.nbytes for x in sets)
        if total > torch.cuda.get_device_properties(self.device).total_memory * self.ACTIVATIONS_ON_GPU:
            for x in sets:
                x.move_to_host()
            self.progress.write(f"calibration activations ({total / 1e9:.1f} GB) do not fit a quarter of the GPU: "
                                "kept in pinned host memory")

    def _replay_block(self, block, inputs, evals, dense_future) -> None:
        """A block an earlier run pruned: only rebuild the next block's inputs (and the eval activations)."""
        if inputs is not None:
            run_block(block, inputs, replace=True)
        if evals is not None:
            evals.pruned.step(block)
            self.tensors.set(self.loader.place(dense_future.result()))
            evals.dense.step(block)

    def _prune_block(self, i: int, block, inputs, evals, timer: PhaseTimer, read_s: float) -> None:
        if evals is not None:
            evals.dense.step(block)
            timer.mark("eval")
        resolve = prune_block(block, i, self.layout, inputs, self.config, device=self.device,
                              progress=self.progress, timer=timer, lazy=True, dist=self.dist)
        if inputs is not None and i + 1 < self.nblocks:
            run_block(block, inputs, replace=True)
        timer.mark("propagate")
        if evals is not None:
            evals.pruned.step(block)
            timer.mark("eval")
        records = resolve()
        t_write = time.perf_counter()
        timing = {f"{k}_s": v for k, v in timer.seconds().items() if k != "start"}   # the block's one sync
        timing["read_s"] = read_s
        info = {"layers": [asdict(r) for r in records], "timing": timing}
        if self.writes:
            self.writer.submit(str(i), self.tensors.current(self.block_names[i]),
                               measure=[r.name + ".weight" for r in records], info=info)
        timing["write_s"] = time.perf_counter() - t_write
        self.per_block[str(i)] = timing
        worst = max((r.rel_error for r in records if r.rel_error is not None), default=None)
        self.progress.write(f"block {i}: {len(records)} layers pruned" +
                            (f", worst relative error {worst:.3g}" if worst is not None else ""))

    def _report(self, index, capture_s: float, ev) -> Dict[str, Any]:
        from .model_io import device_description
        from .report import device_memory_peak, peak_rss_bytes, summary, versions

        records, per_block = [], {}
        for i in range(self.nblocks):
            info = self.job.done.get(str(i), {})
            records.extend(info.get("layers", []))
            per_block[str(i)] = self.per_block.get(str(i), info.get("timing", {}))
        phases: Dict[str, float] = {"capture_s": capture_s}
        for t in self.per_block.values():
            for k, v in t.items():
                phases[k] = phases.get(k, 0.0) + v
        phases["write_thread_s"] = self.writer.seconds
        report = {
            "versions": versions(), "device": device_description(self.device),
            "model": {"class": type(self.model).__name__, "blocks": self.nblocks, "block_path": self.layout.prefix,
                      "dtype": str(self.folder.dtype).replace("torch.", "")},
            "resumed_from_block": self.start,
            "timings": {"phases": phases, "per_block": per_block},
            "memory": {"peak_rss_bytes": peak_rss_bytes(), "peak_gpu_bytes": device_memory_peak(self.device),
                       "peak_loader_host_bytes": self.loader.peak_live_bytes},
            "io": {"bytes_read": self.folder.reader.bytes_read, "bytes_written": self.shards.bytes_written},
            "summary": summary(records), "layers": records, "files": {"weights": index},
        }
        if ev is not None:
            report["eval"] = ev
        return report
