"""The prune job's state on disk: its settings, its folder (io.jobdir), what a resume continues, the report.

Settings that change the pruned weights are recorded before any work and compared on ``resume``: the pruning
configuration (method, target, overrides, skips, SparseGPT's block size and damping), the calibration source
and its draw (file, nsamples, seqlen, seed), the weights' dtype and the shard size, plus the fingerprint of the
model folder and the calibration file. The device, the backend and the batch size change only rounding and
may differ between runs.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

import torch

from .settings import ConfigError, InputError, PruneConfig

JOB_KIND = "prune"
MAX_SEED = 2**63 - 1


def check_run_settings(*, nsamples: int, seqlen: int, seed: int, max_shard_bytes: int) -> None:
    """The job-level numbers, checked before anything is read (ConfigError names the argument)."""
    for name, v, lo, hi in (("nsamples", nsamples, 1, None), ("seqlen", seqlen, 1, None),
                            ("seed", seed, 0, MAX_SEED), ("max_shard_bytes", max_shard_bytes, 1, None)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
            rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
            raise ConfigError(f"{name} must be an integer {rng}, got {v!r}")


def check_file(what: str, path: Optional[str]) -> None:
    if path is not None and not os.path.isfile(path):
        raise InputError(f"{what} {path!r} does not exist or is not a file")


def check_seqlen(folder, seqlen: int, what: str = "seqlen") -> None:
    limit = folder.max_positions()
    if limit is not None and seqlen > limit:
        raise ConfigError(f"{what} {seqlen} is longer than the model's {limit} positions "
                          f"(config.json); use {what} <= {limit}")


def calibration(folder, tokenizer, calib: Optional[str], *, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """The calibration ids [nsamples, seqlen], read and checked before any work (InputError names the file)."""
    from .calibration import CalibrationError, calibration_ids

    check_seqlen(folder, seqlen)
    try:
        return calibration_ids(calib, tokenizer, nsamples=nsamples, seqlen=seqlen, seed=seed,
                               vocab_size=getattr(folder.config, "vocab_size", None))
    except CalibrationError as exc:
        raise InputError(str(exc)) from None


def prune_settings(config: PruneConfig, *, calib: Optional[str], nsamples: int, seqlen: int, seed: int,
                   dtype: torch.dtype, max_shard_bytes: int) -> Dict[str, Any]:
    return {"prune": config.output_settings(), "calib": os.path.abspath(calib) if calib else "<bundled corpus>",
            "nsamples": nsamples, "seqlen": seqlen, "seed": seed, "dtype": str(dtype).replace("torch.", ""),
            "max_shard_bytes": max_shard_bytes}


def open_prune_job(out_dir: str, settings: Dict[str, Any], inputs: Dict[str, str], runtime: Dict[str, Any], *,
                   resume: bool, overwrite: bool):
    from ..io import JobFolderError, open_job

    try:
        return open_job(out_dir, kind=JOB_KIND, settings=settings, inputs=inputs, runtime=runtime,
                        resume=resume, overwrite=overwrite)
    except PermissionError as exc:
        raise JobFolderError(f"cannot write the output folder {out_dir!r}: {exc}") from None


def finished_result(job, report_name: str):
    """The JobResult of the finished job in ``job`` (its report as written)."""
    import json

    from .pipeline import JobResult

    try:
        with open(job.path(report_name), encoding="utf-8") as f:
            report = json.load(f)
    except (OSError, ValueError) as exc:
        raise InputError(f"{job.out_dir} holds a finished job but its report cannot be read ({exc}); "
                         "use --overwrite to run it again") from None
    return JobResult(job.out_dir, report.get("layers", []), report, report.get("resumed_from_block", 0))


def finish(job, report: Dict[str, Any], report_name: str, plot_name: str, *, title: str):
    """Write the report and the plot, then mark the job finished (the last write of a job)."""
    from ..io import atomic_write, write_json_atomic
    from .pipeline import JobResult
    from .report import plot_report

    report["out_dir"] = job.out_dir
    write_json_atomic(job.output(report_name), report)
    plot_report(report["layers"], report["timings"]["per_block"], job.output(plot_name), title,
                lambda p: atomic_write(p, "wb"))
    job.finish()
    return JobResult(job.out_dir, report["layers"], report, report.get("resumed_from_block", 0))
