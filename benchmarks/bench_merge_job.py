"""The merge job disk to disk: ``sparsity-engine merge`` against the disk's own speed and against mergekit-yaml.

What it does, in one process on one GPU machine (scripts/gpu_session.sh merge runs it):

1. writes a LLaMA-7B-shaped base and three fine-tunes (base + N(0, 0.01^2) per weight) with random bf16 weights
   as sharded safetensors + config.json. A whole 7B model is 13.5 GB: four inputs and two outputs do not fit a
   64 GB disk with room to spare, so ``--blocks N`` keeps N of the 32 decoder blocks (embeddings and LM head
   stay whole); the report gives per-byte numbers and extrapolates them to the 32-block model;
2. measures the disk: sequential write of a probe file (fsync'd), then cold reads (the page cache emptied with
   ``/proc/sys/vm/drop_caches`` when writable, else posix_fadvise DONTNEED) with one stream and with four;
3. per method (dare_ties and ties, density 0.5, weights 1.0 / 0.7 / 0.5), from a cold page cache: our command
   ``sparsity-engine merge CONFIG OUT --device cuda`` in a child process (wall time, peak RSS of that process,
   its merge_report.json phases), then ``mergekit-yaml CONFIG OUT --cuda`` on the same configuration (on the CPU
   if --cuda fails, which the report says); for ties the two outputs are compared tensor by tensor;
4. prints a table and writes benchmarks/results/merge_job.json.

Targets (issue 19): ours within 1.5x of (input bytes / read speed + output bytes / write speed) at the measured
speeds; >= 5x faster than mergekit-yaml --cuda; peak host RSS <= 4 GB.

mergekit on the GPU machine (no network): besides what its image has (torch, transformers, accelerate, peft,
safetensors, tokenizers, sentencepiece, huggingface_hub, click, tqdm, pyyaml, protobuf), mergekit-yaml needs
these six wheels, fetched here and carried in ``.whl`` (about 3 MB)::

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \\
        -d .whl mergekit==0.1.5 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.7.0 \\
        typing-inspection==0.4.2 immutables==0.21

(mergekit's other declared needs, datasets and scipy, are not imported by mergekit-yaml's merge path; it is
installed with --no-deps). scripts/gpu_session.sh merge installs them and runs this script.

Expected runtime on one H100 at the default --blocks 8 (each model 3.8 GB, 15 GB of inputs; estimates, not yet
measured there): writing the inputs ~20-40 s, disk probe ~10 s, ours twice per method (the first process also
compiles kernels; the second is the one timed) ~15-25 s per method, mergekit-yaml --cuda up to
--mergekit-timeout (150 s) per method (a run cut there is reported as a lower bound on the speed-up): about
5-8 minutes in all. Ours is timed from a cold page cache in a fresh process, the time to start Python and
import torch included.

Runs on the CPU too, small (``--shape tiny --device cpu``), to check the script itself.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SHAPES = {  # hidden, intermediate, vocab, heads, full depth
    "7b": dict(hidden=4096, intermediate=11008, vocab=32000, heads=32, layers=32),
    "small": dict(hidden=1024, intermediate=2752, vocab=8000, heads=8, layers=16),
    "tiny": dict(hidden=256, intermediate=688, vocab=1000, heads=4, layers=8),
}
WEIGHTS = (1.0, 0.7, 0.5)
GB = 1e9


def _tensor_shapes(shape, blocks):
    h, i, v = shape["hidden"], shape["intermediate"], shape["vocab"]
    out = [("model.embed_tokens.weight", (v, h))]
    for b in range(blocks):
        p = f"model.layers.{b}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
        out += [(p + f"self_attn.{n}_proj.weight", (h, h)) for n in "qkvo"]
        out += [(p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i))]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return out


def write_models(root, shape, blocks, device, shard_bytes=2 * 10**9):
    """base + 3 fine-tunes under root; returns (dirs, seconds, bytes written)."""
    import transformers

    from sparsity_engine.io import ShardedSafetensorsWriter

    names = ["base", "ft0", "ft1", "ft2"]
    dirs = [os.path.join(root, n) for n in names]
    cfg = transformers.LlamaConfig(hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                                   vocab_size=shape["vocab"], num_hidden_layers=blocks,
                                   num_attention_heads=shape["heads"], num_key_value_heads=shape["heads"],
                                   tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    cfg.torch_dtype = "bfloat16"
    t0 = time.perf_counter()
    writers = []
    for d in dirs:
        os.makedirs(d, exist_ok=True)
        cfg.save_pretrained(d)
        writers.append(ShardedSafetensorsWriter(d, max_shard_bytes=shard_bytes))
    gen = torch.Generator(device=device).manual_seed(0)
    total = 0
    for name, shp in _tensor_shapes(shape, blocks):
        base = torch.randn(shp, generator=gen, device=device, dtype=torch.float32)
        if len(shp) == 1:
            base = 1 + 0.1 * base
        else:
            base *= 0.02
        for k, w in enumerate(writers):
            t = base if k == 0 else base + 0.01 * torch.randn(shp, generator=gen, device=device)
            t = t.to(torch.bfloat16).cpu()
            w.add(name, t)
            total += t.numel() * 2
    for w in writers:
        w.close()
    _sync_tree(root)
    return dirs, time.perf_counter() - t0, total


def _sync_tree(root):
    for r, _, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(r, f), os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)


def drop_caches(paths):
    """Empty the page cache of these files/folders: drop_caches when we may (root), else fadvise DONTNEED.
    Returns which way was used."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return "drop_caches"
    except OSError:
        pass
    for p in paths:
        for r, _, files in os.walk(p) if os.path.isdir(p) else [(os.path.dirname(p), None, [os.path.basename(p)])]:
            for f in files:
                fd = os.open(os.path.join(r, f), os.O_RDONLY)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.close(fd)
    return "fadvise_dontneed"


def disk_speed(root, size=4 * 10**9, chunk=64 * 2**20):
    """(write B/s, read B/s one stream, read B/s four streams, how the cache was emptied)."""
    path = os.path.join(root, "probe.bin")
    buf = os.urandom(chunk)
    t0 = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        for _ in range(size // chunk):
            f.write(buf)
        os.fsync(f.fileno())
    write = (size // chunk) * chunk / (time.perf_counter() - t0)

    def read_range(start, end, out):
        with open(path, "rb", buffering=0) as f:
            f.seek(start)
            m = memoryview(bytearray(chunk))
            pos = start
            while pos < end:
                n = f.readinto(m[: min(chunk, end - pos)])
                if not n:
                    break
                pos += n
        out.append(pos - start)

    how = drop_caches([path])
    got = []
    t0 = time.perf_counter()
    read_range(0, size, got)
    read1 = got[0] / (time.perf_counter() - t0)
    drop_caches([path])
    got = []
    q = size // 4
    threads = [threading.Thread(target=read_range, args=(k * q, (k + 1) * q, got)) for k in range(4)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    read4 = sum(got) / (time.perf_counter() - t0)
    os.remove(path)
    return write, read1, read4, how


def _vm_hwm(pid):
    """Peak resident memory of a live process (VmHWM, bytes), or 0. Not ru_maxrss: Linux folds the parent's
    peak into a child's ru_maxrss at exec, so that would report this (large) benchmark process instead."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def timed_child(cmd, timeout=None, env=None):
    """(wall seconds, peak RSS bytes of the child (VmHWM polled every 20 ms), exit code (None: killed at the
    timeout), output tail)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    out = []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.read()))
    reader.start()
    deadline = None if timeout is None else time.monotonic() + timeout
    killed, peak = False, 0
    while True:
        peak = max(peak, _vm_hwm(proc.pid))
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if deadline is not None and time.monotonic() > deadline:
            proc.kill()
            killed = True
            pid, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.02)
    wall = time.perf_counter() - t0
    reader.join()
    code = None if killed else os.waitstatus_to_exitcode(status)
    return wall, peak, code, (out[0] if out else "")[-3000:]


def folder_bytes(path):
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs
               if f.endswith(".safetensors"))


def write_config(path, method, dirs, density):
    import yaml

    models = [{"model": d, "parameters": {"weight": w, "density": density}} for d, w in zip(dirs[1:], WEIGHTS)]
    with open(path, "w") as f:
        yaml.safe_dump({"merge_method": method, "base_model": dirs[0], "models": models, "dtype": "bfloat16"}, f)


def compare(a, b, base):
    """Two merged models (bf16): the fraction of entries that differ and ||a - b|| / ||b - base|| over all
    tensors. In bf16 many task-vector entries have equal magnitudes, and which of them TIES keeps at the
    threshold is the sort's choice (mergekit's CPU/GPU sorts are not asked to be stable), so a small fraction
    may differ; the fp32 parity is exact (tests/test_merge_job.py)."""
    from sparsity_engine.io import SafetensorsReader

    differ, total, err, ref = 0, 0, 0.0, 0.0
    with SafetensorsReader(a) as ra, SafetensorsReader(b) as rb, SafetensorsReader(base) as r0:
        for name in rb.keys():
            x, y, z = ra.get(name).double(), rb.get(name).double(), r0.get(name).double()
            differ += int((x != y).sum())
            total += y.numel()
            err += float(((x - y) ** 2).sum())
            ref += float(((y - z) ** 2).sum())
    return {"fraction_differing": differ / total, "rel_err_of_merged_delta": (err / ref) ** 0.5 if ref else 0.0}


def mergekit_command():
    exe = shutil.which("mergekit-yaml")
    if exe:
        return [exe]
    try:
        import mergekit.scripts.run_yaml  # noqa: F401
    except Exception:
        return None
    return [sys.executable, "-c", "import sys; from mergekit.scripts.run_yaml import main; sys.exit(main())"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, default=8, help="decoder blocks kept of 32 (default 8)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    ap.add_argument("--workdir", default="/tmp/se_merge_bench")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--methods", nargs="+", default=["dare_ties", "ties"])
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--mergekit", choices=["run", "skip"], default="run")
    ap.add_argument("--mergekit-timeout", type=float, default=150, help="seconds per mergekit run (default 150)")
    ap.add_argument("--probe-bytes", type=float, default=4e9)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "merge_job.json"))
    args = ap.parse_args(argv)
    shape = SHAPES[args.shape]
    if os.path.exists(args.workdir):
        shutil.rmtree(args.workdir)
    os.makedirs(args.workdir)
    per_model = sum(_numel(s) for _, s in _tensor_shapes(shape, args.blocks)) * 2
    need = 7 * per_model + args.probe_bytes
    free = shutil.disk_usage(args.workdir).free
    if need > free:
        sys.exit(f"needs ~{need / GB:.1f} GB free in {args.workdir}, has {free / GB:.1f}; lower --blocks")
    print(f"[bench] {args.shape} shape, {args.blocks} blocks: {per_model / GB:.2f} GB per model", flush=True)

    dirs, gen_s, gen_bytes = write_models(os.path.join(args.workdir, "models"), shape, args.blocks, args.device)
    print(f"[bench] wrote 4 models ({gen_bytes / GB:.1f} GB) in {gen_s:.1f}s", flush=True)
    write_bps, read1_bps, read4_bps, cache_how = disk_speed(args.workdir, int(args.probe_bytes))
    read_bps = max(read1_bps, read4_bps)
    print(f"[bench] disk: write {write_bps / GB:.2f} GB/s, read {read1_bps / GB:.2f} GB/s (1 stream), "
          f"{read4_bps / GB:.2f} GB/s (4 streams); cache emptied by {cache_how}", flush=True)

    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    mk = mergekit_command() if args.mergekit == "run" else None
    results = []
    for method in args.methods:
        cfg = os.path.join(args.workdir, f"{method}.yml")
        write_config(cfg, method, dirs, args.density)
        row = {"method": method, "density": args.density}
        out = os.path.join(args.workdir, f"ours_{method}")
        cmd = [sys.executable, "-c", "import sys; from sparsity_engine.cli import main; sys.exit(main())", "merge",
               cfg, out, "--device", args.device, "--quiet"]
        for attempt in ("first", "timed"):  # the first process also compiles kernels (Triton cache, extension)
            shutil.rmtree(out, ignore_errors=True)
            drop_caches(dirs)
            wall, rss, rc, tail = timed_child(cmd, env=env)
            if rc != 0:
                print(tail)
                sys.exit(f"our merge failed (exit {rc})")
            if attempt == "first":
                row["ours_first_run_s"] = wall
        with open(os.path.join(out, "merge_report.json")) as f:
            report = json.load(f)
        b_in, b_out = report["bytes"]["read"], report["bytes"]["written"]
        disk_s = b_in / read_bps + b_out / write_bps
        row.update(ours_s=wall, ours_peak_rss_gb=rss / GB, ours_peak_rss_gb_self_reported=
                   report["peak_host_rss_bytes"] / GB, bytes_in=b_in, bytes_out=b_out, disk_bound_s=disk_s,
                   ours_over_disk=wall / disk_s, ours_phases=report["timings"], ours_s_per_gb_in=wall / (b_in / GB))
        print(f"[bench] ours {method}: {wall:.1f}s (first process {row['ours_first_run_s']:.1f}s), peak RSS "
              f"{rss / GB:.2f} GB, disk-bound {disk_s:.1f}s ({wall / disk_s:.2f}x); phases "
              f"{json.dumps({k: round(v, 2) for k, v in report['timings'].items()})}", flush=True)
        if mk is not None:
            mk_out = os.path.join(args.workdir, f"mergekit_{method}")
            drop_caches(dirs)
            wall_mk, rss_mk, rc, tail = timed_child(mk + [cfg, mk_out, "--cuda"], timeout=args.mergekit_timeout)
            where = "cuda"
            if rc not in (0, None):
                print(f"[bench] mergekit-yaml --cuda failed (exit {rc}); on the CPU instead:\n{tail[-800:]}",
                      flush=True)
                shutil.rmtree(mk_out, ignore_errors=True)
                drop_caches(dirs)
                wall_mk, rss_mk, rc, tail = timed_child(mk + [cfg, mk_out], timeout=args.mergekit_timeout)
                where = "cpu"
            finished = rc == 0
            row.update(mergekit_device=where, mergekit_s=wall_mk if finished else None,
                       mergekit_timed_out_after_s=None if finished else wall_mk, mergekit_peak_rss_gb=rss_mk / GB,
                       speedup=wall_mk / wall if finished else f">= {wall_mk / wall:.1f} (mergekit did not finish)")
            if finished and method == "ties":
                row["vs_mergekit"] = compare(out, mk_out, dirs[0])
            print(f"[bench] mergekit-yaml ({where}) {method}: "
                  f"{f'{wall_mk:.1f}s' if finished else f'not done after {wall_mk:.0f}s'}, "
                  f"peak RSS {rss_mk / GB:.2f} GB", flush=True)
            shutil.rmtree(mk_out, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        results.append(row)

    full = sum(_numel(s) for _, s in _tensor_shapes(shape, shape["layers"])) * 2
    summary = {
        "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
        "shape": args.shape, "blocks": args.blocks, "bytes_per_model": per_model, "write_inputs_s": gen_s,
        "disk": {"write_Bps": write_bps, "read_1_stream_Bps": read1_bps, "read_4_streams_Bps": read4_bps,
                 "cache_emptied_by": cache_how},
        "mergekit": "not run" if mk is None else "mergekit-yaml",
        "results": results,
        "extrapolated_to_full_depth": [_extrapolate(r, full, per_model, read_bps, write_bps) for r in results],
        "note": "extrapolated: the fixed part of our wall time (process start, plan, finalize: wall - stream_s) "
                "plus stream_s x (32-block bytes / measured bytes); mergekit's whole wall time scaled by bytes",
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(summary, f, indent=1)
    print("\n| method | ours s | disk-bound s | ours/disk (<=1.5) | mergekit s | speedup (>=5) | peak RSS GB (<=4) |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        mk_s = f"{r['mergekit_s']:.1f} ({r['mergekit_device']})" if r.get("mergekit_s") else "-"
        sp = f"{r['speedup']:.1f}x" if isinstance(r.get("speedup"), float) else str(r.get("speedup", "-"))
        print(f"| {r['method']} | {r['ours_s']:.1f} | {r['disk_bound_s']:.1f} | {r['ours_over_disk']:.2f} | {mk_s} | "
              f"{sp} | {r['ours_peak_rss_gb']:.2f} |")
    for e in summary["extrapolated_to_full_depth"]:
        print(f"extrapolated to 32 blocks, {e['method']}: ours {e['ours_s']:.0f}s, disk-bound {e['disk_bound_s']:.0f}s "
              f"({e['ours_over_disk']:.2f}x)" + (f", mergekit {e['mergekit_s']:.0f}s ({e['speedup']:.1f}x)"
                                                  if e["mergekit_s"] else ""))
    print(f"\nwrote {args.out}")
    shutil.rmtree(args.workdir, ignore_errors=True)


def _extrapolate(r, full, per_model, read_bps, write_bps):
    scale = full / per_model
    fixed = r["ours_s"] - r["ours_phases"]["stream_s"]
    ours = fixed + r["ours_phases"]["stream_s"] * scale
    disk = 4 * full / read_bps + full / write_bps
    mk = r["mergekit_s"] * scale if r.get("mergekit_s") else None
    return {"method": r["method"], "bytes_per_model": full, "ours_s": ours, "disk_bound_s": disk,
            "ours_over_disk": ours / disk, "mergekit_s": mk, "speedup": mk / ours if mk else None}


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


if __name__ == "__main__":
    main()
