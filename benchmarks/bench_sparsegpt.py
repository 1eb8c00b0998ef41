"""SparseGPT prune: our Triton backend vs the reference backend (the published per-column loop), same run,
same inputs, LLaMA layer shapes, unstructured 50% and 2:4, bf16 weights, Hessian from correlated tokens.

Columns: time of each (ms; the reference is timed once or twice with CUDA events: it takes seconds),
speedup, achieved TFLOP/s against the model count 2 * rows * cols^2, peak extra GPU memory of ours and the
budget (W fp32 + H + its factor + outputs + O(rows x blocksize)), mask agreement, loss ratio (ours / ref).
Then a CUDA-time breakdown of ours (profiler, by kernel kind) on the smallest and largest shape.

    python benchmarks/bench_sparsegpt.py           # GPU
    python benchmarks/bench_sparsegpt.py --quick   # tiny sizes on the CPU (Triton interpreter), smoke test
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import sparsity_engine as se  # noqa: E402
from harness import Report, bench, peak_memory  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192), (28672, 8192)]
QUICK_SHAPES = [(64, 128), (96, 64)]
PATTERNS = {"50%": dict(sparsity=0.5), "2:4": dict(prune_n=2, prune_m=4)}


def make_inputs(rows, cols, device, tokens=2048):
    g = torch.Generator(device=device).manual_seed(rows + 13 * cols)
    mix = torch.eye(cols, device=device) + torch.randn(cols, cols, device=device, generator=g) / math.sqrt(cols)
    X = torch.randn(tokens, cols, device=device, generator=g) @ mix
    X[:, :8] *= 20  # a few heavy channels, as in LLM activations
    X = X.bfloat16().float()
    H = 2 / tokens * (X.T @ X)
    W = (torch.randn(rows, cols, device=device, generator=g) * 0.02).bfloat16()
    return W, H


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_once(fn, reps):
    """Median ms over ``reps`` single calls (for the seconds-long reference loop)."""
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2], out


def breakdown(W, H, kw, label):
    """CUDA time of one call of ours, grouped by kernel kind."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        se.sparsegpt_prune(W, H, backend="triton", **kw)
        sync()
    groups = {}
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if not t:
            continue
        name = ev.key.lower()
        kind = ("obs kernel (Triton)" if "obs_block" in name else
                "matmul (lazy update)" if "gemm" in name or "cutlass" in name or "lazy_update" in name else
                "cholesky/trsm" if any(s in name for s in ("potrf", "trsm", "chol", "syrk", "trsv", "getrf")) else
                "top-k threshold" if any(s in name for s in ("topk", "radix", "sort", "gather")) else "other")
        groups[kind] = groups.get(kind, 0) + t / 1e3
    total = sum(groups.values())
    print(f"breakdown {label}: total CUDA {total:.2f} ms  " +
          ", ".join(f"{k} {v:.2f} ms ({100 * v / total:.0f}%)" for k, v in sorted(groups.items(), key=lambda x: -x[1])))
    top = sorted(((getattr(e, "device_time_total", 0) or 0, e.key, e.count) for e in prof.key_averages()), reverse=True)[:6]
    for t, k, c in top:
        print(f"   {t / 1e3:8.2f} ms  x{c:<5d} {k[:90]}")


def sweep_tiles(shapes):
    """Time ours with other (rows per program, warps) tiles on the smallest and largest shape."""
    from sparsity_engine.ops.obs import triton as obs_triton

    for rows, cols in (shapes[0], shapes[-1]):
        W, H = make_inputs(rows, cols, "cuda")
        for pname, kw in PATTERNS.items():
            line = []
            for tile in [(4, 2), (8, 2), (8, 4), (16, 4), (16, 8)]:
                obs_triton.TILE_OVERRIDE = tile
                try:
                    fn = lambda: se.sparsegpt_prune(W, H, backend="triton", **kw)  # noqa: E731
                    fn()
                    line.append(f"{tile}: {bench(fn, warmup_ms=10, rep_ms=100):.1f} ms")
                except Exception as exc:  # a tile that does not compile is reported, not fatal
                    line.append(f"{tile}: failed ({type(exc).__name__})")
                finally:
                    obs_triton.TILE_OVERRIDE = None
            print(f"tiles {rows}x{cols} {pname} (default {obs_triton._tile(rows)}): " + "; ".join(line), flush=True)
        del W, H
        torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--ref-reps", type=int, default=1)
    ap.add_argument("--sweep", action="store_true", help="also time other (rows per program, warps) tiles")
    ap.add_argument("--shapes", help="comma-separated ROWSxCOLS (default: the LLM shapes above)")
    ap.add_argument("--no-breakdown", action="store_true", help="skip the CUDA-time breakdown (profiler)")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = QUICK_SHAPES if args.quick or device == "cpu" else SHAPES
    if args.shapes and not args.quick:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    from sparsity_engine.ops.obs import triton as obs_triton

    report = Report("sparsegpt", "SparseGPT prune: triton vs reference (published loop); bf16 weights")
    # warm up cuBLAS / cuSOLVER / Triton compilation outside the timings
    W, H = make_inputs(256, 256, device)
    for kw in PATTERNS.values():
        se.sparsegpt_prune(W, H, backend="reference", **kw)
        se.sparsegpt_prune(W, H, backend="triton", **kw)
    for rows, cols in shapes:
        W, H = make_inputs(rows, cols, device)
        for pname, kw in PATTERNS.items():
            ours_fn = lambda: se.sparsegpt_prune(W, H, backend="triton", **kw)  # noqa: E731
            ours = ours_fn()  # compiles the ragged/N:M variants
            t_ours = bench(ours_fn, warmup_ms=10, rep_ms=150)
            t_ref, ref = time_once(lambda: se.sparsegpt_prune(W, H, backend="reference", **kw), args.ref_reps)
            peak = peak_memory(ours_fn)
            budget = (rows * cols * 4 + 2 * cols * cols * 4 + rows * cols * (W.element_size() + 1)
                      + 4 * rows * 128 * 4)
            agree = (ours.mask == ref.mask).float().mean().item()
            loss_ratio = ours.loss.double().sum().item() / ref.loss.double().sum().item()
            # each lazy-update mode forced: true fp32 everywhere, and 3 x TF32 on tensor cores everywhere
            modes = {}
            default = obs_triton.LAZY_UPDATE
            for label, mode in (("fp32", "cublas"), ("x3", "tf32x3")):
                obs_triton.LAZY_UPDATE = mode
                try:
                    res = ours_fn()
                    modes[f"{label}_ms"] = bench(ours_fn, warmup_ms=10, rep_ms=150)
                    modes[f"{label}_agree"] = round((res.mask == ref.mask).float().mean().item(), 5)
                    modes[f"{label}_loss_ratio"] = round(res.loss.double().sum().item()
                                                         / ref.loss.double().sum().item(), 6)
                    del res
                finally:
                    obs_triton.LAZY_UPDATE = default
            report.add(shape=f"{rows}x{cols}", pattern=pname, ours_ms=t_ours, ref_ms=t_ref,
                       speedup=t_ref / t_ours, tflops_2rc2=2 * rows * cols ** 2 / (t_ours * 1e-3) / 1e12,
                       peak_mb=None if peak is None else peak / 2**20, budget_mb=budget / 2**20,
                       mask_agree=round(agree, 5), loss_ratio=round(loss_ratio, 6), **modes)
            print(report.rows[-1], flush=True)
            del ours, ref
        del W, H
        if device == "cuda":
            torch.cuda.empty_cache()
    report.print_table()
    report.save()
    if device == "cuda" and args.sweep:
        sweep_tiles(shapes)
    if device == "cuda" and not args.no_breakdown:
        for (rows, cols) in (shapes[0], shapes[-1]):
            W, H = make_inputs(rows, cols, device)
            for pname, kw in PATTERNS.items():
                breakdown(W, H, kw, f"{rows}x{cols} {pname}")
            default = obs_triton.LAZY_UPDATE
            obs_triton.LAZY_UPDATE = "cublas"
            breakdown(W, H, PATTERNS["50%"], f"{rows}x{cols} 50% true-fp32 lazy update")
            obs_triton.LAZY_UPDATE = default


if __name__ == "__main__":
    main()
