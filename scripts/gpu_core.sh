#!/usr/bin/env bash
# The core engineer's GPU check (issue 21 / 16), one call on an H100 within 8 minutes:
#   1. build the CUDA extension just in time (the whole csrc/, as a user's first call would);
#   2. GPU tests: the contract test (every op x backend against the reference, poisoned outputs), the overflow
#      tests, and the masks / merge / dispatch files in full (their Triton kernels compiled for the GPU: the new
#      selection, the merge's overflow flag), then every `-m cuda` test of the other files (the merge job's
#      included: its GPU merges run on these kernels);
#   3. the benchmarks that show the ratios (BENCHMARKS.md rows to compare with are in the report / README of
#      this script's output), at the sizes BENCHMARKS.md reports, cut to fit the time.
# Every step has a time limit and the whole run a deadline (SE_DEADLINE seconds, default 470): a step that would
# start past it is skipped and says so. Logs and JSON go to $OUT/r, packed into $OUT/results.tgz after every step.
#
#   OUT=/tmp/out bash scripts/gpu_core.sh
set -uo pipefail
OUT=${OUT:-$PWD/out}
R=$OUT/r
mkdir -p "$R"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD SE_BENCH_OUT=$R
T0=$(date +%s)
DEADLINE=${SE_DEADLINE:-470}
pack() { tar -czf "$OUT/results.tgz" -C "$OUT" r; }
elapsed() { echo $(( $(date +%s) - T0 )); }
# limit NAME SECONDS: the step's timeout, cut to what is left before the deadline (0: skip the step)
limit() {
  local left=$(( DEADLINE - $(elapsed) ))
  if (( left < 15 )); then echo 0; elif (( $2 < left )); then echo "$2"; else echo "$left"; fi
}
step() { echo "== $1 at $(elapsed) s"; }
run_step() {  # run_step NAME SECONDS LOG COMMAND...
  local name=$1 secs log=$3
  secs=$(limit "$name" "$2")
  shift 3
  if [ "$secs" = 0 ]; then echo "skipped: deadline ${DEADLINE} s reached" | tee "$log"; return; fi
  step "$name (limit $secs s)"
  timeout "$secs" "$@" > "$log" 2>&1
  echo "$name exit $? at $(elapsed) s"
  pack
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > "$R/gpu.txt" 2>&1
cat "$R/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee "$R/versions.txt"

run_step extension 180 "$R/ext.log" python3 -c \
  "from sparsity_engine import _ext; m = _ext.load_extension(); print('extension', m.__file__, _ext.extension_info(), m.families())"
tail -3 "$R/ext.log"

XDIST=""
python3 -c "import xdist" 2>/dev/null && XDIST="-n 8"
# shellcheck disable=SC2086
run_step "tests: contract, overflow, masks, merge, dispatch (all, on the GPU)" 150 "$R/tests_core.log" \
  python3 -m pytest -q -p no:cacheprovider $XDIST -rfE tests/test_contract.py tests/test_overflow.py \
  tests/test_masks.py tests/test_merge.py tests/test_dispatch.py
grep -E "^(FAILED|ERROR)|passed|failed|SE_TEST_SEED" "$R/tests_core.log" | tail -25
# shellcheck disable=SC2086
run_step "tests: -m cuda, every other file" 110 "$R/tests_cuda.log" \
  python3 -m pytest -q -p no:cacheprovider $XDIST -rfE -m cuda tests/ --ignore=tests/test_contract.py \
  --ignore=tests/test_overflow.py --ignore=tests/test_masks.py --ignore=tests/test_merge.py \
  --ignore=tests/test_dispatch.py
grep -E "^(FAILED|ERROR)|passed|failed|SE_TEST_SEED" "$R/tests_cuda.log" | tail -25

bench() {  # bench NAME SECONDS ARGS...
  local name=$1 secs=$2
  shift 2
  run_step "bench $name $*" "$secs" "$R/bench_$name.log" python3 "benchmarks/bench_$name.py" "$@"
  grep -v -E '^\s*$' "$R/bench_$name.log" | tail -"${SE_TAIL:-40}"
}
bench merge 80 --shapes 11008x4096
bench masks 60 --shapes 11008x4096
bench sparsegpt 45 --shapes 4096x4096,11008x4096 --no-breakdown
bench hessian 25 --cols 4096
bench csr 35 --shapes 4096x4096,28672x8192 --batches 1,16 --sparsities 0.7,0.9 --dtypes bfloat16
step done
pack
