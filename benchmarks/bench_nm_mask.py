"""nm_mask (2:4) on LLM weight shapes: our CUDA and Triton kernels vs the reference (torch stable sort +
scatter, what a plain-torch implementation does), in one run on the same inputs.

The bytes floor is one read of the scores plus one write of the bool mask; the same run measures that
floor directly with ``torch.ne(x, 0, out=mask)`` (exactly those bytes, no selection work), so 'vs floor'
is the kernel time over the time of a pass that moves the same bytes. 'kernel' rows call the backend
directly; the 'op' row is the public ``nm_mask`` (its finite check reads the scores once more).
Every kernel's mask is checked equal to the reference's before timing.

    python benchmarks/bench_nm_mask.py           # GPU: 11008x4096 (45M) and 28672x8192 (235M), fp32 and bf16
    python benchmarks/bench_nm_mask.py --quick   # tiny sizes on the CPU (smoke test; numbers meaningless)
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

if "--quick" in sys.argv or not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported: kernels run interpreted on CPU

import sparsity_engine as se  # noqa: E402
import sparsity_engine.ops.masks  # noqa: E402,F401  (registers the nm_mask backends)
from sparsity_engine._dispatch import backend_reasons, dispatch  # noqa: E402
from harness import Report, bench  # noqa: E402

N, M = 2, 4
GPU_SHAPES = [(11008, 4096), (28672, 8192)]
QUICK_SHAPES = [(64, 256)]


def _extension_build_seconds():
    """Time to load (and, the first time on this machine, build just in time) the CUDA extension."""
    if not torch.cuda.is_available():
        return None, ["no CUDA GPU"]
    from sparsity_engine import _ext

    t0 = time.perf_counter()
    reasons = _ext.extension_reasons()
    return round(time.perf_counter() - t0, 2), reasons or _ext.extension_info()


def run(shapes, dtypes, device):
    report = Report("nm_mask", f"nm_mask {N}:{M}: reference (torch sort) vs triton vs cuda; bytes floor = "
                               "read scores + write bool mask, measured with torch.ne(x, 0, out=mask)")
    report.env["extension_load_s"], report.env["extension"] = _extension_build_seconds()
    backends = [b for b in ("triton", "cuda") if not backend_reasons(b)]
    for rows, cols in shapes:
        for dtype in dtypes:
            x = torch.randn(rows, cols, device=device, dtype=dtype)
            numel = x.numel()
            nbytes = numel * x.element_size() + numel  # read scores + write one byte per element
            ref = dispatch("nm_mask", "reference", x, N, M)
            buf = torch.empty(x.shape, dtype=torch.bool, device=device)
            floor_ms = bench(lambda: torch.ne(x, 0, out=buf))
            ref_ms = bench(lambda: dispatch("nm_mask", "reference", x, N, M))
            common = dict(shape=f"{rows}x{cols}", dtype=str(dtype).replace("torch.", ""), melems=round(numel / 1e6, 3))

            def add(impl, ms):
                report.add(**common, impl=impl, ms=ms, gb_s=nbytes / ms / 1e6, vs_floor=ms / floor_ms,
                           speedup_vs_ref=ref_ms / ms)

            add("floor (torch.ne)", floor_ms)
            add("reference (sort)", ref_ms)
            for backend in backends:
                got = dispatch("nm_mask", backend, x, N, M)
                if not torch.equal(got, ref):
                    raise AssertionError(f"{backend} nm_mask differs from the reference at {rows}x{cols} {dtype}")
                add(f"{backend} kernel", bench(lambda: dispatch("nm_mask", backend, x, N, M)))
            if "cuda" in backends:
                add("cuda op (public)", bench(lambda: se.nm_mask(x, N, M, backend="cuda")))
            del x, ref, buf
            if device == "cuda":
                torch.cuda.empty_cache()
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, CPU smoke test")
    args = parser.parse_args(argv)
    quick = args.quick or not torch.cuda.is_available()
    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    report = run(QUICK_SHAPES if quick else GPU_SHAPES, [torch.float32, torch.bfloat16], device)
    report.print_table(["shape", "dtype", "melems", "impl", "ms", "gb_s", "vs_floor", "speedup_vs_ref"])
    print(f"extension load: {report.env['extension_load_s']} s, {report.env['extension']}")
    if not quick:
        report.save()


if __name__ == "__main__":
    main()
