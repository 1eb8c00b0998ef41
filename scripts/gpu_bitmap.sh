#!/usr/bin/env bash
# The bitmap family on a lent GPU, in one call: build the extension just in time, run the GPU tests of the bitmap
# files, the per-layer benchmark and the decode benchmark. Logs and JSON under $OUT; a short table is printed last.
#
#   bash scripts/gpu_bitmap.sh                      # ~3.5 min on an H100 (build ~40 s, tests ~60 s, layers ~60 s,
#                                                   # decode ~60 s)
# Environment: BITMAP_TESTS (pytest args, default the three test files' cuda tests; "none" skips),
# BITMAP_BENCH (bench_bitmap.py args; "none" skips), BITMAP_DECODE (bench_decode.py args; "none" skips),
# BITMAP_LIMITS ("tests layers decode" seconds, default "100 80 90"), BITMAP_PROFILE ("SPARSITY VARIANT": one
# kernel under Nsight Compute into $OUT/ncu.txt; unset: no profile).
set -uo pipefail
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD SE_BENCH_OUT=$OUT
T0=$(date +%s)
step() { echo "== $1 at $(( $(date +%s) - T0 )) s"; }
read -r LIM_TESTS LIM_LAYERS LIM_DECODE <<< "${BITMAP_LIMITS:-100 80 90}"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>&1 | tee "$OUT/gpu.txt"
step extension
timeout 200 python3 -c "from sparsity_engine import _ext; m = _ext.load_extension(); print('extension', _ext.extension_info(), 'families', m.families())" > "$OUT/ext.log" 2>&1
tail -3 "$OUT/ext.log"
TESTS=${BITMAP_TESTS:-"-m cuda tests/test_bitmap.py tests/test_sparse_linear.py tests/test_nn.py"}
if [ "$TESTS" != "none" ]; then
  step tests
  # shellcheck disable=SC2086
  timeout "$LIM_TESTS" python3 -m pytest -q -p no:cacheprovider -rfE $TESTS > "$OUT/tests.log" 2>&1
  echo "pytest exit $?"
  grep -E "^(FAILED|ERROR)|passed|failed|Error" "$OUT/tests.log" | tail -25
fi
BENCH=${BITMAP_BENCH:-""}
if [ "$BENCH" != "none" ]; then
  step "bench_bitmap $BENCH"
  # shellcheck disable=SC2086
  timeout "$LIM_LAYERS" python3 benchmarks/bench_bitmap.py $BENCH > "$OUT/bench_bitmap.log" 2>&1
  echo "bench_bitmap exit $?"
fi
DEC=${BITMAP_DECODE:-""}
if [ "$DEC" != "none" ]; then
  step "bench_decode $DEC"
  # shellcheck disable=SC2086
  timeout "$LIM_DECODE" python3 benchmarks/bench_decode.py $DEC > "$OUT/bench_decode.log" 2>&1
  echo "bench_decode exit $?"
fi
if [ -n "${BITMAP_PROFILE:-}" ]; then  # "SPARSITY VARIANT": stall reasons of one kernel under Nsight Compute
  step "ncu $BITMAP_PROFILE"
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  # shellcheck disable=SC2086
  timeout "${BITMAP_NCU_LIMIT:-60}" "$NCU" --kernel-name regex:bitmap_linear --launch-skip 3 --launch-count 1 --section SpeedOfLight \
    --section WarpStateStats --section SchedulerStats --section Occupancy --section MemoryWorkloadAnalysis \
    python3 scripts/profile_bitmap.py $BITMAP_PROFILE > "$OUT/ncu.txt" 2>&1
  echo "ncu exit $?"
fi
step done
[ -n "${BITMAP_PROFILE:-}" ] && grep -E "Issue Slots Busy|Warp Cycles Per Issued|Stall|Achieved Occupancy|Memory Throughput|Compute \(SM\)|Duration|Registers" "$OUT/ncu.txt" | head -30
[ "$BENCH" != "none" ] && grep -E "^(Targets|  batch|  weight|host overhead)" "$OUT/bench_bitmap.log"
[ "$BENCH" != "none" ] && [ -f "$OUT/bitmap_linear.json" ] && python3 scripts/bitmap_summary.py "$OUT/bitmap_linear.json"
[ "$DEC" != "none" ] && grep -E "^\| (dense|auto|csr|bitmap)" "$OUT/bench_decode.log" | cut -c1-200
exit 0
