"""Host (Python) time of one merge_task_vectors call, split into its parts, on a GPU.

A tiny bf16 tensor (the GPU work is microseconds) merged 300 times inside ``deferred_device_checks`` (no host
sync per call), then the same with parts stubbed out: the Triton launches (_Plan.launch and the scale kernel),
then everything after dispatch (merge_with_selector). The differences give the cost of the launches, of the
plan (pack, upload, select / seeds) and of the front end (validation + dispatch)."""
import sys
import time

import torch

import sparsity_engine as se
from sparsity_engine._validate import deferred_device_checks
from sparsity_engine.ops.merge import triton as mt

REPS = 300


def per_call_us(fn):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    with deferred_device_checks():
        t0 = time.perf_counter()
        for _ in range(REPS):
            fn()
        dt = time.perf_counter() - t0
    torch.cuda.synchronize()
    return dt / REPS * 1e6


def main():
    base = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
    ts = [(base.float() + 0.01 * torch.randn_like(base, dtype=torch.float32)).bfloat16() for _ in range(3)]
    launch, scale, mws = mt._Plan.launch, mt._Plan.scale_from_parts, mt.merge_with_selector
    for method in [a for a in sys.argv[1:] if not a.startswith("--")] or ("ties", "dare_ties", "della"):
        call = lambda: se.merge_task_vectors(base, ts, [1.0, 0.8, 0.6], method=method, density=0.3)  # noqa: E731
        full = per_call_us(call)
        mt._Plan.launch = lambda self, *a, **k: None
        mt._Plan.scale_from_parts = lambda self, *a, **k: None
        no_launch = per_call_us(call)
        mt.merge_with_selector = lambda base, *a, **k: base
        front = per_call_us(call)
        mt._Plan.launch, mt._Plan.scale_from_parts, mt.merge_with_selector = launch, scale, mws
        print(f"{method:10s}: {full:6.0f} us per call = front end (validation, dispatch) {front:5.0f} + plan "
              f"(pack, upload, select / seeds / della kernel) {no_launch - front:5.0f} + Triton launches "
              f"{full - no_launch:5.0f}", flush=True)




def launch_detail():
    """Microseconds per call of the pieces of one TIES merge's host path (tiny tensor, no sync)."""
    from sparsity_engine._validate import device_flag_check
    from sparsity_engine.ops.masks import cuda as masks_cuda
    base = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
    ts = [(base.float() + 0.01 * torch.randn_like(base, dtype=torch.float32)).bfloat16() for _ in range(3)]
    out = torch.empty_like(base)
    plan = mt._Plan(base, ts)
    plan.select_bands([(0, 1000)] * 3, selector="cuda")
    f32, i32 = plan._pack()
    kw = dict(spars=mt.SPARS_BAND, consensus="sum", normalize=True, rescale_norm=None, lambda_=1.0, phase=1)
    plan.launch(out, **kw)
    compiled = mt._merge_kernel.device_caches  # noqa: F841  (the launch above compiled the variant)

    def fresh_plan():
        p = mt._Plan(base, ts)
        p.set(weights=[1.0, 0.8, 0.6])
        return p

    def packed():
        p = fresh_plan()
        p._pack()

    def selected():
        p = fresh_plan()
        p.select_bands([(0, 1000)] * 3, selector="cuda")

    pieces = {
        "plan object + set": fresh_plan,
        "plan + pack (pinned upload)": packed,
        "plan + select_bands (pack + select_edges)": selected,
        "merge kernel launch (plan.launch)": lambda: plan.launch(out, **kw),
        "flag check (deferred)": lambda: device_flag_check(plan.flag(), lambda: None),
        "torch.empty_like": lambda: torch.empty_like(base),
        "pin_memory + to(non_blocking)": lambda: torch.tensor(list(range(30)), dtype=torch.int32).pin_memory().to(
            "cuda", non_blocking=True),
        "current stream query": lambda: torch.cuda.current_stream().cuda_stream,
        "torch.cuda.is_available": torch.cuda.is_available,
    }
    for name, fn in pieces.items():
        print(f"  {name:45s} {per_call_us(fn):7.1f} us", flush=True)
    # the same launch through Triton's compiled-kernel runner (no binder, no cache-key work)
    import triton
    N = 3
    w, dens, ones = f32[:N], f32[N:2 * N], f32[2 * N:]
    K, J, seeds, flag = i32[:2 * N], i32[2 * N:4 * N], i32[4 * N:4 * N + 2], i32[4 * N + 2:]
    args = (*plan.ptrs, plan.base_ptr, out, plan.n, w, ones, dens, seeds, K, J, ones, flag, flag, 1.0)
    kwargs = dict(N=N, HAS_BASE=True, SPARS=mt.SPARS_BAND, LATER_FIRST=False, CONSENSUS=1, NORMALIZE=True, RESCALE=0,
                  APPLY_LAMBDA=False, PHASE=1, TB=mt.TB, SUB=mt.SUB, NP=4, HAS_LO=False, WRITE_BITS=False,
                  num_warps=mt.NUM_WARPS, enable_fp_fusion=False)
    grid = (plan.nblocks,)
    kern = mt._merge_kernel[grid](*args, **kwargs)
    print(f"  {'_merge_kernel[grid](...) (Triton run)':45s} {per_call_us(lambda: mt._merge_kernel[grid](*args, **kwargs)):7.1f} us")
    device = triton.runtime.driver.active.get_current_device()
    binder = mt._merge_kernel.device_caches[device][4]
    bound, _, _ = binder(*args, **kwargs)
    values = list(bound.values())
    runner = kern[(plan.nblocks, 1, 1)]
    print(f"  {'binder alone':45s} {per_call_us(lambda: binder(*args, **kwargs)):7.1f} us")
    print(f"  {'compiled kernel runner (C launcher)':45s} {per_call_us(lambda: runner(*values)):7.1f} us")
    stream = torch.cuda.current_stream().cuda_stream
    print(f"  {'compiled kernel runner, stream given':45s} {per_call_us(lambda: runner(*values, stream=stream)):7.1f} us")


if __name__ == "__main__":
    if "--launch-detail" in sys.argv:
        launch_detail()
    else:
        main()
