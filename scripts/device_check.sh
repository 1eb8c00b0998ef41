#!/usr/bin/env bash
# One call on a lent GPU: build the extension just in time, run GPU tests, run benchmarks, pack the results.
#
# Usage (repo root, on the GPU machine):
#   SE_TESTS="tests/test_obs.py tests/test_hessian.py" bash scripts/device_check.sh sparsegpt:150 hessian:60:--sweep
# Each benchmark spec is NAME[:TIMEOUT_S[:ARGS]] for benchmarks/bench_NAME.py. Environment: SE_TESTS (test
# files or pytest args; none: no tests), SE_TEST_JOBS (pytest-xdist workers, default 8), SE_TEST_TIMEOUT
# (seconds, default 200). Logs and JSON go to $OUT/r and are packed into $OUT/results.tgz after every step,
# so a call cut short still brings back what finished.
set -uo pipefail
OUT=${OUT:-$PWD/out}
R=$OUT/r
mkdir -p "$R"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD SE_BENCH_OUT=$R
pack() { tar -czf "$OUT/results.tgz" -C "$OUT" r; }
step() { echo "== $1 at $(( $(date +%s) - T0 )) s"; }
T0=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > "$R/gpu.txt" 2>&1
cat "$R/gpu.txt"
step extension
timeout 300 python3 -c "from sparsity_engine import _ext; m = _ext.load_extension(); print('extension', m.__file__, _ext.extension_info())" > "$R/ext.log" 2>&1
tail -3 "$R/ext.log"
pack
if [ -n "${SE_TESTS:-}" ]; then
  step tests
  # shellcheck disable=SC2086
  timeout "${SE_TEST_TIMEOUT:-200}" python3 -m pytest -q -p no:cacheprovider -n "${SE_TEST_JOBS:-8}" -rfE $SE_TESTS > "$R/tests.log" 2>&1
  echo "pytest exit $?"
  grep -E "^(FAILED|ERROR)|passed|failed" "$R/tests.log" | tail -30
  pack
fi
for spec in "$@"; do
  name=${spec%%:*}
  rest=${spec#"$name"}; rest=${rest#:}
  limit=${rest%%:*}; limit=${limit:-300}
  args=""
  [[ "$rest" == *:* ]] && args=${rest#*:}
  step "bench $name (limit $limit s) $args"
  # shellcheck disable=SC2086
  timeout "$limit" python3 "benchmarks/bench_$name.py" $args > "$R/bench_$name.log" 2>&1
  echo "bench $name exit $?"
  grep -v -E '^\s*$' "$R/bench_$name.log" | tail -${SE_TAIL:-30}
  pack
done
step done
