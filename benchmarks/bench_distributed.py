"""One pruning job over several GPUs (issue 18): per-block time of ``torchrun --nproc-per-node N -m sparsity_engine
prune`` on 70B-shaped blocks, N = 1, 2, 4, 8.

The script writes a LLaMA-architecture model with ``--blocks`` (default 4) random bf16 blocks of the 70B shape
(hidden 8192, intermediate 28672, 64 heads, 8 KV heads; ~1.7 GB a block) with bench_prune_job's writer, and
128 x 2048 pre-tokenised calibration ids, then for each process count N runs, as a separate command:

    python -m torch.distributed.run --standalone --nproc-per-node N -m sparsity_engine prune MODEL --out OUT \\
        --method sparsegpt --sparsity 0.5 --calib ids.pt --nsamples 128 --seqlen 2048 --device cuda --quiet

(N = 1 is the single-GPU pipeline: torchrun with one process runs no torch.distributed at all). From the job's
report (rank 0's): per-block time = the sum of the block's phases (read, hessian, prune, propagate, write; the
collectives are inside hessian and prune), median over the blocks after the first; the speed-up of N GPUs is
the 1-GPU median over the N-GPU median; the whole 80-block job is extrapolated as (measured wall - measured
block time) + 80 x median block. Every N-process output is compared with the 1-process output: keep-masks agree
on >= 99.9% of the entries and every layer keeps as many weights (the job's own equivalence contract).

A 1-block model is pruned once first (one process, untimed) so Triton's kernels for these shapes are compiled and
cached; ``--no-warmup`` skips it. Environment variables (NCCL_NVLS_ENABLE=0 and the others) are passed to torchrun
unchanged. Expected time on 8 H100s: writing the model ~1 min, each run ~0.5-1 min (startup, 4 blocks, writing).

Targets: per-block >= 1.8x on 2 GPUs and >= 3.3x on 4 than on one; the whole 70B-shaped job <= 3 minutes on 8
GPUs (extrapolated). The table printed last says which were met. JSON: ``distributed.json`` in
benchmarks/results (GPU runs) and in $SE_BENCH_OUT or $OUT. ``--quick``: tiny shapes, gloo on the CPU with 1, 2
and 3 processes: a smoke test of this script (and of torchrun + the job) in about a minute.
"""
from __future__ import annotations

import argparse
import json
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

from bench_prune_job import SHAPES, write_model  # noqa: E402
from harness import Report  # noqa: E402

TARGET_SPEEDUP = {2: 1.8, 4: 3.3}
TARGET_JOB_S = {8: 180.0}
FULL_BLOCKS = 80          # LLaMA-2-70B


def torchrun_prune(nproc: int, model: str, out: str, ids: str, common: list, log: str) -> dict:
    """Run the prune job under torchrun with ``nproc`` processes; wall time and the job's report."""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "sparsity_engine", "prune", model, "--out", out, "--method", "sparsegpt", "--sparsity", "0.5",
           "--calib", ids, *common, "--quiet"]
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    res = {"processes": nproc, "rc": rc, "wall_s": time.perf_counter() - t0}
    if rc != 0:
        with open(log) as f:
            print(f"{nproc} process(es): prune failed (exit {rc}):\n{f.read()[-3000:]}", flush=True)
        return res
    with open(os.path.join(out, "sparsity_report.json")) as f:
        rep = json.load(f)
    blocks = [t for _, t in sorted(rep["timings"]["per_block"].items(), key=lambda kv: int(kv[0]))]
    per_block = [sum(v for k, v in t.items() if k.endswith("_s")) for t in blocks]
    for phase in ("hessian", "prune", "propagate"):        # where a block's time goes (median after block 0)
        vals = [t.get(f"{phase}_s", 0.0) for t in blocks]
        res[f"{phase}_median_s"] = statistics.median(vals[1:] or vals)
    res.update(per_block_s=per_block, block_median_s=statistics.median(per_block[1:] or per_block),
               phases=rep["timings"]["phases"], report_total_s=rep["timings"]["total_s"],
               peak_gpu_bytes_rank0=rep["memory"]["peak_gpu_bytes"], sparsity=rep["summary"]["sparsity"],
               recorded_processes=rep["settings"].get("processes"))
    return res


def compare_outputs(a: str, b: str) -> dict:
    """Keep-mask agreement of the pruned linears (2-D weights inside the blocks) of two outputs, and whether every
    layer keeps as many weights."""
    from sparsity_engine.io import SafetensorsReader

    ra, rb = SafetensorsReader(a), SafetensorsReader(b)
    agree = total = 0
    same_counts = True
    for name in ra.keys():
        info = ra.info(name)
        if ".layers." not in name or not name.endswith("proj.weight") or len(info.shape) != 2:
            continue
        ma, mb = ra.get(name) != 0, rb.get(name) != 0
        agree += int((ma == mb).sum())
        total += ma.numel()
        same_counts &= int(ma.sum()) == int(mb.sum())
    ra.close()
    rb.close()
    return {"mask_agreement": agree / max(1, total), "same_sparsity_per_layer": same_counts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--processes", default=None, help="comma-separated process counts (default 1,2,4,8 up to the "
                    "GPUs present; 1,2,3 with --quick)")
    ap.add_argument("--blocks", type=int, default=4, help="70B-shaped blocks on disk (default 4; >= 2)")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=None, help="passed to prune (default: the job's own choice)")
    ap.add_argument("--workdir", default=os.environ.get("SE_BENCH_WORK", "/tmp/se_distributed"))
    ap.add_argument("--keep", action="store_true", help="keep the model and the outputs")
    ap.add_argument("--no-warmup", action="store_true", help="no 1-block run first (Triton compiles in the timed run)")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, gloo on the CPU: a smoke test of this script")
    args = ap.parse_args()
    if not os.environ.get("SE_BENCH_OUT") and os.environ.get("OUT"):
        os.environ["SE_BENCH_OUT"] = os.environ["OUT"]
    if args.blocks < 2:
        ap.error("--blocks must be >= 2 (the first block is not counted in the median)")
    gpus = torch.cuda.device_count() if not args.quick else 0
    if not args.quick and gpus == 0:
        ap.error("needs CUDA GPUs (or --quick for the CPU smoke test)")
    device = "cpu" if args.quick else "cuda"
    shape, vocab, dtype = (SHAPES["quick"], 1000, torch.float32) if args.quick else \
        (SHAPES["70b"], 32000, torch.bfloat16)
    if args.quick:
        args.nsamples, args.seqlen, args.blocks = 6, 32, 3
    default = "1,2,3" if args.quick else ",".join(str(n) for n in (1, 2, 4, 8) if n <= gpus)
    counts = sorted({int(n) for n in (args.processes or default).split(",") if n.strip()})
    if not counts or counts[0] != 1 or (not args.quick and counts[-1] > gpus):
        ap.error(f"--processes must start with 1 (the baseline) and use at most the {gpus} GPUs present")
    os.makedirs(args.workdir, exist_ok=True)
    common = ["--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--device", device]
    if args.batch_size:
        common += ["--batch-size", str(args.batch_size)]
    ids = os.path.join(args.workdir, "calib_ids.pt")
    torch.save(torch.randint(0, vocab, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(0)), ids)
    model = os.path.join(args.workdir, "llama_70b_shaped")
    t0 = time.perf_counter()
    shutil.rmtree(model, ignore_errors=True)
    write_model(model, shape, args.blocks, vocab, "cuda" if gpus else "cpu", dtype=dtype)
    print(f"model with {args.blocks} blocks ready in {time.perf_counter() - t0:.1f}s", flush=True)
    what = "gloo on the CPU, tiny shapes" if args.quick else "70B-shaped blocks"
    report = Report("distributed" + ("_quick" if args.quick else ""),
                    f"sparsity-engine prune under torchrun, {what}, SparseGPT 50%, {args.nsamples}x{args.seqlen} "
                    "calibration tokens, random weights")
    if not args.no_warmup:
        warm = model + "_warmup"
        write_model(warm, shape, 1, vocab, "cuda" if gpus else "cpu", dtype=dtype)
        res = torchrun_prune(1, warm, warm + "_out", ids, common, os.path.join(args.workdir, "warmup.log"))
        report.add(run="warm-up (1 block, 1 process; kernels compile)", processes=1, rc=res["rc"],
                   wall_s=res["wall_s"])
        shutil.rmtree(warm, ignore_errors=True)
        shutil.rmtree(warm + "_out", ignore_errors=True)
    base_out = os.path.join(args.workdir, "out_1")
    base = None
    for n in counts:
        out = os.path.join(args.workdir, f"out_{n}")
        res = torchrun_prune(n, model, out, ids, common, os.path.join(args.workdir, f"prune_{n}.log"))
        row = {"run": f"{n} process{'es' if n > 1 else ''}", "blocks": args.blocks}
        row.update({k: v for k, v in res.items() if k not in ("per_block_s", "phases")})
        if res["rc"] == 0:
            row["extrapolated_job_s"] = res["wall_s"] - sum(res["per_block_s"]) + FULL_BLOCKS * res["block_median_s"]
            if n == 1:
                base = res
            else:
                if base is not None:
                    row["speedup"] = base["block_median_s"] / res["block_median_s"]
                    row.update(compare_outputs(base_out, out))
                if not args.keep:
                    shutil.rmtree(out, ignore_errors=True)
        report.add(**row)
        print(json.dumps(row, default=str), flush=True)
    if not args.keep:
        shutil.rmtree(base_out, ignore_errors=True)
        shutil.rmtree(model, ignore_errors=True)
    summarize(report, args.quick)
    report.save()


def summarize(report: Report, quick: bool) -> None:
    """Targets met or not (GPU runs), the equivalence check, then the table (last)."""
    for row in report.rows:
        n, checks = row.get("processes"), []
        if row.get("rc") != 0 or row["run"].startswith("warm-up"):
            continue
        if "mask_agreement" in row:
            ok = row["mask_agreement"] >= 0.999 and row["same_sparsity_per_layer"]
            checks.append(f"masks {row['mask_agreement']:.5f} {'ok' if ok else 'NOT EQUIVALENT'}")
        if not quick and n in TARGET_SPEEDUP and "speedup" in row:
            t = TARGET_SPEEDUP[n]
            checks.append(f"{row['speedup']:.2f}x {'>=' if row['speedup'] >= t else '<'} {t}x")
        if not quick and n in TARGET_JOB_S:
            t = TARGET_JOB_S[n]
            v = row["extrapolated_job_s"]
            checks.append(f"80-block job {v:.0f}s {'<=' if v <= t else '>'} {t:.0f}s")
        row["targets"] = "; ".join(checks)
    report.print_table(["run", "blocks", "rc", "wall_s", "block_median_s", "hessian_median_s", "prune_median_s",
                        "propagate_median_s", "speedup", "extrapolated_job_s", "peak_gpu_bytes_rank0",
                        "mask_agreement", "targets"])


if __name__ == "__main__":
    main()
