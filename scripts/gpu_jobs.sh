#!/usr/bin/env bash
# One call on a lent H100 for the pruning jobs (issue 17): build the CUDA extension (so no timed run compiles it),
# run the GPU tests of the job code, then benchmarks/bench_prune_job.py with the given arguments.
#
# Usage (repo root, on the GPU machine; each line fits one call of <= 9 minutes):
#   bash scripts/gpu_jobs.sh --sizes 7b --ref --eval          # 7B disk to disk, eval, reference over 4 blocks
#   SE_TESTS= bash scripts/gpu_jobs.sh --sizes 13b,70b        # 13B disk to disk, 70B-shaped over 4 blocks
# Environment: SE_TESTS (pytest args; default the cuda-marked job tests; empty: none), SE_BENCH_WORK (where
# models are written, default /tmp/se_prune_job: needs ~30 GB for 13b), SE_BENCH_TIMEOUT (default 480 s).
# Logs and JSON go to $OUT/r and are packed into $OUT/results.tgz after every step.
set -uo pipefail
OUT=${OUT:-$PWD/out}
R=$OUT/r
mkdir -p "$R"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD SE_BENCH_OUT=$R
pack() { tar -czf "$OUT/results.tgz" -C "$OUT" r; }
step() { echo "== $1 at $(( $(date +%s) - T0 )) s"; }
T0=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$R/gpu.txt" 2>&1
df -h "${SE_BENCH_WORK:-/tmp}" >> "$R/gpu.txt" 2>&1
free -g >> "$R/gpu.txt" 2>&1
cat "$R/gpu.txt"
step extension
timeout 300 python3 -c "from sparsity_engine import _ext; m = _ext.load_extension(); print('extension', m.__file__)" \
  > "$R/ext.log" 2>&1
tail -2 "$R/ext.log"
pack
TESTS=${SE_TESTS-"tests/test_streaming.py tests/test_pipeline.py tests/test_eval.py -m cuda"}
if [ -n "$TESTS" ]; then
  step tests
  # shellcheck disable=SC2086
  timeout 150 python3 -m pytest -q -p no:cacheprovider -rfE $TESTS > "$R/tests_jobs.log" 2>&1
  echo "pytest exit $?"
  grep -E "^(FAILED|ERROR)|passed|failed" "$R/tests_jobs.log" | tail -20
  pack
fi
[ $# -eq 0 ] && set -- --sizes 7b --ref --eval
step "bench_prune_job $*"
timeout "${SE_BENCH_TIMEOUT:-480}" python3 benchmarks/bench_prune_job.py "$@" > "$R/bench_prune_job.log" 2>&1
echo "bench exit $?"
tail -25 "$R/bench_prune_job.log"
pack
step done
