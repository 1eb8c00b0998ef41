"""Host (Python) time of one merge_task_vectors call, split into its parts, on a GPU.

A tiny bf16 tensor (the GPU work is microseconds) merged 300 times inside ``deferred_device_checks`` (no host
sync per call), then the same with parts stubbed out: the Triton launches (_Plan.launch and the scale kernel),
then everything after dispatch (merge_with_selector). The differences give the cost of the launches, of the
plan (pack, upload, select / seeds) and of the front end (validation + dispatch).

--launch-detail: the pieces of one TIES merge's host path in a tight loop. --whole: the host time of each piece
inside whole-model merges (LLaMA-7B-shaped tensors, the GPU busy), and merge_state_dicts at several depths of
merges in flight. Methods: the other arguments (default ties dare_ties della)."""
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
    prm = plan._pack()
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
    args = (*plan.ptrs, plan.base_ptr, out, plan.n, prm.w, prm.ones, prm.dens, prm.seeds, prm.K, prm.J, prm.ones,
            prm.flag, prm.flag, 1.0)
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
    print(f"  {'FastKernel launch (what _Plan.launch uses)':45s} {per_call_us(lambda: mt._MERGE[grid](*args, **kwargs)):7.1f} us")


def whole_pieces():
    """Host time of the pieces of whole-model merges while the GPU works (LLaMA-7B-shaped, 2 decoder layers +
    embeddings, head, norm, bf16) and on the same names with tiny tensors (the GPU idle): every merge is
    launched first (no flag check waits), timed with accumulating wrappers, then synchronised."""
    import collections
    import sparsity_engine.merge as sm
    import sparsity_engine.ops.merge as om
    from sparsity_engine._ext import load_extension
    from sparsity_engine.ops.masks import cuda as masks_cuda
    sys.path.insert(0, "benchmarks")
    from bench_merge import llama_layer_shapes

    acc = collections.defaultdict(float)

    def wrap(owner, name, label):
        fn = getattr(owner, name)

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                acc[label] += time.perf_counter() - t0
        setattr(owner, name, timed)
        return fn

    ext = load_extension()
    originals = [(owner, name, wrap(owner, name, label)) for owner, name, label in (
        (om, "merge_task_vectors", "merge_task_vectors (all)"), (mt, "merge_with_selector", "backend (all)"),
        (mt._Plan, "_pack", "pack + upload"), (masks_cuda, "select_edges", "select wrapper"),
        (ext, "select_edges", "select C++ call"), (mt._Plan, "launch", "Triton merge launches"),
        (mt._Plan, "scale_from_parts", "scale kernel launch"), (mt, "device_flag_check", "flag check (queue)"),
        (masks_cuda, "della_deltas", "della kernel call"), (torch, "zeros", "torch.zeros"),
        (torch, "empty_like", "torch.empty_like"))]
    sm.merge_task_vectors = om.merge_task_vectors
    for scale in (1, 64):
        shapes = {"model.embed_tokens.weight": (32000 // scale, 4096 // scale), "model.norm.weight": (4096 // scale,),
                  "lm_head.weight": (32000 // scale, 4096 // scale)}
        for i in range(2):
            shapes.update(llama_layer_shapes(4096 // scale, 11008 // scale, i))
        base = {k: torch.randn(s, device="cuda", dtype=torch.bfloat16) for k, s in shapes.items()}
        fts = [{k: (v.float() + 0.01 * torch.randn_like(v, dtype=torch.float32)).bfloat16() for k, v in base.items()}
               for _ in range(3)]
        per = {k: [v] * 3 for k, v in dict(weights=1.0, density=0.3, epsilon=0.1, gamma=0.01).items()}
        for method in [a for a in sys.argv[1:] if not a.startswith("--")] or ("ties", "dare_ties", "della"):
            opts = dict(method=method, lambda_=1.0, normalize=None, rescale=None, consensus=None, generator=None,
                        backend=None)
            for rep in range(3):
                acc.clear()
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                items = [sm._launch_one(k, base, fts, per, None, opts) for k in shapes]
                t_launch = time.perf_counter() - t0
                for _, _, checks in items:
                    for c in checks:
                        c()
                torch.cuda.synchronize()
                t_all = time.perf_counter() - t0
            m = len(shapes)
            print(f"{method:10s} tensors/{scale}: {m} merges, host launch {t_launch / m * 1e6:6.0f} us/merge, "
                  f"wall {t_all * 1e3:6.2f} ms", flush=True)
            pieces = dict(acc)
            if scale == 1:  # merge_state_dicts as the bench calls it, at several depths of merges in flight
                depth = sm.IN_FLIGHT
                for sm.IN_FLIGHT in (1, 3, 8, 64):
                    best = 1e9
                    for _ in range(3):
                        torch.cuda.synchronize()
                        t0 = time.perf_counter()
                        sm.merge_state_dicts(base, fts, [1.0] * 3, method=method, density=0.3, epsilon=0.1,
                                             out_device=None)
                        torch.cuda.synchronize()
                        best = min(best, time.perf_counter() - t0)
                    print(f"    merge_state_dicts, IN_FLIGHT={sm.IN_FLIGHT:2d}: {best * 1e3:6.2f} ms", flush=True)
                sm.IN_FLIGHT = depth
            for label, v in sorted(pieces.items(), key=lambda kv: -kv[1]):
                print(f"    {label:28s} {v / m * 1e6:7.1f} us/merge", flush=True)
    for owner, name, fn in originals:
        setattr(owner, name, fn)


if __name__ == "__main__":
    if "--whole" in sys.argv:
        whole_pieces()
    elif "--launch-detail" in sys.argv:
        launch_detail()
    else:
        main()
