#!/usr/bin/env bash
# The bitmap family on a lent GPU, in one call: build the extension just in time, run the GPU tests of the bitmap
# files, the per-layer benchmark (with the format rule's sparsities), the decode benchmark, then the bulk-copy
# kernel variants (new: correctness and timing in their own time-limited step). Logs and JSON under $OUT/r, all
# packed into $OUT/bitmap_results.tgz after every step; a short summary is printed last.
#
#   bash scripts/gpu_bitmap.sh          # ~3.5 min on an H100 / H200 (build ~20 s, tests ~30 s, layers ~70 s,
#                                       # decode ~45 s, bulk variants <= 45 s)
# Environment: BITMAP_TESTS (pytest args; "none" skips), BITMAP_BENCH (bench_bitmap.py args, default --rule;
# "none" skips), BITMAP_DECODE (bench_decode.py args, default --formats auto,bitmap; "none" skips), BITMAP_BULK (0
# skips the bulk-variant step), BITMAP_LIMITS ("tests layers decode bulk" seconds, default "60 90 70 45"),
# BITMAP_PROFILE ("SPARSITY VARIANT": one kernel under Nsight Compute into r/ncu.txt; unset: none).
set -uo pipefail
OUT=${OUT:-$PWD/out}
R=$OUT/r
mkdir -p "$R"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD SE_BENCH_OUT=$R
T0=$(date +%s)
step() { echo "== $1 at $(( $(date +%s) - T0 )) s"; }
pack() { tar -czf "$OUT/bitmap_results.tgz" -C "$OUT" r; }
read -r LIM_TESTS LIM_LAYERS LIM_DECODE LIM_BULK <<< "${BITMAP_LIMITS:-60 90 70 45}"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>&1 | tee "$R/gpu.txt"
step extension
timeout 200 python3 -c "from sparsity_engine import _ext; m = _ext.load_extension(); print('extension', _ext.extension_info(), 'families', m.families())" > "$R/ext.log" 2>&1
tail -2 "$R/ext.log"
TESTS=${BITMAP_TESTS:-"-m cuda tests/test_bitmap.py tests/test_sparse_linear.py tests/test_nn.py"}
if [ "$TESTS" != "none" ]; then
  step tests
  # shellcheck disable=SC2086
  timeout "$LIM_TESTS" python3 -m pytest -q -p no:cacheprovider -rfE $TESTS > "$R/tests.log" 2>&1
  echo "pytest exit $?"
  grep -E "^(FAILED|ERROR)|passed|failed" "$R/tests.log" | tail -15
  pack
fi
BENCH=${BITMAP_BENCH:-"--rule"}
if [ "$BENCH" != "none" ]; then
  step "bench_bitmap $BENCH"
  # shellcheck disable=SC2086
  timeout "$LIM_LAYERS" python3 benchmarks/bench_bitmap.py $BENCH > "$R/bench_bitmap.log" 2>&1
  echo "bench_bitmap exit $?"
  pack
fi
DEC=${BITMAP_DECODE:-"--formats auto,bitmap"}
if [ "$DEC" != "none" ]; then
  step "bench_decode $DEC"
  # shellcheck disable=SC2086
  timeout "$LIM_DECODE" python3 benchmarks/bench_decode.py $DEC > "$R/bench_decode.log" 2>&1
  echo "bench_decode exit $?"
  pack
fi
if [ "${BITMAP_BULK:-1}" != "0" ]; then  # variants 1 and 2 (cp.async.bulk + mbarrier): never run on a GPU before
  step "bulk-copy variants"
  SE_BITMAP_BULK=1 timeout "$LIM_BULK" bash -c "python3 -m pytest -q -p no:cacheprovider -x -m cuda tests/test_bitmap.py \
    -k 'matches_reference and 257' && python3 benchmarks/bench_bitmap.py --name bitmap_variants --no-csr \
    --shapes 4096x11008,11008x4096,28672x8192 --batches 1,8,16" > "$R/bulk.log" 2>&1
  echo "bulk variants exit $?"
  pack
fi
if [ -n "${BITMAP_PROFILE:-}" ]; then
  step "ncu $BITMAP_PROFILE"
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  # shellcheck disable=SC2086
  timeout "${BITMAP_NCU_LIMIT:-60}" "$NCU" --kernel-name regex:bitmap_linear --launch-skip 3 --launch-count 1 \
    --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy \
    python3 scripts/profile_bitmap.py $BITMAP_PROFILE > "$R/ncu.txt" 2>&1
  echo "ncu exit $?"
  pack
fi
step done
[ "$BENCH" != "none" ] && grep -E "^(  batch|  weight|host overhead)" "$R/bench_bitmap.log"
[ "$BENCH" != "none" ] && [ -f "$R/bitmap_linear.json" ] && python3 scripts/bitmap_summary.py "$R/bitmap_linear.json"
[ "$DEC" != "none" ] && grep -E "^\| (dense|auto|csr|bitmap)" "$R/bench_decode.log" | cut -c1-170
[ "${BITMAP_BULK:-1}" != "0" ] && grep -E "passed|failed|Error" "$R/bulk.log" | tail -3
[ "${BITMAP_BULK:-1}" != "0" ] && [ -f "$R/bitmap_variants.json" ] && python3 scripts/bitmap_summary.py "$R/bitmap_variants.json" | cut -c1-80
[ -n "${BITMAP_PROFILE:-}" ] && grep -E "Issue Slots Busy|Warp Cycles Per Issued|Achieved Occupancy|Memory Throughput|Duration" "$R/ncu.txt" | head -12
exit 0
