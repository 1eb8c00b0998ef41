"""Decode tokens/s and weight memory, batch 1: a LLaMA-7B-shaped model, dense (masked) vs sparse, timed the same way.

The model (sparsity_engine/nn/decode.py) is built on the GPU from a transformers LlamaConfig (hidden 4096,
intermediate 11008, 32 layers, 32 heads, vocabulary 32000) with random bf16 weights, every block linear
magnitude-pruned to each sparsity (50% and 70% by default). The dense model keeps its masked weights
(cuBLAS); the sparse one is a copy converted by ``sparsify_linears_`` (format 'auto': the per-layer rule).
Both decode greedily from a static KV cache, one token per step, one CUDA graph per step replayed (eager
times too); ms/token is the median of 3 runs of ``--steps`` steps. Weight memory counts every parameter and
buffer (not the KV cache). The first step's logits of the sparse model are compared with the dense model's.

    python benchmarks/bench_decode.py                       # GPU, 50% and 70% (~1 min on an H100)
    python benchmarks/bench_decode.py --formats auto,csr    # + every layer as CSR (the old path)
    python benchmarks/bench_decode.py --model-dir DIR       # a LLaMA model folder as pruned there
    python benchmarks/bench_decode.py --quick               # 2 tiny layers on the CPU (smoke test)
"""
from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import torch  # noqa: E402

from harness import Report  # noqa: E402

from sparsity_engine.nn import decode  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsities", default="0.5,0.7", help="comma-separated fractions (default 0.5,0.7)")
    parser.add_argument("--formats", default="auto", help="comma-separated: auto, bitmap, csr")
    parser.add_argument("--steps", type=int, default=64, help="decode steps per timed run")
    parser.add_argument("--layers", type=int, help="override the depth (quicker runs)")
    parser.add_argument("--model-dir", help="a LLaMA model folder instead of random weights (no pruning)")
    parser.add_argument("--quick", action="store_true", help="a 2-layer 256-wide model on the CPU")
    args = parser.parse_args(argv)
    formats = [f for f in args.formats.split(",") if f]
    report = Report("decode", "decode ms/token batch 1, dense (masked) vs sparse, CUDA graphs for both")
    if args.quick:
        from transformers import LlamaConfig

        cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=100)
        model = decode.build_random(cfg, "cpu")
        rows = decode.compare(model, [0.5], formats, steps=4)
    else:
        sparsities = None if args.model_dir else [float(v) for v in args.sparsities.split(",")]
        rows = decode.bench_decode(args.model_dir, sparsities, formats, steps=args.steps, layers=args.layers)
    for row in rows:
        row["converted"] = str(row.get("converted", ""))
        report.add(**row)
    report.print_table(["model", "sparsity", "ms_per_token", "tokens_per_s", "speedup", "eager_ms_per_token",
                        "weight_gb", "weight_ratio", "linears_ratio", "logits_rel_err", "top1_same", "converted"])
    print("saved", *report.save(), flush=True)
    if torch.cuda.is_available():
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 1e9:.1f} GB", flush=True)


if __name__ == "__main__":
    main()
