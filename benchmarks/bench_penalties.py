"""Sparsity penalties at LLaMA-7B tensor size: fused Triton forward + backward vs autograd through torch ops.

45M elements (11008 x 4096), fp32 and bf16, smooth L0 (Geman-McClure) and smoothed L_p (p = 0.5), with
'sum' reduction (a scalar loss: one read forward; one read + one write backward) and 'none' (elementwise:
read + write forward; two reads + one write backward). Ours and the reference run on the same inputs in
the same process. 'op' rows go through the public function (argument checks and the finite-result check,
one host sync, included for both); 'kernel' rows call the Triton autograd function directly. The bytes
floor is the minimal traffic at the copy bandwidth measured in the same run (a read + write copy).

    python benchmarks/bench_penalties.py           # GPU: 11008 x 4096, fp32 and bf16
    python benchmarks/bench_penalties.py --quick   # tiny sizes, runs on the CPU (Triton interpreter)
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

if not torch.cuda.is_available():  # before any kernel is decorated: the CPU smoke test uses the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import sparsity_engine as se  # noqa: E402
from harness import Report, bench  # noqa: E402
from sparsity_engine.ops.penalties import reference as ref_impl  # noqa: E402
from sparsity_engine.ops.penalties import triton as tri_impl  # noqa: E402

GAMMA, P, EPS = 0.05, 0.5, 1e-8


def copy_bandwidth(x: torch.Tensor) -> float:
    """Bytes per second of a device copy (one read + one write) of x, measured now."""
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    return 2 * x.numel() * x.element_size() / (ms * 1e-3)


def _cases():
    return [
        ("smooth_l0", lambda x, r, b: se.smooth_l0_penalty(x, GAMMA, reduction=r, backend=b),
         lambda x, r: tri_impl.smooth_l0_penalty(x, GAMMA, r), lambda x, r: ref_impl.smooth_l0_penalty(x, GAMMA, r)),
        ("lp(p=0.5)", lambda x, r, b: se.lp_penalty(x, P, eps=EPS, reduction=r, backend=b),
         lambda x, r: tri_impl.lp_penalty(x, P, EPS, r), lambda x, r: ref_impl.lp_penalty(x, P, EPS, r)),
    ]


def _step(fn, x, reduction, grad):
    x.grad = None
    y = fn(x, reduction)
    y.backward(grad if reduction == "none" else None)


def run(report: Report, n: int, dtype: torch.dtype, device: str, bw: float) -> None:
    x = (torch.randn(n, device=device) * 0.1).to(dtype).requires_grad_()
    es = x.element_size()
    for name, op, kernel, reference in _cases():
        for reduction in ("sum", "none"):
            grad = torch.randn(n, device=device).to(dtype) if reduction == "none" else None
            fwd_bytes = n * es * (1 if reduction == "sum" else 2)
            bwd_bytes = n * es * (2 if reduction == "sum" else 3)
            timings = {
                "ours_op": bench(lambda: _step(lambda t, r: op(t, r, "triton"), x, reduction, grad)),
                "ref_op": bench(lambda: _step(lambda t, r: op(t, r, "reference"), x, reduction, grad)),
                "ours_kernel": bench(lambda: _step(kernel, x, reduction, grad)),
                "ref_torch": bench(lambda: _step(reference, x, reduction, grad)),
            }
            with torch.no_grad():
                fwd_ours = bench(lambda: kernel(x, reduction))
                fwd_ref = bench(lambda: reference(x, reduction))
            total = fwd_bytes + bwd_bytes
            floor_ms = total / bw * 1e3
            report.add(op=name, dtype=str(dtype).replace("torch.", ""), reduction=reduction, n=n,
                       ours_op_ms=timings["ours_op"], ref_op_ms=timings["ref_op"],
                       speedup_op=timings["ref_op"] / timings["ours_op"],
                       ours_kernel_ms=timings["ours_kernel"], ref_torch_ms=timings["ref_torch"],
                       speedup_kernel=timings["ref_torch"] / timings["ours_kernel"],
                       fwd_ours_ms=fwd_ours, fwd_ref_ms=fwd_ref, fwd_speedup=fwd_ref / fwd_ours,
                       bytes_fwd_bwd=total, floor_ms=floor_ms,
                       ours_kernel_GBps=total / (timings["ours_kernel"] * 1e-3) / 1e9,
                       kernel_vs_floor=timings["ours_kernel"] / floor_ms)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke test)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    quick = args.quick or device == "cpu"
    if device == "cpu" and not args.quick:
        print("no CUDA GPU: running the --quick sizes under the Triton interpreter (CPU numbers are not results)")
    n = 10_001 if quick else 11008 * 4096
    report = Report("penalties_quick" if quick else "penalties",
                    "smooth L0 / L_p penalties, forward + backward: fused Triton vs autograd through torch ops")
    bw = copy_bandwidth(torch.randn(n, device=device))
    for dtype in (torch.float32, torch.bfloat16):
        run(report, n, dtype, device, bw)
    report.print_table(["op", "dtype", "reduction", "ours_op_ms", "ref_op_ms", "speedup_op", "ours_kernel_ms",
                        "ref_torch_ms", "speedup_kernel", "fwd_speedup", "floor_ms", "ours_kernel_GBps",
                        "kernel_vs_floor"])
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s (fp32 copy of {n} elements)", flush=True)
    report.save()


if __name__ == "__main__":
    main()
