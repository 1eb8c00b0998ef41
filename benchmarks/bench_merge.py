"""Fused generalized task-arithmetic merges against mergekit's torch path, same inputs, same run.

Per tensor (bf16, 3 fine-tuned models + base): TIES, DARE-TIES (mergekit's default L1 rescale, and without
rescale), DELLA; ours (merge_task_vectors, 'auto' backend) against the anchor, a plain-torch transcription
of mergekit's GTA task (argsort magnitude, bernoulli, double-argsort DELLA ranks, stacked get_mask), with
the bytes floor: read 4 inputs + write 1 at the bandwidth of a device copy measured in the same run.

Whole model: base + 3 fine-tuned LLaMA-7B-shaped state dicts (random bf16, already on the GPU; disk I/O
excluded), a subset of layers merged end to end with ties / dare_ties / della, ours vs the anchor; the
full-model time is extrapolated (per-layer time x 32 + embeddings) and labelled as such.

    python benchmarks/bench_merge.py           # GPU, realistic sizes
    python benchmarks/bench_merge.py --quick   # tiny sizes, CPU smoke test (Triton interpreter)
"""
from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from harness import Report, bench  # noqa: E402

import sparsity_engine as se  # noqa: E402
from sparsity_engine.merge import merge_state_dicts  # noqa: E402
from sparsity_engine.ops.merge import METHODS  # noqa: E402

N_MODELS = 3
WEIGHTS = [1.0, 0.7, 0.5]


# ------------------------------------------------------------------ the anchor: mergekit's torch path

def _mk_rescale(t, masked):
    before, after = t.abs().sum(), masked.abs().sum()
    if before < 1e-7 or after < 1e-7:
        return masked
    return masked * (before / after)


def _mk_sparsify(delta, spars, density, epsilon, rescale):
    if density >= 1:
        return delta
    if spars == "magnitude":
        mask = torch.zeros_like(delta)
        top = torch.argsort(delta.abs().view(-1), descending=True)[: int(density * delta.numel())]
        mask.view(-1)[top] = 1
    elif spars == "random":
        mask = torch.bernoulli(torch.full_like(delta, density))
    else:  # della_magprune
        rows = delta if delta.dim() >= 2 else delta.unsqueeze(0)
        ranks = torch.argsort(rows.abs(), dim=1).argsort(dim=1).to(delta.dtype) + 1
        lo, hi = ranks.min(1, keepdim=True).values, ranks.max(1, keepdim=True).values
        probs = (density - epsilon) + ((ranks - lo) / (hi - lo)).clamp(0, 1) * 2 * epsilon
        mask = torch.bernoulli(probs).reshape(delta.shape)
    masked = delta * mask
    return _mk_rescale(delta, masked) if rescale else masked


def mergekit_path(base, tensors, weights, method, density=0.3, epsilon=0.1, rescale=None):
    spars, consensus, normalize, default_rescale = METHODS[method]
    rescale = default_rescale if rescale is None else rescale
    deltas = [_mk_sparsify(t - base, spars, density, epsilon, rescale) if spars else t - base for t in tensors]
    deltas = torch.stack(deltas, 0)
    w = torch.tensor(weights, dtype=deltas.dtype, device=deltas.device).view(-1, *([1] * base.dim()))
    wd = deltas * w
    if consensus:
        sign = wd.sign()
        elected = (wd.sum(0) >= 0).to(wd.dtype) * 2 - 1
        mask = sign == elected
        mixed = (wd * mask).sum(0)
        div = (w * mask).sum(0)
        div[div == 0] = 1
    else:
        mixed = wd.sum(0)
        div = w.sum(0)
        div[div.abs() < 1e-8] = 1
    if normalize:
        mixed /= div
    return (base + mixed).to(base.dtype)


# ------------------------------------------------------------------ per-tensor benchmark

def copy_bandwidth(device) -> float:
    """Bytes per ms of a device-to-device copy (read + write), the floor's yardstick."""
    x = torch.empty(256 * 2**20 // 2, dtype=torch.bfloat16, device=device)
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    return 2 * x.numel() * x.element_size() / ms


def per_tensor(report, shapes, device, bw, methods):
    for shape in shapes:
        base = torch.randn(shape, device=device, dtype=torch.bfloat16)
        ts = [(base.float() + 0.01 * torch.randn(shape, device=device)).to(torch.bfloat16) for _ in range(N_MODELS)]
        floor = (N_MODELS + 2) * base.numel() * base.element_size() / bw
        for label, method, kw in methods:
            ours = lambda: se.merge_task_vectors(base, ts, WEIGHTS, method=method, density=0.3, epsilon=0.1, **kw)  # noqa: E731
            anchor = lambda: mergekit_path(base, ts, WEIGHTS, method, density=0.3, epsilon=0.1, **kw)  # noqa: E731
            try:
                ours_ms = bench(ours)
                backend = se.ops.merge.choose("merge_task_vectors", None, base, ts, WEIGHTS, **_kw(method)).backend
            except Exception as exc:  # a missing dependency (e.g. masks' DELLA) must not hide the other rows
                print(f"{label} {shape}: ours failed: {exc!r}", flush=True)
                ours_ms, backend = float("nan"), "failed"
            anchor_ms = bench(anchor)
            report.add(op=label, shape="x".join(map(str, shape)), backend=backend, ours_ms=ours_ms,
                       mergekit_ms=anchor_ms, floor_ms=floor, speedup=anchor_ms / ours_ms, x_floor=ours_ms / floor,
                       ours_GBps=(N_MODELS + 2) * base.numel() * 2 / ours_ms / 1e6)
        del base, ts
        torch.cuda.empty_cache() if torch.cuda.is_available() else None


def breakdown(report, shape, device):
    """Where a merge spends its GPU time: the band edges (masks.select_edges per backend), the fused pass,
    DARE's passes, DELLA's task vectors."""
    from sparsity_engine.ops import masks
    from sparsity_engine.ops.merge import triton as mt

    base = torch.randn(shape, device=device, dtype=torch.bfloat16)
    ts = [(base.float() + 0.01 * torch.randn(shape, device=device)).to(torch.bfloat16) for _ in range(N_MODELS)]
    k = int(0.3 * base.numel())
    sh = "x".join(map(str, shape))
    rows = [(i, k, False) for i in range(N_MODELS)]
    for backend, label in (("triton", "Triton select_edges, 2 passes of 8-bit digits per model"),
                           ("cuda", "CUDA masks_select.cu, 2 passes of 8-bit digits, all models per pass")):
        try:
            ms = bench(lambda: masks.select_edges(ts, base, rows, magnitude=True, backend=backend))
            report.add(op=f"TIES part: radix select ({label})", shape=sh, ms=ms)
        except Exception as exc:  # no extension here: the other rows still count
            print(f"select {backend}: {exc!r}", flush=True)
    weights = [1.0] * N_MODELS
    plan = mt._Plan(base, ts, weights)
    plan.select_bands([(0, k)] * N_MODELS, later_first=False, backend=None)
    out = torch.empty_like(base)
    fused = lambda: plan.launch(out, spars=mt.SPARS_BAND, consensus="sum", normalize=True, rescale_norm=None,  # noqa: E731
                                lambda_=1.0, phase=mt.PHASE_MERGE)
    dare = mt._Plan(base, ts, weights, dens=[0.3] * N_MODELS)
    dare.seeds = torch.tensor([1, 2], dtype=torch.int32, device=device)
    dare_pass = lambda: dare.launch(out, spars=mt.SPARS_RANDOM, consensus="sum", normalize=False,  # noqa: E731
                                    rescale_norm=None, lambda_=1.0, phase=mt.PHASE_MERGE)
    report.add(op="TIES part: fused merge pass", shape=sh, ms=bench(fused))
    report.add(op="DARE-TIES part: fused merge pass (in-kernel Philox)", shape=sh, ms=bench(dare_pass))
    parts = torch.empty((dare.nblocks, 2, 4), dtype=torch.float32, device=device)
    dare_norms = lambda: dare.launch(None, spars=mt.SPARS_RANDOM, consensus=None, normalize=False,  # noqa: E731
                                     rescale_norm="l1", lambda_=1.0, phase=mt.PHASE_NORMS, norms=parts)
    report.add(op="DARE-TIES part: l1 norms pass (phase 0)", shape=sh, ms=bench(dare_norms))
    try:
        report.add(op="DELLA part: task vectors, ranks, draw, l1 terms (della_deltas kernel)", shape=sh,
                   ms=bench(_della_kernel(base, ts)))
        della = lambda: masks.della_deltas(base, ts, [0.3] * N_MODELS, [0.1] * N_MODELS, [1, 2, 3],  # noqa: E731
                                           [True] * N_MODELS, "l1", backend="cuda")
        report.add(op="DELLA part: della_deltas op (outputs allocated, NaN/Inf flag read: one host wait)",
                   shape=sh, ms=bench(della))
    except Exception as exc:  # no extension here: the other rows still count
        print(f"della_deltas: {exc!r}", flush=True)


def _della_kernel(base, ts):
    """csrc/masks_della.cu's della_deltas launched alone into buffers allocated once, nothing read back (the
    row the kernel tables compare; the op adds its allocations and one host read of the flag)."""
    from sparsity_engine._ext import dtype_code, load_extension, stream_ptr
    from sparsity_engine.ops.masks import cuda as mc

    ext = load_extension()
    n = base.shape[-1]
    rows = base.numel() // n
    outs = torch.empty((N_MODELS,) + tuple(base.shape), dtype=base.dtype, device=base.device)
    parts = torch.empty((rows, 2, N_MODELS), dtype=torch.float32, device=base.device)
    bad = torch.zeros(1, dtype=torch.int32, device=base.device)
    args = ([t.data_ptr() for t in ts], [o.data_ptr() for o in outs], base.data_ptr(), rows, n, [0.2] * N_MODELS,
            [0.2] * N_MODELS, [1, 2, 3], (1 << N_MODELS) - 1, mc.NORM_CODE["l1"], parts.data_ptr(), N_MODELS,
            bad.data_ptr(), dtype_code(base.dtype), stream_ptr(base))
    return lambda: ext.masks_della_deltas(*args)


def _kw(method):
    spars, consensus, normalize, rescale = METHODS[method]
    return dict(spars=spars, consensus=consensus, densities=[0.3] * N_MODELS, epsilons=[0.1] * N_MODELS,
                gammas=[0.01] * N_MODELS, lambda_=1.0, normalize=normalize, rescale_norm="l1" if rescale else None,
                generator=None)


# ------------------------------------------------------------------ whole model

def llama_layer_shapes(hidden, inter, layer):
    p = f"model.layers.{layer}."
    shapes = {p + f"self_attn.{x}_proj.weight": (hidden, hidden) for x in "qkvo"}
    shapes.update({p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                   p + "mlp.down_proj.weight": (hidden, inter), p + "input_layernorm.weight": (hidden,),
                   p + "post_attention_layernorm.weight": (hidden,)})
    return shapes


def whole_model(report, device, *, hidden, inter, vocab, layers, total_layers):
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        shapes.update(llama_layer_shapes(hidden, inter, i))
    base = {k: torch.randn(s, device=device, dtype=torch.bfloat16) for k, s in shapes.items()}
    fts = [{k: (v.float() + 0.01 * torch.randn_like(v, dtype=torch.float32)).to(torch.bfloat16)
            for k, v in base.items()} for _ in range(N_MODELS)]
    layer_names = [k for k in shapes if k.startswith("model.layers.")]
    other = [k for k in shapes if k not in layer_names]

    def timed(fn, reps=5):
        """Wall times (ms) of ``reps`` runs, sorted. The median is reported: host (Python) time varies from run to
        run on shared machines."""
        times = []
        for _ in range(reps):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
            del out
        return sorted(times)

    # out_device None: merged tensors stay on the GPU (the kernels and their host time); "cpu": each merged tensor
    # is copied to the host as merge_safetensors does before writing it (the user path, minus the disk)
    for out_device in (None, "cpu"):
        for method in ("ties", "dare_ties", "della"):
            def ours(names):
                return merge_state_dicts(base, fts, WEIGHTS, method=method, density=0.3, epsilon=0.1, names=names,
                                         out_device=out_device)

            def anchor(names):
                return {k: mergekit_path(base[k], [f[k] for f in fts], WEIGHTS, method).to(out_device or device)
                        for k in names}

            suffix = "" if out_device is None else " -> cpu"
            row = dict(op=f"whole-model {method}{suffix}", layers_measured=layers)
            for label, fn in (("ours", ours), ("mergekit", anchor)):
                try:
                    fn(layer_names[:9])  # warm-up: compiles kernels, fills the allocator
                    fn(other)
                    t_layers = timed(lambda: fn(layer_names))
                    t_other = timed(lambda: fn(other))
                except Exception as exc:
                    print(f"whole-model {method} {label} failed: {exc!r}", flush=True)
                    t_layers = t_other = [float("nan")] * 5
                med = lambda v: v[len(v) // 2]  # noqa: E731
                row[f"{label}_subset_ms"] = med(t_layers) + med(t_other)
                row[f"{label}_subset_range_ms"] = f"{t_layers[0] + t_other[0]:.1f}-{t_layers[-1] + t_other[-1]:.1f}"
                row[f"{label}_7B_est_s"] = (med(t_layers) / layers * total_layers + med(t_other)) / 1e3
            row["speedup"] = row["mergekit_7B_est_s"] / row["ours_7B_est_s"]
            row["note"] = (f"median of 5; extrapolated: {layers} of {total_layers} decoder layers measured "
                           "(+ embeddings, head, norm)")
            report.add(**row)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke test)")
    parser.add_argument("--skip-whole", action="store_true")
    parser.add_argument("--skip-tensors", action="store_true", help="only the whole-model merge")
    parser.add_argument("--shapes", help="comma-separated ROWSxCOLS for the per-tensor rows (GPU run)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    methods = [("TIES", "ties", {}), ("DARE-TIES (l1 rescale)", "dare_ties", {}),
               ("DARE-TIES (no rescale)", "dare_ties", {"rescale": False}), ("DELLA", "della", {})]
    shapes = [(67, 45), (128, 96)] if args.quick else [(11008, 4096), (28672, 8192)]
    if args.shapes and not args.quick:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    bw = copy_bandwidth(device)
    report = Report("merge", "fused GTA merges (3 models, bf16) vs mergekit's torch path; whole-model merge")
    parts = Report("merge_breakdown", "TIES / DARE-TIES / DELLA kernels alone (bf16, 3 models)")
    if not args.skip_tensors:
        per_tensor(report, shapes, device, bw, methods)
        report.print_table()
        for shape in shapes:
            breakdown(parts, shape, device)
        parts.print_table()
    whole = Report("merge_whole_model", "base + 3 fine-tuned LLaMA-7B-shaped bf16 state dicts on the GPU")
    if not args.skip_whole:
        if args.quick:
            whole_model(whole, device, hidden=64, inter=160, vocab=100, layers=2, total_layers=32)
        else:
            whole_model(whole, device, hidden=4096, inter=11008, vocab=32000, layers=4, total_layers=32)
        whole.print_table()
    print(f"copy bandwidth {bw / 1e6:.0f} GB/s", flush=True)
    if report.rows:
        report.save()
        parts.save()
    if whole.rows:
        whole.save()


if __name__ == "__main__":
    main()
