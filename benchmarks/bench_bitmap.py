"""Bitmap linear (x @ W^T, W pruned and stored in the bitmap format) against dense cuBLAS and CSR, one run.

Grid: W [N, K] in the LLaMA-7B shapes {4096x4096, 11008x4096, 4096x11008} and 70B shapes {8192x8192,
28672x8192, 8192x28672} x sparsity {50, 70, 90%} (``--rule`` adds 30, 40, 60, 80, 95, 98% at 1, 8 and 16 tokens:
the points the format rule is read from) x tokens {1, 2, 4, 8, 16, 32, 64, 128}, bf16 (``--dtypes`` adds fp16).
Per point, same inputs:

* dense_us  -- F.linear with the masked dense weight (cuBLAS: what a masked-dense model runs);
* ours_us   -- the bitmap CUDA kernel itself (csrc/bitmap.cu), at every token count;
* auto_us   -- ``bitmap_linear`` as shipped (above ops.bitmap.MAX_TOKENS tokens: dense rebuilt + F.linear);
* csr_us    -- ``csr_linear`` with its sparse kernels (dense_fallback=False) at 1, 8 and 16 tokens;
* v0_us .. v4_us -- each kernel variant (ops/bitmap/cuda.py: VARIANT; 3, 4 = CUDA cores, work per nonzero) at 1,
  2, 4, 8, 16 tokens: the default one only, or those SE_BITMAP_VARIANTS names ('0,3', 'all');
* rebuild_us -- the dense fallback (bitmap -> dense kernel, then F.linear) at 16 .. 128 tokens (MAX_TOKENS);
* floor_us  -- bitmap bytes (masks + offsets + values) + activations + output at the copy bandwidth measured in
  this run; eff = floor_us / ours_us; bytes_ratio = bitmap bytes / dense bytes.

Times are medians over CUDA events around single calls with the L2 cache flushed (read) before each call
(bench_csr.timing). Every point's output is compared with F.linear's (rel_err). A host-overhead section times
the Python side of one eager BitmapLinear call (the GPU kept busy, so launches queue) against nn.Linear's
(with the default report name, or ``--host``).

    python benchmarks/bench_bitmap.py                 # GPU, the grid above (~1.5 min on an H100)
    python benchmarks/bench_bitmap.py --rule          # + the sparsities of the format rule
    python benchmarks/bench_bitmap.py --quick         # tiny sizes, CPU smoke test
"""
from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench_csr import copy_bandwidth, timing  # noqa: E402
from harness import Report  # noqa: E402

import sparsity_engine as se  # noqa: E402
from sparsity_engine.ops import bitmap as B  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192), (28672, 8192), (8192, 28672)]
QUICK_SHAPES = [(64, 256), (40, 300)]
SPARSITIES = [0.5, 0.7, 0.9]
RULE_SPARSITIES = [0.3, 0.4, 0.6, 0.8, 0.95, 0.98]
RULE_BATCHES = (1, 8, 16)
BATCHES = [1, 2, 4, 8, 16, 32, 64, 128]
CSR_BATCHES = (1, 8, 16)
VARIANT_BATCHES = (1, 2, 4, 8, 16)
REBUILD_BATCHES = (16, 32, 64, 128)


def pruned_weight(n, k, sparsity, dtype, device, gen):
    """Random weight with a random `sparsity` fraction set to 0 (the mask magnitude pruning gives an i.i.d. one)."""
    w = torch.randn(n, k, device=device, generator=gen).to(dtype)
    keep = torch.rand(n, k, device=device, dtype=torch.float16, generator=gen) >= sparsity
    return w * keep


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def run(quick: bool, shapes=None, batches=None, dtypes=None, sparsities=None, csr: bool = True,
        rule_sparsities=(), name: str = "bitmap_linear") -> Report:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = shapes or (QUICK_SHAPES if quick else SHAPES)
    batches = batches or ([1, 8, 16, 64] if quick else BATCHES)
    dtypes = dtypes or [torch.bfloat16]
    sparsities = sorted(set(list(sparsities or SPARSITIES) + list(rule_sparsities)))
    bw = copy_bandwidth(device)
    report = Report(name, "bitmap linear vs dense cuBLAS vs CSR; floor = bitmap bytes at copy bandwidth")
    print(f"copy bandwidth {bw / 1e12:.3f} TB/s on {report.env['device']}", flush=True)
    gen = torch.Generator(device=device).manual_seed(0)
    kernel = _kernel() if device.type == "cuda" else None
    for n, k in shapes:
        for dtype in dtypes:
            dense_cache = {}
            for sp in sparsities:
                w = pruned_weight(n, k, sp, dtype, device, gen)
                t0 = time.perf_counter()
                bm = B.to_bitmap(w)
                convert_s = time.perf_counter() - t0
                c = se.to_csr(w) if csr else None
                measured = 1 - bm.density
                bytes_ratio = bm.nbytes / (n * k * w.element_size())
                # the rule's extra sparsities: only the token counts the rule is read at
                for t in [b for b in batches if sp not in rule_sparsities or b in RULE_BATCHES]:
                    x = torch.randn(t, k, device=device, generator=gen).to(dtype)
                    dense_fn = lambda: F.linear(x, w)  # noqa: E731
                    if t not in dense_cache:
                        dense_cache[t] = timing(dense_fn)
                    dense_us = dense_cache[t]
                    ours_fn = (lambda: kernel(x, bm)) if kernel else (lambda: B.bitmap_linear(x, bm))  # noqa: E731
                    ours_us = timing(ours_fn)
                    rel = _rel(ours_fn(), dense_fn())
                    auto_us = ours_us if t <= B.MAX_TOKENS else timing(lambda: B.bitmap_linear(x, bm))
                    csr_us = None
                    if c is not None and t in CSR_BATCHES:
                        csr_us = timing(lambda: se.csr_linear(x, c, dense_fallback=False))
                    extra = {}
                    if kernel and t in VARIANT_BATCHES:  # each kernel variant asked for, checked, then timed
                        for v in _variants():
                            extra[f"v{v}_err"] = _rel(kernel(x, bm, v), dense_fn())
                            extra[f"v{v}_us"] = timing(lambda v=v: kernel(x, bm, v))
                            extra[f"v{v}_vs_dense"] = dense_us / extra[f"v{v}_us"]
                    if kernel and t in REBUILD_BATCHES:  # the dense fallback: rebuild the weight, then F.linear
                        extra["rebuild_us"] = timing(lambda: F.linear(x, B.densify(bm)))
                    el = x.element_size()
                    floor_us = (bm.nbytes + t * k * el + t * n * el) / bw * 1e6
                    row = report.add(
                        shape=f"{n}x{k}", dtype=str(dtype).replace("torch.", ""), sparsity=round(measured, 3),
                        batch=t, dense_us=dense_us, ours_us=ours_us, auto_us=auto_us, csr_us=csr_us,
                        floor_us=floor_us, vs_dense=dense_us / ours_us, auto_vs_dense=dense_us / auto_us,
                        csr_vs_dense=None if csr_us is None else dense_us / csr_us, eff=floor_us / ours_us,
                        bytes_ratio=bytes_ratio, convert_s=convert_s, rel_err=rel, **extra)
                    print(" ".join(f"{key}={_short(v)}" for key, v in row.items()), flush=True)
                del w, bm, c
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        report.save()  # partial results survive a time limit
    return report


def _kernel():
    from sparsity_engine.ops.bitmap import cuda as bcuda

    def call(x, bm, variant=None):
        return bcuda.linear(x, bm.masks, bm.offsets, bm.values, None, bm.shape[0], bm.shape[1], bm.max_group,
                            variant=variant)
    return call


def _variants():
    """The default variant, or those SE_BITMAP_VARIANTS names (ops/bitmap/cuda.py: requested_variants)."""
    from sparsity_engine.ops.bitmap import cuda as bcuda
    return bcuda.requested_variants()


def host_overhead(reps: int = 400) -> dict:
    """Host microseconds per eager call (GPU kept busy by a sleep kernel, so the calls only queue launches)."""
    if not torch.cuda.is_available():
        return {}
    from torch import nn

    from sparsity_engine.nn import BitmapLinear

    lin = nn.Linear(1024, 1024, bias=False).to("cuda", torch.bfloat16)
    with torch.no_grad():
        lin.weight[torch.rand_like(lin.weight, dtype=torch.float32) < 0.5] = 0
    layer = BitmapLinear.from_linear(lin)
    x = torch.randn(1, 1024, device="cuda").to(torch.bfloat16)
    x3 = x.view(1, 1, 1024)
    bm = layer.bitmap
    calls = {
        "bitmap_layer_eager": lambda: layer(x),
        "bitmap_layer_eager_3d": lambda: layer(x3),
        "bitmap_op_dispatcher": lambda: torch.ops.sparsity_engine.bitmap_linear(
            x, bm.masks, bm.offsets, bm.values, None, 1024, 1024, bm.max_group),
        "dense_linear_eager": lambda: lin(x),
        "dense_linear_eager_3d": lambda: lin(x3),
    }
    out = {}
    with torch.no_grad():
        for name, fn in calls.items():
            for _ in range(20):
                fn()
            torch.cuda.synchronize()
            best = None
            for _ in range(3):
                torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU work: the launches below only queue
                t0 = time.perf_counter()
                for _ in range(reps):
                    fn()
                dt = (time.perf_counter() - t0) / reps * 1e6
                torch.cuda.synchronize()
                best = dt if best is None else min(best, dt)
            out[name + "_us"] = best
    # our own overhead: the layer's host time beyond nn.Linear's (issue 20: < 5 us)
    out["layer_minus_linear_us"] = out["bitmap_layer_eager_us"] - out["dense_linear_eager_us"]
    out["layer_minus_linear_3d_us"] = out["bitmap_layer_eager_3d_us"] - out["dense_linear_eager_3d_us"]
    return out


def _short(v):
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def summarize(report: Report) -> None:
    rows = report.rows
    print("\nTargets (issue 20, ratios vs dense cuBLAS, same run):", flush=True)

    def check(label, sel, key, bound):
        picked = [r for r in rows if sel(r) and r.get(key) is not None]
        if not picked:
            return
        worst = min(picked, key=lambda r: r[key])
        ok = sum(r[key] >= bound for r in picked)
        print(f"  {label}: {ok}/{len(picked)} meet >= {bound}; worst {worst[key]:.2f} at {worst['shape']} "
              f"{worst['dtype']} sp={worst['sparsity']} batch={worst['batch']}", flush=True)

    near = lambda r, s: abs(r["sparsity"] - s) < 0.02  # noqa: E731
    for sp, bound in ((0.5, 1.3), (0.7, 1.8), (0.9, 3.0)):
        check(f"batch 1, {int(sp * 100)}%", lambda r, sp=sp: r["batch"] == 1 and near(r, sp), "auto_vs_dense", bound)
    for t in (8, 16):
        check(f"batch {t}, >=50%", lambda r, t=t: r["batch"] == t and r["sparsity"] > 0.48, "auto_vs_dense", 1.0)
        check(f"batch {t}, 70%", lambda r, t=t: r["batch"] == t and near(r, 0.7), "auto_vs_dense", 1.3)
    check("weight bytes at 50% <= 0.6x dense", lambda r: near(r, 0.5) and r["batch"] == 1, "neg_bytes", -0.6)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke test)")
    parser.add_argument("--rule", action="store_true", help="add the sparsities the format rule is read from")
    parser.add_argument("--no-csr", action="store_true", help="skip the CSR comparison")
    parser.add_argument("--shapes", help="comma-separated NxK (default: the grid above)")
    parser.add_argument("--batches", help="comma-separated token counts")
    parser.add_argument("--sparsities", help="comma-separated fractions")
    parser.add_argument("--dtypes", help="comma-separated: bfloat16, float16")
    parser.add_argument("--name", default="bitmap_linear", help="report name (results/<name>.json)")
    parser.add_argument("--host", action="store_true", help="time the host side of eager calls (default name: on)")
    args = parser.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else None
    batches = [int(v) for v in args.batches.split(",")] if args.batches else None
    sparsities = [float(v) for v in args.sparsities.split(",")] if args.sparsities else None
    rule = [sp for sp in RULE_SPARSITIES if sp not in (sparsities or SPARSITIES)] if args.rule else []
    dtypes = [getattr(torch, v) for v in args.dtypes.split(",")] if args.dtypes else None
    report = run(args.quick, shapes, batches, dtypes, sparsities, csr=not args.no_csr, rule_sparsities=rule,
                 name=args.name)
    for r in report.rows:
        r["neg_bytes"] = -r["bytes_ratio"]
    overhead = host_overhead() if args.name == "bitmap_linear" or args.host else {}
    if overhead:
        report.env["host_overhead"] = overhead
        print("host overhead per eager call (us):", {k: round(v, 2) for k, v in overhead.items()}, flush=True)
    summarize(report)
    report.print_table(["shape", "dtype", "sparsity", "batch", "dense_us", "ours_us", "auto_us", "csr_us", "v0_us",
                        "v1_us", "v2_us", "v3_us", "v4_us", "rebuild_us", "floor_us", "vs_dense", "auto_vs_dense", "csr_vs_dense", "eff",
                        "bytes_ratio", "rel_err"])
    print("saved", *report.save(), flush=True)


if __name__ == "__main__":
    main()
