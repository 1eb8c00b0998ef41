"""Mask ops on LLM-sized tensors: our kernels vs what merge tools use today, in one run on the same inputs.

Rows: topk_mask (ours vs torch.topk + building the mask, vs a full argsort as mergekit's magnitude does),
magnitude_prune (vs the argsort path), dare (vs mergekit's bernoulli: full_like + bernoulli + multiply +
divide), della_magprune (vs two argsorts per row as mergekit, and vs our torch reference), and the memory
floors measured in the same run: one read pass (t.sum()) and one read + one write (a copy).
'op' times go through the public function (argument checks included: they read the tensor once for
NaN/Inf); 'kernel' times call the Triton backend directly.

    python benchmarks/bench_masks.py           # GPU: 11008x4096 and 28672x8192, fp32 and bf16
    python benchmarks/bench_masks.py --quick   # tiny sizes, runs on the CPU in seconds (smoke test)
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from harness import Report, bench  # noqa: E402

DENSITY, EPSILON = 0.5, 0.15


# ------------------------------------------------- the anchors: the torch calls merge tools make today

def topk_then_mask(x, k):
    flat = x.reshape(-1)
    mask = torch.zeros(flat.shape, dtype=torch.bool, device=x.device)
    mask[torch.topk(flat, k, sorted=False).indices] = True
    return mask.view(x.shape)


def argsort_magnitude(x, k):
    """mergekit-style magnitude: full descending argsort of |x|, a 0/1 mask in x's dtype, multiply."""
    mask = torch.zeros_like(x)
    mask.view(-1)[torch.argsort(x.abs().view(-1), descending=True)[:k]] = 1
    return x * mask


def argsort_mask(x, k):
    mask = torch.zeros(x.numel(), dtype=torch.bool, device=x.device)
    mask[torch.argsort(x.reshape(-1), descending=True)[:k]] = True
    return mask.view(x.shape)


def bernoulli_dare(x, density):
    """mergekit-style DARE: a full tensor of p, torch.bernoulli, multiply, divide."""
    mask = torch.bernoulli(torch.full_like(x, density))
    return x * mask / density


def two_argsort_della(x, density, eps):
    """mergekit-style DELLA: ranks from two argsorts per row, min/max normalisation, bernoulli, multiply."""
    ranks = torch.argsort(torch.argsort(x.abs(), dim=1), dim=1).to(x.dtype) + 1
    lo, hi = ranks.min(1, keepdim=True).values, ranks.max(1, keepdim=True).values
    probs = (density - eps) + ((ranks - lo) / (hi - lo)).clamp(0, 1) * 2 * eps
    return x * torch.bernoulli(probs)


# ------------------------------------------------- the run

def run(shapes, dtypes, report):
    import sparsity_engine as se
    import sparsity_engine.ops.masks.triton as mt
    try:
        import sparsity_engine.ops.masks.cuda as mc
    except ImportError:  # no CUDA backend here: its rows report the error
        mc = None

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    for shape in shapes:
        for dtype in dtypes:
            x = torch.randn(shape, device=dev).to(dtype)
            n, es = x.numel(), x.element_size()
            k = int(DENSITY * n)
            tag = dict(shape="x".join(map(str, shape)), dtype=str(dtype).replace("torch.", ""))
            read_ms = bench(lambda: x.sum())
            out = torch.empty_like(x)
            copy_ms = bench(lambda: out.copy_(x))
            report.add(**tag, op="floor", impl="one read (t.sum)", ms=read_ms, GBps=n * es / read_ms / 1e6)
            report.add(**tag, op="floor", impl="read+write (copy)", ms=copy_ms, GBps=2 * n * es / copy_ms / 1e6)

            def row(op, impl, fn, nbytes, anchors=()):
                try:
                    ms = bench(fn)
                except Exception as exc:  # one failing row must not lose the others
                    traceback.print_exc()
                    report.add(**tag, op=op, impl=impl, ms=None, error=repr(exc)[:200])
                    return None
                r = report.add(**tag, op=op, impl=impl, ms=ms, GBps=nbytes / ms / 1e6,
                               x_read_floor=ms / read_ms, x_copy_floor=ms / copy_ms)
                for name, ams in anchors:
                    if ams:
                        r[f"speedup_vs_{name}"] = ams / ms
                return ms

            mask_bytes = n * es + n
            topk = row("topk_mask", "torch.topk + mask", lambda: topk_then_mask(x, k), mask_bytes)
            sort = row("topk_mask", "argsort + mask", lambda: argsort_mask(x, k), mask_bytes)
            anchors = [("topk", topk), ("argsort", sort)]
            row("topk_mask", "ours op", lambda: se.topk_mask(x, DENSITY), mask_bytes, anchors)
            row("topk_mask", "ours kernel", lambda: mt.topk_mask(x, k, None), mask_bytes, anchors)
            row("topk_mask", "ours cuda kernel", lambda: mc.topk_mask(x, k, None), mask_bytes, anchors)
            kr = int(DENSITY * shape[-1])
            rtopk = row("topk_mask_rows", "torch.topk(dim=-1) + mask",
                        lambda: torch.zeros_like(x, dtype=torch.bool).scatter_(
                            -1, torch.topk(x, kr, dim=-1, sorted=False).indices, True), mask_bytes)
            row("topk_mask_rows", "ours kernel", lambda: mt.topk_mask(x, kr, x.dim() - 1), mask_bytes,
                [("topk", rtopk)])

            val_bytes = 2 * n * es
            mag = row("magnitude_prune", "mergekit-style argsort", lambda: argsort_magnitude(x, k), val_bytes)
            row("magnitude_prune", "ours op", lambda: se.magnitude_prune(x, DENSITY), val_bytes,
                [("mergekit", mag)])
            row("magnitude_prune", "ours kernel", lambda: mt.magnitude_prune(x, k, None), val_bytes,
                [("mergekit", mag)])
            row("magnitude_prune", "ours cuda kernel", lambda: mc.magnitude_prune(x, k, None), val_bytes,
                [("mergekit", mag)])

            dare = row("dare", "mergekit-style bernoulli", lambda: bernoulli_dare(x, DENSITY), val_bytes)
            row("dare", "ours op", lambda: se.dare(x, DENSITY), val_bytes, [("mergekit", dare)])
            row("dare", "ours kernel", lambda: mt.dare(x, DENSITY, True, None), val_bytes, [("mergekit", dare)])

            della = row("della", "mergekit-style 2 argsorts", lambda: two_argsort_della(x, DENSITY, EPSILON),
                        val_bytes)
            ref = row("della", "our torch reference", lambda: se.della_magprune(x, DENSITY, EPSILON,
                                                                                backend="reference"), val_bytes)
            row("della", "ours op", lambda: se.della_magprune(x, DENSITY, EPSILON), val_bytes,
                [("mergekit", della), ("reference", ref)])
            row("della", "ours kernel", lambda: mt.della_magprune(x, DENSITY, EPSILON, None, None), val_bytes,
                [("mergekit", della), ("reference", ref)])
            # a task vector as merges see it: t - base in the model's dtype, quantised to the base's ulps, so
            # most rows hold few distinct magnitudes (ties stress the ranking differently from randn)
            base = torch.randn(shape, device=dev).to(dtype)
            tv = (base.float() + 0.01 * torch.randn(shape, device=dev)).to(dtype) - base
            del base
            della_tv = row("della (task vector)", "mergekit-style 2 argsorts",
                           lambda: two_argsort_della(tv, DENSITY, EPSILON), val_bytes)
            row("della (task vector)", "ours op", lambda: se.della_magprune(tv, DENSITY, EPSILON), val_bytes,
                [("mergekit", della_tv)])
            del tv
            report.print_table(["shape", "dtype", "op", "impl", "ms", "GBps", "x_read_floor",
                                "speedup_vs_topk", "speedup_vs_argsort", "speedup_vs_mergekit"])
            report.save()  # after every configuration: a run cut short still leaves its numbers
            del x, out
            if dev == "cuda":
                torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke test)")
    ap.add_argument("--shapes", default="11008x4096,28672x8192", help="comma-separated ROWSxCOLS (GPU run)")
    args = ap.parse_args()
    if args.quick or not torch.cuda.is_available():
        if not torch.cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")
        shapes, dtypes, name = [(8, 64)], [torch.float32], "masks_quick"
    else:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
        dtypes, name = [torch.float32, torch.bfloat16], "masks"
    report = Report(name, "mask ops (topk_mask, magnitude_prune, dare, della_magprune) vs the torch anchors; "
                          f"density={DENSITY}, epsilon={EPSILON}")
    run(shapes, dtypes, report)
    report.print_table(["shape", "dtype", "op", "impl", "ms", "GBps", "x_read_floor", "x_copy_floor",
                        "speedup_vs_topk", "speedup_vs_argsort", "speedup_vs_mergekit", "speedup_vs_reference"])
    print("saved:", report.save())


if __name__ == "__main__":
    main()
