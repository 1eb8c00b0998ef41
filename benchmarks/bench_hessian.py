"""Hessian accumulation (SparseGPT add_batch) of 32 x 2048 bf16 tokens at 4096 and 11008 columns, one run.

Rows per size, all on the same inputs, each updating a Hessian that already holds 32 batch rows (so H is
read, rescaled and written, as in every add_batch after the first):

* ``reference (fp32 add_batch)``: the anchor, our reference backend: upcast X to fp32, one cuBLAS fp32 GEMM
  (TF32 off) into H with addmm.
* ``sparsegpt sequence``: SparseGPT's add_batch written out (H *= n/(n+b); X = sqrt(2/n) X.float();
  H += X^T X), for comparison with the published code path.
* ``ours (op)``: ``accumulate_hessian_`` (auto -> Triton), argument checks included (one read of X for
  NaN/Inf); ``ours (kernel)``: the Triton launch alone.
* ``cuBLAS bf16 X^T X (bf16 out)``: context only, a full bf16 GEMM with bf16 output (not a usable Hessian:
  it rounds H to 8 bits); it shows what the tensor cores give on this shape.

ms = median (do_bench); TFLOP/s counts the full product, 2 * T * cols^2, for every row (ours computes only
the upper triangle, about half of that); rel_diff = ||H - H64|| / ||H64|| against a float64 computation of
the same update from a fresh H (nsamples 0); peak_mb = peak extra GPU memory of one call.
``--sweep`` also times each kernel configuration (tiles, stages, CHUNK) and writes hessian_sweep.json.

    python benchmarks/bench_hessian.py            # GPU: 32x2048 tokens, 4096 and 11008 columns
    python benchmarks/bench_hessian.py --sweep    # + per-configuration kernel timings
    python benchmarks/bench_hessian.py --quick    # tiny sizes, CPU smoke test (Triton interpreter)
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback

import torch

if not torch.cuda.is_available():  # the CPU smoke test runs the kernel under Triton's interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import Report, bench, peak_memory  # noqa: E402

import sparsity_engine as se  # noqa: E402
from sparsity_engine.ops.hessian import reference as href  # noqa: E402
from sparsity_engine.ops.hessian import triton as htr  # noqa: E402

NSAMPLES = 32  # batch rows already in H when the timed update runs


def sparsegpt_sequence(H, x, nsamples):
    """SparseGPT's add_batch, literally (fp32 upcast, sqrt(2/n) scaling, matmul, add)."""
    b = x.shape[0]
    H *= nsamples / (nsamples + b)
    n = nsamples + b
    X = (2.0 / n) ** 0.5 * x.reshape(-1, x.shape[-1]).float()
    with href.ieee_fp32_matmul():
        H += X.t().matmul(X)


def float64_update(x):
    """2/b * X^T X in float64 (the update from a fresh H), on x's device."""
    X = x.reshape(-1, x.shape[-1]).double()
    H = X.t() @ X
    H *= 2.0 / x.shape[0]
    return H


def rel_diff(H, H64):
    return float((H.double() - H64).norm() / H64.norm())


def accuracy(fn, x, H64, cols):
    """rel diff of fn(H, x, 0) (a fresh H) against float64."""
    H = torch.zeros(cols, cols, device=x.device)
    fn(H, x, 0)
    return rel_diff(H, H64)


def methods(x, dev):
    use_kernel = dev == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    m = {
        "reference (fp32 add_batch)": lambda H, xx, n: se.accumulate_hessian_(H, xx, n, backend="reference"),
        "sparsegpt sequence": sparsegpt_sequence,
    }
    if use_kernel:
        m["ours (op)"] = lambda H, xx, n: se.accumulate_hessian_(H, xx, n, backend="triton")
        m["ours (kernel)"] = lambda H, xx, n: htr.launch(H, xx, n / (n + xx.shape[0]), 2.0 / (n + xx.shape[0]),
                                                        scale_h=n > 0)
    return m


def run_size(report, batch, tokens, cols, dtype, dev):
    torch.manual_seed(0)
    x = torch.randn(batch, tokens, cols, device=dev).to(dtype)
    T = batch * tokens
    flop = 2.0 * T * cols * cols
    H64 = float64_update(x)
    H = torch.zeros(cols, cols, device=dev)
    anchor_ms = None
    for name, fn in methods(x, dev).items():
        try:
            err = accuracy(fn, x, H64, cols)
            H.copy_(H64.float())
            ms = bench(lambda: fn(H, x, NSAMPLES))
            peak = peak_memory(lambda: fn(H, x, NSAMPLES))
        except Exception:  # one failing row must not hide the others
            traceback.print_exc()
            report.add(cols=cols, tokens=T, dtype=str(dtype)[6:], method=name, ms=None, speedup=None,
                       tflops=None, rel_diff=None, peak_mb=None)
            continue
        if anchor_ms is None:
            anchor_ms = ms
        report.add(cols=cols, tokens=T, dtype=str(dtype)[6:], method=name, ms=ms, speedup=anchor_ms / ms,
                   tflops=flop / ms / 1e9, rel_diff=err, peak_mb=None if peak is None else peak / 2**20)
    if dev == "cuda":
        xt = x.reshape(-1, cols)
        ms = bench(lambda: torch.mm(xt.t(), xt))
        report.add(cols=cols, tokens=T, dtype=str(dtype)[6:], method="cuBLAS bf16 X^T X (bf16 out)", ms=ms,
                   speedup=anchor_ms / ms, tflops=flop / ms / 1e9, rel_diff=rel_diff(torch.mm(xt.t(), xt) * (2.0 / batch), H64),
                   peak_mb=peak_memory(lambda: torch.mm(xt.t(), xt)) / 2**20)
        for key, cfg in htr.best_configs().items():
            if key and key[0] == cols:
                print(f"autotuned config for cols={cols} key={key}: {cfg}", flush=True)
    del H64
    return x


SWEEP = [  # (BT, BK, CHUNK, warps, stages, group)
    (128, 64, 1024, 8, 4, 8), (128, 64, 1024, 8, 3, 8), (128, 128, 1024, 8, 3, 8), (128, 32, 512, 8, 5, 8),
    (64, 64, 1024, 4, 4, 8), (128, 64, 512, 8, 4, 8), (128, 64, 4096, 8, 4, 8), (128, 64, 1024, 8, 4, 4),
    (128, 64, 1024, 8, 4, 16), (128, 64, 1 << 20, 8, 4, 8),  # the last: no fp32 promotion (accuracy check)
]


def sweep(report, x, dtype):
    cols = x.shape[-1]
    T = x.shape[0] * x.shape[1]
    H64 = float64_update(x)
    H = torch.empty(cols, cols, device=x.device)
    for bt, bk, chunk, warps, stages, group in SWEEP:
        cfg = htr._config(bt, bk, chunk, warps, stages, group=group)
        try:
            H.zero_()  # scale_h=True in both calls: one compilation per configuration
            htr.launch(H, x, 0.0, 2.0 / x.shape[0], scale_h=True, config=cfg)
            err = rel_diff(H, H64)
            ms = bench(lambda: htr.launch(H, x, 0.5, 1.0 / x.shape[0], scale_h=True, config=cfg))
        except Exception as exc:
            print(f"config {cfg} failed: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            continue
        report.add(cols=cols, tokens=T, dtype=str(dtype)[6:], BT=bt, BK=bk, CHUNK=chunk, warps=warps,
                   stages=stages, group=group, ms=ms, tflops_full=2.0 * T * cols * cols / ms / 1e9, rel_diff=err)
    del H64


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke test)")
    parser.add_argument("--sweep", action="store_true", help="also time each kernel configuration")
    parser.add_argument("--cols", type=int, nargs="*", default=None)
    args = parser.parse_args(argv)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if args.quick:
        batch, tokens, cols_list = 2, 48, args.cols or [40, 96]
    else:
        batch, tokens, cols_list = 32, 2048, args.cols or [4096, 11008]
    dtype = torch.bfloat16
    report = Report("hessian", "Hessian accumulation (SparseGPT add_batch), ours vs the fp32 add_batch path")
    sweep_report = Report("hessian_sweep", "Triton Hessian kernel configurations")
    for cols in cols_list:
        x = run_size(report, batch, tokens, cols, dtype, dev)
        report.print_table()
        if args.sweep and dev == "cuda":
            sweep(sweep_report, x, dtype)
            sweep_report.print_table()
        del x
        if dev == "cuda":
            torch.cuda.empty_cache()
    report.save()
    if sweep_report.rows:
        sweep_report.save()


if __name__ == "__main__":
    main()
