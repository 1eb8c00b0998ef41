"""What a job reports: versions, timings per phase and per block, memory peaks, bytes moved, per-layer results,
a summary, and the PNG plot (per-layer error, per-block time by phase)."""
from __future__ import annotations

import platform
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import torch

PHASES = ("read", "hessian", "prune", "propagate", "eval", "write")


def versions() -> Dict[str, Any]:
    import sparsity_engine

    out = {"python": platform.python_version(), "torch": torch.__version__,
           "sparsity_engine": sparsity_engine.__version__, "cuda_runtime": torch.version.cuda}
    for mod in ("transformers", "triton", "safetensors"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = None
    return out


def peak_rss_bytes() -> Optional[int]:
    """The process's peak resident set size so far (None where the platform does not say)."""
    try:
        import resource
    except ImportError:      # pragma: no cover - Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def human_bytes(n: Optional[float]) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000.0
    return f"{n:.1f} TB"


class PhaseTimer:
    """Times consecutive phases of device work without synchronising in between: CUDA events on a GPU (read
    once, in :meth:`seconds`, after the block's one synchronisation), ``perf_counter`` on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._marks: List[tuple] = []
        self.mark("start")

    def mark(self, name: str) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._marks.append((name, ev))
        else:
            self._marks.append((name, time.perf_counter()))

    def seconds(self) -> Dict[str, float]:
        """{phase: seconds since the previous mark}, summed when a phase name repeats."""
        out: Dict[str, float] = {}
        if self.cuda:
            self._marks[-1][1].synchronize()
        for (_, a), (name, b) in zip(self._marks, self._marks[1:]):
            dt = a.elapsed_time(b) / 1000.0 if self.cuda else b - a
            out[name] = out.get(name, 0.0) + dt
        return out


def summary(records: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Sparsity over all pruned layers (weighted by size, as measured) and the spread of the relative error."""
    if not records:
        return {"layers": 0}
    total = sum(r["shape"][0] * r["shape"][1] for r in records)
    zeros = sum(r["sparsity"] * r["shape"][0] * r["shape"][1] for r in records)
    errs = sorted(r["rel_error"] for r in records if r.get("rel_error") is not None)
    out = {"layers": len(records), "sparsity": zeros / total}
    if errs:
        out.update(rel_error_median=errs[len(errs) // 2], rel_error_max=errs[-1])
    return out


def plot_report(records: Sequence[Dict[str, Any]], per_block: Dict[str, Dict[str, float]], path: str,
                title: str, write) -> Optional[str]:
    """PNG: relative reconstruction error per layer (log scale, one colour per layer kind) and each block's time
    by phase. ``write(path)`` opens the destination (atomically, inside the job folder). None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(9, 8))
    kinds: Dict[str, List[tuple]] = {}
    for i, r in enumerate(records):
        if r.get("rel_error") is not None:
            kinds.setdefault(r["name"].rsplit(".", 1)[-1], []).append((i, max(r["rel_error"], 1e-12)))
    for kind, pts in kinds.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3, lw=0.8, label=kind)
    if kinds:
        ax.set_yscale("log")
        if len(kinds) <= 12:
            ax.legend(fontsize=7, ncol=2)
    else:
        ax.text(0.5, 0.5, "no calibration (magnitude): no reconstruction error", ha="center", transform=ax.transAxes)
    ax.set_xlabel("layer (in block order)")
    ax.set_ylabel("relative output error\ntr(dW H dW^T) / tr(W H W^T)")
    ax.set_title(title)
    blocks = sorted(per_block, key=int)
    bottom = [0.0] * len(blocks)
    for phase in PHASES:
        vals = [per_block[b].get(f"{phase}_s", 0.0) for b in blocks]
        if any(vals):
            bx.bar([int(b) for b in blocks], vals, bottom=bottom, label=phase)
            bottom = [x + v for x, v in zip(bottom, vals)]
    bx.set_xlabel("block")
    bx.set_ylabel("seconds")
    bx.set_title("time per block by phase (device time; read = waiting for the prefetch)")
    if blocks:
        bx.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    with write(path) as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return path


def final_line(report: Dict[str, Any]) -> str:
    """The one line a command prints last."""
    s, t = report["summary"], report["timings"]
    mem = report["memory"]
    parts = [f"pruned {s.get('layers', 0)} layers to {s.get('sparsity', 0):.1%} sparsity (measured)"]
    if "rel_error_median" in s:
        parts.append(f"median relative error {s['rel_error_median']:.3g}")
    ev = report.get("eval")
    if ev:
        parts.append(f"perplexity {ev['dense']['perplexity']:.4g} -> {ev['pruned']['perplexity']:.4g}")
    parts.append(f"{t['total_s']:.1f}s")
    parts.append(f"peak host RSS {human_bytes(mem['peak_rss_bytes'])}")
    if mem.get("peak_gpu_bytes") is not None:
        parts.append(f"peak GPU {human_bytes(mem['peak_gpu_bytes'])}")
    io = report["io"]
    parts.append(f"read {human_bytes(io['bytes_read'])}, wrote {human_bytes(io['bytes_written'])}")
    return "; ".join(parts) + f"; wrote {report['out_dir']}"


def device_memory_peak(device: torch.device) -> Optional[int]:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
