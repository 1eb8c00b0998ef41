"""Per-kernel GPU time of one TIES merge (CUDA select + fused pass), a rescaled DARE-TIES merge, a DELLA merge and the
whole-tensor top-k (torch profiler; bf16, 3 models, 11008x4096 unless --shape). For finding where time goes."""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import sparsity_engine as se


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shape", default="11008x4096")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--fused-ab", action="store_true", help="time the fused merge pass at other tile / warp counts")
    ap.add_argument("--philox-ab", action="store_true",
                    help="time the DARE passes (norms, merge) with and without the in-kernel Philox draw")
    ap.add_argument("--case", help="only call this case --reps times, no profiler (for ncu: -k regex:NAME)")
    args = ap.parse_args()
    shape = tuple(int(v) for v in args.shape.split("x"))
    base = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    ts = [(base.float() + 0.01 * torch.randn(shape, device="cuda")).to(torch.bfloat16) for _ in range(3)]
    x32 = torch.randn(shape, device="cuda")
    cases = {
        "ties": lambda: se.merge_task_vectors(base, ts, [1.0, 0.8, 0.6], method="ties", density=0.3),
        "dare_ties l1": lambda: se.merge_task_vectors(base, ts, [1.0, 0.8, 0.6], method="dare_ties", density=0.3),
        "della": lambda: se.merge_task_vectors(base, ts, [1.0, 0.8, 0.6], method="della", density=0.3, epsilon=0.1),
        "topk_mask bf16": lambda: se.topk_mask(base, 0.3),
        "topk_mask fp32": lambda: se.topk_mask(x32, 0.3),
    }
    if args.fused_ab:
        fused_ab(base, ts)
        return
    if args.philox_ab:
        philox_ab(base, ts)
        return
    if args.case:
        for _ in range(args.reps):
            cases[args.case]()
        torch.cuda.synchronize()
        return
    for name, fn in cases.items():
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.reps):
                fn()
            torch.cuda.synchronize()
        print(f"== {name} ({args.reps} calls)")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=70))


def fused_ab(base, ts):
    import triton.testing
    from sparsity_engine.ops.merge import triton as mt
    k = int(0.3 * base.numel())
    plan = mt._Plan(base, ts)
    plan.select_bands([(0, k)] * len(ts), selector="cuda")
    dare = mt._Plan(base, ts)
    dare.set(dens=[0.3] * len(ts), seeds=[1, 2])
    out = torch.empty_like(base)
    saved = (mt.SUB, mt.NUM_WARPS)
    for sub, warps in ((512, 4), (1024, 4), (1024, 8), (2048, 8), (512, 2)):
        mt.SUB, mt.NUM_WARPS = sub, warps
        ties = triton.testing.do_bench(lambda: plan.launch(out, spars=mt.SPARS_BAND, consensus="sum", normalize=True,
                                                           rescale_norm=None, lambda_=1.0, phase=1))
        dt = triton.testing.do_bench(lambda: dare.launch(out, spars=mt.SPARS_RANDOM, consensus="sum", normalize=False,
                                                         rescale_norm=None, lambda_=1.0, phase=1))
        norms = triton.testing.do_bench(lambda: dare.rescale(mt.SPARS_RANDOM, "l1", [True] * len(ts)))
        print(f"SUB={sub:5d} warps={warps}: ties pass {ties * 1e3:7.1f} us, dare pass {dt * 1e3:7.1f} us, "
              f"dare l1 norms {norms * 1e3:7.1f} us", flush=True)
    mt.SUB, mt.NUM_WARPS = saved


def philox_ab(base, ts):
    """Phase 0 (l1 norms) and phase 1 (merge) of DARE-TIES against the same passes with no draw (keep all)."""
    import triton.testing
    from sparsity_engine.ops.merge import triton as mt
    out = torch.empty_like(base)
    plan = mt._Plan(base, ts)
    plan.set(dens=[0.3] * len(ts), seeds=[1, 2])
    parts = torch.empty((plan.nblocks, 2, 4), dtype=torch.float32, device="cuda")
    for label, spars in (("random", mt.SPARS_RANDOM), ("no draw", mt.SPARS_NONE)):
        p0 = triton.testing.do_bench(lambda: plan.launch(None, spars=spars, consensus=None, normalize=False,
                                                         rescale_norm="l1", lambda_=1.0, phase=0, norms=parts))
        p1 = triton.testing.do_bench(lambda: plan.launch(out, spars=spars, consensus="sum", normalize=False,
                                                         rescale_norm="l1", lambda_=1.0, phase=1))
        print(f"{label:8s}: norms pass {p0 * 1e3:7.1f} us, merge pass {p1 * 1e3:7.1f} us", flush=True)


if __name__ == "__main__":
    main()
