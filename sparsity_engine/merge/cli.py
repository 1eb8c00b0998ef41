"""``sparsity-engine merge CONFIG.yml OUT_DIR``: run a mergekit YAML configuration (see merge.config)."""
from __future__ import annotations

import sys

DESCRIPTION = """Merge the models of a mergekit YAML configuration into OUT_DIR, streaming tensors from disk to disk
(merged on the GPU when there is one). Methods: linear, task_arithmetic, ties, dare_ties, dare_linear,
breadcrumbs, breadcrumbs_ties, della, della_linear, slerp, nuslerp, model_stock, with mergekit 0.1.5's
parameters, per-model and global, filters and gradients. Deterministic methods give mergekit-yaml's results.

Our addition: under the top-level key 'sparsity_engine', 'sparsification: sparsegpt' prunes each fine-tune's
block-linear deltas with SparseGPT's error compensation on calibration text (to each model's density) before
the task-arithmetic merge; 'calibration:' sets file (.txt / .jsonl / token ids; default: the bundled English
corpus), nsamples (128), seqlen (2048), seed (0), hessian (per-model | shared), batch_size (8), blocksize (128),
percdamp (0.01). mergekit ignores that key. Example:

  merge_method: ties
  base_model: ./llama-base
  models:
    - model: ./llama-math
      parameters: {weight: 1.0, density: 0.3}
    - model: ./llama-code
      parameters: {weight: 0.7, density: 0.3}
  dtype: bfloat16
  sparsity_engine:
    sparsification: sparsegpt
    calibration: {file: calib.txt, nsamples: 64, seqlen: 1024}

Refused before any work, with a message naming it: other methods, several slices or partial layer ranges,
modules, tokenizer / chat_template settings, tokenizer_source other than base, LoRA or hub references,
unknown keys or parameters.

OUT_DIR gets the safetensors shards, config.json, the donor's tokenizer files, mergekit_config.yml and
merge_report.json (settings, versions, time per phase, bytes). Resumable with --resume."""


def add_parser(subparsers) -> None:
    """Register the ``merge`` subcommand on the CLI's subparsers."""
    from ..cli import _positive_int, _shard_size

    import argparse

    p = subparsers.add_parser("merge", help="merge models from a mergekit YAML configuration", description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", metavar="CONFIG.yml", help="mergekit configuration (YAML)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="output folder (new or empty, or one this command made)")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--cuda", action="store_const", const="cuda", dest="device",
                   help="same as --device cuda (mergekit-yaml's flag)")
    p.add_argument("--seed", "--random-seed", type=int, default=0,
                   help="seed of DARE / DELLA's random draws (one stream per tensor; default 0)")
    p.add_argument("--max-shard-size", "--out-shard-size", type=_shard_size, default=5 * 10**9,
                   help="output shard size (default 5GB)")
    p.add_argument("--backend", default=None, choices=["auto", "reference", "triton", "cuda"],
                   help="force one backend for the merge ops (default auto)")
    p.add_argument("--read-ahead", type=_positive_int, default=2, metavar="N",
                   help="tensors read ahead per input model (default 2)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    state = p.add_mutually_exclusive_group()
    state.add_argument("--resume", action="store_true", help="continue an interrupted merge in OUT_DIR (same settings)")
    state.add_argument("--overwrite", action="store_true",
                       help="start again in OUT_DIR, removing what an earlier merge there wrote (nothing else)")


def run(args) -> int:
    """Run the parsed ``merge`` command; returns the exit code (cli's table: 2 config, 3 folders, 130 ^C)."""
    from ..cli import EXIT_INPUT, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, _err
    from ..io import JobFolderError
    from .config import MergeConfigError
    from .engine import MergeInputError, run_merge

    try:
        report = run_merge(args.config, args.out_dir, device=args.device, backend=None if args.backend in
                           (None, "auto") else args.backend, seed=args.seed, max_shard_bytes=args.max_shard_size,
                           resume=args.resume, overwrite=args.overwrite, read_ahead=args.read_ahead,
                           progress=not args.quiet)
    except MergeConfigError as exc:
        _err(f"{args.config}: {exc}")
        return EXIT_USAGE
    except (MergeInputError, JobFolderError) as exc:
        _err(str(exc))
        return EXIT_INPUT
    except KeyboardInterrupt:
        _err("interrupted; continue with --resume")
        return EXIT_INTERRUPTED
    if report.get("already_finished"):
        print(f"{args.out_dir} already holds this finished merge; nothing to do")
        return EXIT_OK
    t, b = report["timings"], report["bytes"]
    print(f"merged {report['tensors_merged']} tensors ({report['method']}) in {t['total_s']:.1f}s: read "
          f"{b['read'] / 1e9:.2f} GB, wrote {b['written'] / 1e9:.2f} GB; wrote {args.out_dir}", file=sys.stdout)
    return EXIT_OK
