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
    for method in sys.argv[1:] or ("ties", "dare_ties", "della"):
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


if __name__ == "__main__":
    main()
