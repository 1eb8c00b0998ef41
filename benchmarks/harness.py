"""Benchmark harness shared by every bench_<family>.py.

Ours and the anchor run on the same inputs in the same process; times are medians from
``triton.testing.do_bench`` (CUDA events) on a GPU. On a CPU the harness still runs (perf_counter medians,
marked ``timer='cpu'``) so the scripts can be smoke-tested, but CPU numbers are never reported as results.

Results go to ``benchmarks/results/<name>.json`` (and ``$SE_BENCH_OUT`` when set, e.g. the device's $OUT),
with the device, versions and date, and a table is printed.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def env_info() -> Dict[str, Any]:
    """Device, versions and date, recorded with every result."""
    info: Dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "device": "cpu",
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=torch.cuda.get_device_name(0), sm=f"{p.major}{p.minor}",
                    multiprocessors=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1))
    return info


def bench(fn: Callable[[], Any], *, warmup_ms: float = 25, rep_ms: float = 100, cpu_reps: int = 3) -> float:
    """Median milliseconds of one call of ``fn`` (CUDA events via do_bench on a GPU)."""
    if torch.cuda.is_available():
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    fn()
    times = []
    for _ in range(cpu_reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_memory(fn: Callable[[], Any]) -> Optional[int]:
    """Peak bytes allocated on the GPU during one call of ``fn`` above what was allocated before it."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


class Report:
    """Rows of one benchmark; ``save()`` writes JSON (+ PNG when asked), ``print_table()`` prints them."""

    def __init__(self, name: str, description: str = ""):
        self.name = name
        self.description = description
        self.env = env_info()
        self.rows: List[Dict[str, Any]] = []

    def add(self, **row: Any) -> Dict[str, Any]:
        self.rows.append(row)
        return row

    def table(self, columns: Optional[Sequence[str]] = None) -> str:
        if not self.rows:
            return f"{self.name}: no rows"
        cols = list(columns or self.rows[0].keys())
        cells = [[_fmt(r.get(c)) for c in cols] for r in self.rows]
        widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
        line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
        out = [f"## {self.name} ({self.env['device']}, {self.env['date']})", line(cols),
               "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        out += [line(r) for r in cells]
        return "\n".join(out)

    def print_table(self, columns: Optional[Sequence[str]] = None) -> None:
        print(self.table(columns), flush=True)

    def save(self, plot: Optional[Callable[[Any, List[Dict[str, Any]]], None]] = None) -> List[str]:
        """Write <name>.json (and <name>.png via ``plot(ax, rows)``) to results/ and $SE_BENCH_OUT."""
        payload = {"name": self.name, "description": self.description, "env": self.env, "rows": self.rows}
        paths = []
        # CPU runs are smoke tests: they never overwrite the GPU results kept in results/.
        on_gpu = self.env["device"] != "cpu"
        for folder in filter(None, [RESULTS_DIR if on_gpu else None, os.environ.get("SE_BENCH_OUT")]):
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, f"{self.name}.json")
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(payload, f, indent=1, default=str)
            os.replace(tmp, path)
            paths.append(path)
            if plot is not None:
                paths.append(self._plot(plot, folder))
        return paths

    def _plot(self, plot: Callable, folder: str) -> str:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4.5))
        plot(ax, self.rows)
        ax.set_title(f"{self.name} ({self.env['device']}, {self.env['date'][:10]})")
        fig.tight_layout()
        path = os.path.join(folder, f"{self.name}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 100:
            return f"{v:.0f}"
        if abs(v) >= 1:
            return f"{v:.2f}"
        return f"{v:.3g}"
    return "" if v is None else str(v)
