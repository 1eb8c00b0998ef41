"""What one per-tensor merge call (merge_task_vectors, 3 bf16 models) costs the host: aten ops, allocations,
host waits (reads to the host, blocking host-to-GPU copies), and on a GPU the kernel launches and copies the
CUDA runtime sees, the waits torch's sync debug mode reports, and the wall time per call.

    python scripts/merge_calls.py                      # GPU: 11008x4096, backend auto
    TRITON_INTERPRET=1 python scripts/merge_calls.py --backend triton   # CPU: aten counts of the Triton path

A host wait leaves the GPU idle while Python prepares the next launches; the per-tensor merge rows of
bench_merge.py time calls back to back, so each wait shows up in them.
"""
from __future__ import annotations

import argparse
import collections
import time
import warnings

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import sparsity_engine as se

METHODS = [("TIES", "ties", {}), ("DARE-TIES l1", "dare_ties", {}), ("DARE-TIES no rescale", "dare_ties",
                                                                      {"rescale": False}), ("DELLA", "della", {})]
BACKEND = None
ALLOC = ("empty", "zeros", "full", "ones", "empty_like", "zeros_like", "new_empty", "new_zeros", "empty_strided",
         "scalar_tensor", "lift_fresh")


def _is_wait(func, args, kwargs) -> bool:
    """A read back to the host, or a blocking copy between the host and the GPU (both synchronise the stream)."""
    name = func.overloadpacket.__name__
    if name == "_local_scalar_dense":
        return args[0].device.type == "cuda"
    if name == "_to_copy":
        dst = kwargs.get("device") or args[0].device
        return torch.device(dst).type != args[0].device.type and not kwargs.get("non_blocking", False)
    if name == "copy_":
        dst, src = args[0], args[1]
        blocking = not (args[2] if len(args) > 2 else kwargs.get("non_blocking", False))
        return dst.device.type != src.device.type and blocking
    return False


class Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()
        self.waits = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops[func.overloadpacket.__name__] += 1
        self.waits += _is_wait(func, args, kwargs)
        return func(*args, **kwargs)


def one_call(base, ts, method, extra):
    return se.merge_task_vectors(base, ts, [1.0, 0.8, 0.6], method=method, density=0.3, epsilon=0.1,
                                 backend=BACKEND, **extra)


def cuda_counts(base, ts, method, extra):
    """CUDA runtime / driver calls of one merge (profiler) and the waits the sync debug mode reports."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        one_call(base, ts, method, extra)
    rt = collections.Counter()
    for e in prof.events():
        if e.name in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC",
                      "cudaMemcpyAsync", "cudaMemsetAsync", "cudaStreamSynchronize", "cudaDeviceSynchronize"):
            rt[e.name] += 1
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            one_call(base, ts, method, extra)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    rt["sync debug mode waits"] = sum("synchronizing" in str(w.message) for w in seen)
    return rt


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default=None, help="ROWSxCOLS (default 11008x4096 on a GPU, 64x96 on the CPU)")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--backend", default=None, help="merge backend (default: what 'auto' picks)")
    args = ap.parse_args(argv)
    global BACKEND
    BACKEND = args.backend
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    shape = tuple(int(v) for v in (args.shape or ("11008x4096" if cuda else "64x96")).split("x"))
    torch.manual_seed(0)
    base = torch.randn(shape, device=dev).to(torch.bfloat16)
    ts = [(base.float() + 0.01 * torch.randn(shape, device=dev)).to(torch.bfloat16) for _ in range(3)]
    for label, method, extra in METHODS:
        one_call(base, ts, method, extra)  # compiles, fills the allocator
        with Count() as c:
            one_call(base, ts, method, extra)
        allocs = sum(v for k, v in c.ops.items() if k in ALLOC)
        line = f"{label:22s} aten ops {sum(c.ops.values()):3d}  allocations {allocs:2d}  host waits {c.waits}"
        if cuda:
            rt = cuda_counts(base, ts, method, extra)
            launches = sum(v for k, v in rt.items() if "Launch" in k)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.reps):
                one_call(base, ts, method, extra)
            torch.cuda.synchronize()
            ms = (time.perf_counter() - t0) / args.reps * 1e3
            line += (f"  launches {launches}  memcpy {rt['cudaMemcpyAsync']}  memset {rt['cudaMemsetAsync']}  "
                     f"stream syncs {rt['cudaStreamSynchronize']}  sync-debug waits {rt['sync debug mode waits']}  "
                     f"wall {ms:.3f} ms/call")
        print(line, flush=True)
        print("    " + ", ".join(f"{k} {v}" for k, v in sorted(c.ops.items())), flush=True)


if __name__ == "__main__":
    main()
