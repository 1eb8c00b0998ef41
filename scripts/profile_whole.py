"""Where a whole-model merge spends host time: cProfile of merge_state_dicts on LLaMA-7B-shaped bf16 tensors
(2 decoder layers + embeddings, head, norm; base + 3 fine-tuned), GPU time from CUDA events, and A/B timings
of the host-side choices (synchronous parameter copies, no deferred flag checks). Methods: the arguments
(default ties dare_ties)."""
import contextlib
import cProfile
import io
import pstats
import sys
import time

import torch

sys.path.insert(0, "benchmarks")
from bench_merge import llama_layer_shapes  # noqa: E402

import sparsity_engine.merge as sm  # noqa: E402
from sparsity_engine import _staging  # noqa: E402
from sparsity_engine.ops.merge import triton as mt  # noqa: E402


def state(layers=2):
    shapes = {"model.embed_tokens.weight": (32000, 4096), "model.norm.weight": (4096,), "lm_head.weight": (32000, 4096)}
    for i in range(layers):
        shapes.update(llama_layer_shapes(4096, 11008, i))
    base = {k: torch.randn(s, device="cuda", dtype=torch.bfloat16) for k, s in shapes.items()}
    fts = [{k: (v.float() + 0.01 * torch.randn_like(v, dtype=torch.float32)).to(torch.bfloat16) for k, v in base.items()}
           for _ in range(3)]
    return base, fts


def timed(fn, reps=3):
    best = 1e9
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def main():
    base, fts = state()
    w = [1.0, 0.8, 0.6]
    for method in sys.argv[1:] or ("ties", "dare_ties"):
        run = lambda: sm.merge_state_dicts(base, fts, w, method=method, density=0.3, out_device=None)  # noqa: E731
        run()
        print(f"== {method}: {len(base)} tensors, new {timed(run):.2f} ms", flush=True)
        orig_up, orig_defer = _staging.upload, sm.deferred_device_checks
        _staging.upload = lambda data, dev: torch.frombuffer(bytearray(data), dtype=torch.int32).to(dev)
        print(f"   sync parameter copies: {timed(run):.2f} ms", flush=True)
        _staging.upload = orig_up

        @contextlib.contextmanager
        def immediate():
            yield []
        sm.deferred_device_checks = immediate
        print(f"   immediate flag checks: {timed(run):.2f} ms", flush=True)
        sm.deferred_device_checks = orig_defer
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            run()
            torch.cuda.synchronize()
        gpu = sum(e.self_device_time_total for e in prof.key_averages()) / 1e3
        print(f"   GPU busy (profiler, kernels + copies): {gpu:.2f} ms", flush=True)
        pr = cProfile.Profile()
        pr.enable()
        run()
        torch.cuda.synchronize()
        pr.disable()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(25)
        print(s.getvalue()[:6000])
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("cumtime").print_stats(30)
        print(s.getvalue()[:6000])


if __name__ == "__main__":
    main()
