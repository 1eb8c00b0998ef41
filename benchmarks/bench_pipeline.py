"""End-to-end pruning pipeline: a LLaMA-7B-shaped model, SparseGPT 50% and 2:4, ours vs the reference backend.

The model is LlamaForCausalLM built from a LLaMA-7B config (hidden 4096, intermediate 11008, 32 heads,
vocab 32000; random bf16 weights, no download), calibrated on 128 x 2048 random token ids. The whole job
runs through :func:`sparsity_engine.pruning.pipeline.prune_model` (capture block-0 inputs, per block:
Hessians of all 7 linears in one forward, prune, re-run the pruned block), blocks on the GPU one at a time,
the rest of the model on the CPU.

* ours: backend 'auto' (the fastest kernels available), as many blocks as fit in ``--budget-s`` (32 = the
  whole model when they fit);
* reference: the same pipeline with every op forced onto the plain-torch reference backend, on
  ``--ref-blocks`` blocks (the published per-column SparseGPT loop costs seconds per layer; 32 blocks do
  not fit a short GPU lease).

Times per block are measured; whole-model numbers for runs that did not cover 32 blocks are
extrapolated (time to first block + per-block median x 32) and marked ``extrapolated``.
``--quick``: a tiny LLaMA config on the CPU, a smoke test in seconds.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from harness import Report  # noqa: E402


class _Budget(Exception):
    pass


def build_model(layers: int, quick: bool, device: str):
    import transformers

    if quick:
        cfg = transformers.LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=176, num_hidden_layers=layers,
                                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
    else:
        cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                       num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=32,
                                       max_position_embeddings=4096, rms_norm_eps=1e-6)
    dtype = torch.float32 if quick else torch.bfloat16
    torch.manual_seed(0)
    with torch.device(device):     # random init on the GPU is seconds; on the CPU a 7B init takes minutes
        try:
            model = transformers.LlamaForCausalLM._from_config(cfg, dtype=dtype)
        except TypeError:
            model = transformers.LlamaForCausalLM._from_config(cfg, torch_dtype=dtype)
    model.to("cpu").eval()
    if device == "cuda":
        torch.cuda.empty_cache()
    return model


def run(label, model, ids, pattern, backend, budget_s, device):
    from sparsity_engine.pruning.pipeline import PruneConfig, prune_model
    from sparsity_engine.pruning.progress import Progress

    cfg = PruneConfig(method="sparsegpt", sparsity=0.5, pattern=pattern, backend=backend, batch_size=8)
    times, t_start = [], time.perf_counter()
    first = {}

    def done(i, block, recs, timing):
        now = time.perf_counter()
        times.append(sum(v for k, v in timing.items() if k.endswith("_s")))
        first.setdefault("t", now - t_start)
        if now - t_start > budget_s:
            raise _Budget

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    stopped = False
    try:
        prune_model(model, ids, cfg, device=device, progress=Progress(False), on_block_done=done)
    except _Budget:
        stopped = True
    total = time.perf_counter() - t_start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    n_total = model.config.num_hidden_layers
    per_block = statistics.median(times)
    setup = first["t"] - times[0]            # capture of block-0 inputs
    return {"run": label, "pattern": "2:4" if pattern else "50%", "backend": backend or "auto",
            "blocks_done": len(times), "blocks_model": n_total, "s_per_block": per_block,
            "capture_s": setup, "measured_s": total, "peak_gpu_gib": peak, "stopped_by_budget": stopped}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--blocks", type=int, default=32, help="blocks of the model ours prunes (default 32)")
    ap.add_argument("--blocks-24", type=int, default=4, help="blocks for the 2:4 run of ours (default 4)")
    ap.add_argument("--ref-blocks", type=int, default=1, help="blocks for each reference run (default 1)")
    ap.add_argument("--budget-s", type=float, default=150.0, help="stop ours after this many seconds")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    if args.quick:
        args.nsamples, args.seqlen, args.blocks, args.blocks_24, args.ref_blocks = 4, 32, 2, 2, 1
    vocab = 1000 if args.quick else 32000
    ids = torch.randint(0, vocab, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(0))
    report = Report("pipeline_llama7b" + ("_quick" if args.quick else ""),
                    f"LLaMA-7B-shaped model, {args.nsamples}x{args.seqlen} calibration tokens, SparseGPT, "
                    "ours (auto) vs the reference backend; 32-block totals extrapolated where marked")
    # most important first, so a run cut short by the lease still has the 50% comparison
    plan = [("ours", args.blocks, None, None, args.budget_s), ("reference", args.ref_blocks, None, "reference", 1e9),
            ("ours", args.blocks_24, (2, 4), None, args.budget_s),
            ("reference", args.ref_blocks, (2, 4), "reference", 1e9)]
    rows = {}
    for label, blocks, pattern, backend, budget in plan:
        t0 = time.perf_counter()
        model = build_model(blocks, args.quick, device)
        print(f"[{label} {'2:4' if pattern else '50%'}] model with {blocks} blocks built in "
              f"{time.perf_counter() - t0:.1f}s", flush=True)
        try:
            row = run(label, model, ids, pattern, backend, budget, device)
        except Exception as exc:  # one failing run must not lose the others' numbers
            print(f"[{label}] FAILED: {type(exc).__name__}: {exc}", flush=True)
            report.add(run=label, pattern="2:4" if pattern else "50%", error=f"{type(exc).__name__}: {exc}"[:300])
            del model
            continue
        full = 32
        row["total_32_blocks_s"] = row["capture_s"] + row["s_per_block"] * full
        row["total_is"] = "measured" if row["blocks_done"] == full and not args.quick else "extrapolated"
        rows[(label, row["pattern"])] = row
        report.add(**row)
        print(row, flush=True)
        del model
    for pat in ("50%", "2:4"):
        o, r = rows.get(("ours", pat)), rows.get(("reference", pat))
        if o and r:
            report.add(run="speedup", pattern=pat, s_per_block=r["s_per_block"] / o["s_per_block"],
                       total_32_blocks_s=r["total_32_blocks_s"] / o["total_32_blocks_s"])
    report.print_table(["run", "pattern", "backend", "blocks_done", "s_per_block", "capture_s", "measured_s",
                        "total_32_blocks_s", "total_is", "peak_gpu_gib"])
    report.save()


if __name__ == "__main__":
    main()
