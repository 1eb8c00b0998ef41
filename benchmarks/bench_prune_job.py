"""Whole pruning jobs, disk to disk, through the command line (issue 17's targets), on one GPU.

For each size asked for, the script writes a LLaMA-architecture model with random bf16 weights (std 0.02,
norms 1) as Hugging Face safetensors shards of 5 GB with safetensors' own ``save_file`` (no tokenizer), plus
pre-tokenised calibration ids (128 x 2048) and evaluation ids, then times, each as a separate process:

* ``prune``: ``sparsity-engine prune MODEL --out OUT --method sparsegpt --sparsity 0.5 --calib ids.pt`` (wall
  time around the process; its peak RSS from ``os.wait4``; phases, per-block times, GPU peak and bytes from the
  job's own report);
* ``eval`` (``--eval``): ``sparsity-engine eval OUT --text eval_ids.pt`` on the pruned model;
* ``reference`` (``--ref``): the same prune on a 4-block (``--ref-blocks``) 7B-shaped model with ``--backend
  reference`` and with the default backends; the speed-up is the ratio of the summed per-block times;
* 70B-shaped (80 blocks, hidden 8192, intermediate 28672, 8 KV heads): the disk holds only ``--blocks-70b``
  blocks (default 4), so that model is written with that many blocks and pruned; the whole job is
  extrapolated as (measured wall - measured block time) + 80 x median block time, and marked so.

Before each size a 1-block model of the same shape is pruned once (untimed, reported as the warm-up row) so that
Triton's kernels for these shapes are compiled and cached; ``--no-warmup`` times a first run instead.

Sizes: 7b (32 blocks, 4096 / 11008, 13.5 GB), 13b (40 blocks, 5120 / 13824, 26 GB), 70b (see above). Each
model and output is deleted after its size is done (the disk is 64 GB), unless ``--keep``. Expected times on
one H100 (page cache warm, i.e. the model was just written; ``--cold`` evicts it first with posix_fadvise):
7b write ~0.5-1 min + prune ~0.3-0.7 min + eval ~0.3 min; --ref ~1.5-2 min; 13b write ~1-2 min + prune
~0.6-1.2 min; 70b with 4 blocks ~1 min. ``--sizes 7b --ref --eval`` and ``--sizes 13b,70b`` each fit a
9-minute call. ``--quick``: tiny shapes on the CPU, a smoke test of the script in seconds.

Targets (issue 17): 7B <= 20 s wall and <= 6 GB peak host RSS; >= 10x the reference backend over >= 4 blocks;
13B peak RSS <= 8 GB; 70B extrapolated <= 8 min, RSS <= 12 GB. The table printed last says which were met.
JSON: ``prune_job.json`` in benchmarks/results (GPU runs) and in $SE_BENCH_OUT or $OUT.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from harness import Report  # noqa: E402

SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32, blocks=32),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_attention_heads=40, num_key_value_heads=40, blocks=40),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8, blocks=80),
    "quick": dict(hidden_size=64, intermediate_size=176, num_attention_heads=4, num_key_value_heads=2, blocks=4),
}
TARGETS = {"7b": dict(wall_s=20, rss_gb=6), "13b": dict(rss_gb=8), "70b": dict(wall_s=480, rss_gb=12)}
GB = 1e9


def llama_config(shape: dict, blocks: int, vocab: int, dtype=torch.bfloat16):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=vocab, num_hidden_layers=blocks, max_position_embeddings=4096,
                                   rms_norm_eps=1e-5, tie_word_embeddings=False,
                                   **{k: v for k, v in shape.items() if k != "blocks"})
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.dtype = str(dtype).replace("torch.", "")
    return cfg


def write_model(folder: str, shape: dict, blocks: int, vocab: int, device: str, shard_bytes: int = 5 * 10**9,
                dtype=torch.bfloat16) -> float:
    """A random-weight LlamaForCausalLM folder written with safetensors' save_file; returns bytes written."""
    import transformers
    from safetensors.torch import save_file

    cfg = llama_config(shape, blocks, vocab, dtype)
    with torch.device("meta"):
        names = {k: tuple(v.shape) for k, v in transformers.LlamaForCausalLM(cfg).state_dict().items()}
    os.makedirs(folder, exist_ok=True)
    cfg.save_pretrained(folder)
    gen = torch.Generator(device).manual_seed(0)
    groups, cur, size = [], {}, 0
    for name, shp in names.items():
        n = math.prod(shp) * 2
        if cur and size + n > shard_bytes:
            groups.append(cur)
            cur, size = {}, 0
        cur[name], size = shp, size + n
    groups.append(cur)
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, shp in group.items():
            t = torch.ones(shp, dtype=dtype, device=device) if name.endswith("norm.weight") else \
                (torch.randn(shp, generator=gen, device=device, dtype=torch.float32) * 0.02).to(dtype)
            tensors[name] = t.cpu()
            weight_map[name] = fname
            total += t.numel() * t.element_size()
        save_file(tensors, os.path.join(folder, fname), metadata={"format": "pt"})
        del tensors
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return total


def evict(folder: str) -> None:
    """Drop a folder's files from the page cache (a cold read from disk), where the OS allows."""
    for name in os.listdir(folder):
        fd = os.open(os.path.join(folder, name), os.O_RDONLY)
        try:
            os.fsync(fd)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run_cli(args, log: str) -> dict:
    """Run ``python -m sparsity_engine ARGS``; wall time, exit code, peak RSS of that process (wait4)."""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.Popen([sys.executable, "-m", "sparsity_engine", *args], stdout=f, stderr=subprocess.STDOUT,
                             env=env)
        _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    rss = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    with open(log) as f:
        tail = f.read()[-1500:]
    return {"rc": p.returncode, "wall_s": wall, "peak_rss_bytes": rss, "log_tail": tail}


def prune(model: str, out: str, ids: str, common: list, log: str, extra=()) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    res = run_cli(["prune", model, "--out", out, "--method", "sparsegpt", "--sparsity", "0.5", "--calib", ids,
                   *common, "--quiet", *extra], log)
    if res["rc"] != 0:
        print(f"prune failed (exit {res['rc']}):\n{res['log_tail']}", flush=True)
        return res
    with open(os.path.join(out, "sparsity_report.json")) as f:
        rep = json.load(f)
    per_block = [sum(v for k, v in t.items() if k.endswith("_s")) for _, t in sorted(rep["timings"]["per_block"].items(),
                                                                                      key=lambda kv: int(kv[0]))]
    res.update(report_total_s=rep["timings"]["total_s"], phases=rep["timings"]["phases"], per_block_s=per_block,
               block_median_s=statistics.median(per_block[1:] or per_block), blocks=len(per_block),
               peak_gpu_bytes=rep["memory"]["peak_gpu_bytes"], self_rss_bytes=rep["memory"]["peak_rss_bytes"],
               bytes_read=rep["io"]["bytes_read"], bytes_written=rep["io"]["bytes_written"],
               sparsity=rep["summary"]["sparsity"])
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="7b", help="comma-separated: 7b, 13b, 70b (default 7b)")
    ap.add_argument("--ref", action="store_true", help="reference backend vs ours over --ref-blocks blocks")
    ap.add_argument("--ref-blocks", type=int, default=4)
    ap.add_argument("--blocks-70b", type=int, default=4, help="blocks of the 70B-shaped model on disk (>= 4)")
    ap.add_argument("--eval", action="store_true", help="also time `sparsity-engine eval` on the pruned 7B/13B")
    ap.add_argument("--eval-windows", type=int, default=32, help="eval windows of 2048 tokens (default 32)")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=None, help="passed to prune (default: the job's own choice)")
    ap.add_argument("--workdir", default=os.environ.get("SE_BENCH_WORK", "/tmp/se_prune_job"))
    ap.add_argument("--cold", action="store_true", help="evict the model from the page cache before each run")
    ap.add_argument("--keep", action="store_true", help="keep models and outputs")
    ap.add_argument("--no-warmup", action="store_true", help="no 1-block run of each shape first (so the timed run "
                    "includes Triton compiling its kernels, as a first run on a new machine does)")
    ap.add_argument("--quick", action="store_true", help="tiny shapes on the CPU: a smoke test of this script")
    args = ap.parse_args()
    if not os.environ.get("SE_BENCH_OUT") and os.environ.get("OUT"):
        os.environ["SE_BENCH_OUT"] = os.environ["OUT"]
    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    vocab = 1000 if args.quick else 32000
    if args.quick:
        args.nsamples, args.seqlen, args.eval_windows = 4, 32, 2
    os.makedirs(args.workdir, exist_ok=True)
    usage = shutil.disk_usage(args.workdir)
    print(f"workdir {args.workdir}: {usage.free / GB:.0f} GB free of {usage.total / GB:.0f} GB", flush=True)
    common = ["--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--device", device]
    if args.batch_size:
        common += ["--batch-size", str(args.batch_size)]
    ids = os.path.join(args.workdir, "calib_ids.pt")
    torch.save(torch.randint(0, vocab, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(0)), ids)
    eval_ids = os.path.join(args.workdir, "eval_ids.pt")
    torch.save(torch.randint(0, vocab, (args.eval_windows * args.seqlen,), generator=torch.Generator().manual_seed(1)),
               eval_ids)
    report = Report("prune_job" + ("_quick" if args.quick else ""),
                    f"sparsity-engine prune, disk to disk (CLI subprocess), SparseGPT 50%, {args.nsamples}x"
                    f"{args.seqlen} calibration tokens, random bf16 LLaMA-shaped weights, page cache "
                    f"{'cold' if args.cold else 'warm'}")
    sizes = ["quick"] if args.quick else [s.strip() for s in args.sizes.split(",") if s.strip()]
    for size in sizes:
        shape = SHAPES[size]
        blocks = max(4, args.blocks_70b) if size == "70b" else shape["blocks"]
        model, out = os.path.join(args.workdir, f"llama_{size}"), os.path.join(args.workdir, f"pruned_{size}")
        t0 = time.perf_counter()
        if not os.path.isfile(os.path.join(model, "model.safetensors.index.json")):
            shutil.rmtree(model, ignore_errors=True)
            write_model(model, shape, blocks, vocab, device, dtype=torch.float32 if args.quick else torch.bfloat16)
        write_s = time.perf_counter() - t0
        if not args.no_warmup:               # Triton compiles its kernels for these shapes once, here
            warm = model + "_warmup"
            write_model(warm, shape, 1, vocab, device, dtype=torch.float32 if args.quick else torch.bfloat16)
            res = prune(warm, warm + "_out", ids, common, os.path.join(args.workdir, f"warmup_{size}.log"))
            report.add(run=f"warm-up {size} (1 block; kernels compile)", blocks=1, rc=res["rc"], wall_s=res["wall_s"],
                       peak_rss_bytes=res["peak_rss_bytes"])
            shutil.rmtree(warm, ignore_errors=True)
            shutil.rmtree(warm + "_out", ignore_errors=True)
        if args.cold:
            evict(model)
        print(f"[{size}] model with {blocks} blocks ready in {write_s:.1f}s; pruning", flush=True)
        res = prune(model, out, ids, common, os.path.join(args.workdir, f"prune_{size}.log"))
        row = {"run": f"prune {size}", "blocks": blocks, "write_model_s": write_s}
        row.update({k: v for k, v in res.items() if k not in ("log_tail", "per_block_s", "blocks")})
        if res["rc"] == 0 and blocks < shape["blocks"]:          # 70B: extrapolate from the streamed blocks
            overhead = res["wall_s"] - sum(res["per_block_s"])
            row.update(extrapolated_blocks=shape["blocks"],
                       extrapolated_wall_s=overhead + shape["blocks"] * res["block_median_s"],
                       note=f"measured {blocks} blocks; wall extrapolated to {shape['blocks']} as overhead + "
                            f"{shape['blocks']} x median block; RSS as measured (bounded by a few blocks)")
        report.add(**row)
        print(json.dumps({k: v for k, v in row.items() if k != "phases"}, default=str), flush=True)
        if args.eval and res["rc"] == 0 and size != "70b":
            ev = run_cli(["eval", out, "--text", eval_ids, "--seqlen", str(args.seqlen), "--device", device, "--json",
                          "--quiet"], os.path.join(args.workdir, f"eval_{size}.log"))
            try:
                ppl = json.loads(ev["log_tail"][ev["log_tail"].index("{"):])["perplexity"]
            except ValueError:
                ppl = None
            report.add(run=f"eval {size}", blocks=blocks, rc=ev["rc"], wall_s=ev["wall_s"],
                       peak_rss_bytes=ev["peak_rss_bytes"], perplexity=ppl, windows=args.eval_windows)
            print(f"[{size}] eval: {ev['wall_s']:.1f}s, rc {ev['rc']}, perplexity {ppl}", flush=True)
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(model, ignore_errors=True)
    if args.ref:
        shape = SHAPES["quick" if args.quick else "7b"]
        model = os.path.join(args.workdir, "llama_7b_ref")
        write_model(model, shape, args.ref_blocks, vocab, device, dtype=torch.float32 if args.quick else torch.bfloat16)
        runs = {}
        for label, extra in (("ours", ()), ("reference", ("--backend", "reference"))):
            out = os.path.join(args.workdir, f"pruned_ref_{label}")
            res = prune(model, out, ids, common, os.path.join(args.workdir, f"ref_{label}.log"), extra)
            runs[label] = res
            report.add(run=f"{args.ref_blocks} blocks {label}",
                       **{k: v for k, v in res.items() if k not in ("log_tail", "per_block_s", "phases")})
            shutil.rmtree(out, ignore_errors=True)
            print(f"[ref] {label}: wall {res['wall_s']:.1f}s, blocks {res.get('per_block_s')}", flush=True)
        if all(r["rc"] == 0 for r in runs.values()):
            o, r = sum(runs["ours"]["per_block_s"]), sum(runs["reference"]["per_block_s"])
            report.add(run="speedup over reference", blocks=args.ref_blocks, blocks_ratio=r / o,
                       wall_ratio=runs["reference"]["wall_s"] / runs["ours"]["wall_s"])
        if not args.keep:
            shutil.rmtree(model, ignore_errors=True)
    summarize(report)
    report.save()


def summarize(report: Report) -> None:
    """Targets met or not, then the table (last)."""
    for row in report.rows:
        size = row["run"].split()[-1] if row["run"].startswith("prune") else None
        t = TARGETS.get(size or "")
        if not t or row.get("rc") != 0:
            continue
        wall = row.get("extrapolated_wall_s", row["wall_s"])
        checks = []
        if "wall_s" in t:
            checks.append(f"wall {wall:.1f}s {'<=' if wall <= t['wall_s'] else '>'} {t['wall_s']}s")
        checks.append(f"RSS {row['peak_rss_bytes'] / GB:.2f} GB {'<=' if row['peak_rss_bytes'] <= t['rss_gb'] * GB else '>'}"
                      f" {t['rss_gb']} GB")
        row["targets"] = "; ".join(checks)
    for row in report.rows:
        if row["run"] == "speedup over reference":
            row["targets"] = f"{row['blocks_ratio']:.1f}x {'>=' if row['blocks_ratio'] >= 10 else '<'} 10x"
    report.print_table(["run", "blocks", "rc", "wall_s", "extrapolated_wall_s", "peak_rss_bytes", "peak_gpu_bytes",
                        "block_median_s", "bytes_read", "bytes_written", "perplexity", "blocks_ratio", "targets"])


if __name__ == "__main__":
    main()
