#!/usr/bin/env bash
# One call on a lent H100 for the pruning jobs (issue 17), through scripts/device_check.sh: build the CUDA extension
# (so no timed run compiles it), run the GPU tests of the job code, then benchmarks/bench_prune_job.py with the
# given arguments. Logs and JSON in $OUT/r, packed into $OUT/results.tgz after every step.
#
# Usage (repo root, on the GPU machine; each line fits one call of <= 9 minutes):
#   bash scripts/gpu_jobs.sh --sizes 7b --ref --eval          # 7B disk to disk, eval, reference over 4 blocks
#   SE_TESTS= bash scripts/gpu_jobs.sh --sizes 13b,70b        # 13B disk to disk, 70B-shaped over 4 blocks
# Environment: SE_TESTS (pytest args; default the cuda-marked job tests; empty: none), SE_BENCH_WORK (where the
# models are written, default /tmp/se_prune_job: ~30 GB free for 13b), SE_BENCH_TIMEOUT (default 480 s).
[ $# -eq 0 ] && set -- --sizes 7b --ref --eval
export SE_TESTS=${SE_TESTS-"tests/test_streaming.py tests/test_pipeline.py tests/test_eval.py -m cuda"}
exec bash "$(dirname "$0")/device_check.sh" "prune_job:${SE_BENCH_TIMEOUT:-480}:$*"
