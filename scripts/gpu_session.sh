#!/usr/bin/env bash
# One call on a lent GPU that runs the steps named on the command line, in order, each under its own time limit
# and all under one deadline (SE_DEADLINE seconds, default 520): a step that would start with less than 20 s left
# is skipped and says so. Logs and JSON go to $OUT/r, packed into $OUT/results.tgz after every step, so a call cut
# short still brings back what finished. It is the one script for the lent machines: steps fit together into
# calls of <= 10 minutes (BENCHMARKS.md says which steps produced which tables).
#
#   bash scripts/gpu_session.sh ext tests jobs7b               # ~8 min on an H100
#   bash scripts/gpu_session.sh merge bitmap benches           # ~8.5 min (merge needs the wheels below in .whl)
#   bash scripts/gpu_session.sh jobs70b                        # ~1.7 min;  jobs13b ~2.8 min
#
# Steps: ext (build the extension just in time; later steps would build it too), tests (the op-family files
# in full on the GPU, then every `-m cuda` test of the other files), jobs7b (bench_prune_job --sizes 7b --ref
# --eval), jobs13b, jobs70b (--sizes 13b / 70b), bitmap (per-layer bench with the format rule, then the decode
# bench), bitmap-bulk (the bitmap kernel's bulk-copy variants 1 and 2: tests and timings, never run on a GPU
# yet), bitmap2 (~4 min after ext: the bitmap kernel's variants 0, 3 and 4 (CUDA cores, work per nonzero) tested
# against the reference, then timed against cuBLAS and CSR at the 7B/70B shapes, 50/70/90%, 1-16 tokens, and the
# host time of eager layer calls; a table of us and ratios per variant), ncu-bitmap (one bitmap kernel under Nsight Compute: SE_NCU="SPARSITY VARIANT"), merge
# (bench_merge_job --blocks $SE_BLOCKS, default 8; mergekit-yaml from wheels carried in .whl: here, before the
# call, `echo /.whl/ >> .git/info/exclude` and `python3 -m pip download --no-deps --only-binary=:all:
# --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
# --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64 -d .whl
# mergekit==0.1.5 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.7.0 typing-inspection==0.4.5
# typing-extensions==4.16.0 immutables==0.21`, then run(..., carry=[".whl"])), benches (the kernel benchmarks
# at the sizes BENCHMARKS.md compares: merge, masks, SparseGPT, Hessian, CSR), regress (issue 21's kernel table
# at 11008x4096: the GPU tests of the merge, masks and obs files, host waits and launches per merge call,
# per-tensor merge and breakdown rows, the masks rows, SparseGPT 50% / 2:4; the whole-model merge rows do not fit
# it: bench_merge.py --skip-tensors --shapes 11008x4096 alone).
set -uo pipefail
OUT=${OUT:-$PWD/out}
R=$OUT/r
mkdir -p "$R"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD SE_BENCH_OUT=$R
T0=$(date +%s)
DEADLINE=${SE_DEADLINE:-520}
pack() { tar -czf "$OUT/results.tgz" -C "$OUT" r; }
elapsed() { echo $(( $(date +%s) - T0 )); }
run_step() {  # run_step NAME SECONDS LOG COMMAND...
  local name=$1 want=$2 log=$3 left
  shift 3
  left=$(( DEADLINE - $(elapsed) ))
  if (( left < 20 )); then echo "== $name skipped: deadline ${DEADLINE} s reached" | tee "$log"; return; fi
  (( want > left )) && want=$left
  echo "== $name (limit $want s) at $(elapsed) s"
  timeout "$want" "$@" > "$log" 2>&1
  echo "== $name exit $? at $(elapsed) s"
  pack
}
show() { grep -E "$2" "$1" | tail -"${3:-25}"; }

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>&1 | tee "$R/gpu.txt"
df -h /tmp | tail -1
XDIST=""
python3 -c "import xdist" 2>/dev/null && XDIST="-n 8"
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PWD:/tmp/site || echo "could not install the carried wheels"
fi
CORE_FILES="tests/test_contract.py tests/test_overflow.py tests/test_masks.py tests/test_merge.py tests/test_dispatch.py"

for s in "$@"; do
  case $s in
    ext)
      run_step ext 240 "$R/ext.log" python3 -c \
        "from sparsity_engine import _ext; m = _ext.load_extension(); print('extension', _ext.extension_info(), m.families())"
      tail -2 "$R/ext.log" ;;
    tests)
      # shellcheck disable=SC2086
      run_step "tests core files" 240 "$R/tests_core.log" python3 -m pytest -q -p no:cacheprovider $XDIST -rfE $CORE_FILES
      show "$R/tests_core.log" "^(FAILED|ERROR)|passed|failed"
      ign=""; for f in $CORE_FILES; do ign="$ign --ignore=$f"; done
      # shellcheck disable=SC2086
      run_step "tests -m cuda" 150 "$R/tests_cuda.log" python3 -m pytest -q -p no:cacheprovider $XDIST -rfE -m cuda tests/ $ign
      show "$R/tests_cuda.log" "^(FAILED|ERROR)|passed|failed" ;;
    jobs7b|jobs13b|jobs70b)
      extra=""; [ "$s" = jobs7b ] && extra="--ref --eval"
      # shellcheck disable=SC2086
      run_step "$s" "${SE_JOBS_LIMIT:-330}" "$R/bench_$s.log" python3 benchmarks/bench_prune_job.py --sizes "${s#jobs}" $extra
      mv -f "$R/prune_job.json" "$R/prune_job_${s#jobs}.json" 2>/dev/null
      grep -v -E '^\s*$' "$R/bench_$s.log" | tail -22 ;;
    bitmap)
      run_step "bench_bitmap --rule" 100 "$R/bench_bitmap.log" python3 benchmarks/bench_bitmap.py --rule
      [ -f "$R/bitmap_linear.json" ] && python3 scripts/bitmap_summary.py "$R/bitmap_linear.json" | cut -c1-150
      run_step "bench_decode" 90 "$R/bench_decode.log" python3 benchmarks/bench_decode.py --formats auto,bitmap
      show "$R/bench_decode.log" "^\| (dense|auto|csr|bitmap)" 12 | cut -c1-170 ;;
    bitmap-bulk)
      run_step "bitmap bulk-copy variants" 60 "$R/bulk.log" env SE_BITMAP_VARIANTS=0,1,2 bash -c "python3 -m pytest -q \
        -p no:cacheprovider -x -m cuda tests/test_bitmap.py -k 'matches_reference and 257' && python3 \
        benchmarks/bench_bitmap.py --name bitmap_variants --no-csr --shapes 4096x11008,11008x4096,28672x8192 \
        --batches 1,8,16"
      show "$R/bulk.log" "passed|failed|Error" 3
      [ -f "$R/bitmap_variants.json" ] && python3 scripts/bitmap_summary.py "$R/bitmap_variants.json" | cut -c1-80 ;;
    bitmap2)
      # shellcheck disable=SC2086
      run_step "bitmap2 tests (variants 0, 3, 4)" 150 "$R/bitmap2_tests.log" env SE_BITMAP_VARIANTS=0,3,4 python3 -m \
        pytest -q -p no:cacheprovider $XDIST -rfE -m cuda tests/test_bitmap.py tests/test_sparse_linear.py
      show "$R/bitmap2_tests.log" "^(FAILED|ERROR)|passed|failed" 12
      run_step "bitmap2 bench" 150 "$R/bitmap2.log" env SE_BITMAP_VARIANTS=0,3,4 python3 benchmarks/bench_bitmap.py \
        --name bitmap2 --batches 1,2,4,8,16 --host
      [ -f "$R/bitmap2.json" ] && python3 scripts/bitmap_summary.py "$R/bitmap2.json" --variants | cut -c1-160 ;;
    ncu-bitmap)
      NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
      # shellcheck disable=SC2086
      run_step "ncu bitmap ${SE_NCU:-0.5 0}" 90 "$R/ncu.txt" "$NCU" --kernel-name regex:bitmap_linear --launch-skip 3 \
        --launch-count 1 --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy \
        python3 scripts/profile_bitmap.py ${SE_NCU:-0.5 0}
      show "$R/ncu.txt" "Issue Slots Busy|Warp Cycles Per Issued|Achieved Occupancy|Memory Throughput|Duration" 12 ;;
    merge)
      run_step "bench_merge_job --blocks ${SE_BLOCKS:-8}" "${SE_MERGE_LIMIT:-300}" "$R/bench_merge_job.log" \
        python3 benchmarks/bench_merge_job.py --blocks "${SE_BLOCKS:-8}" --out "$R/merge_job.json"
      grep -v -E '^\s*$' "$R/bench_merge_job.log" | tail -24
      rm -rf /tmp/se_merge_bench ;;
    benches)
      run_step "bench merge" 80 "$R/bench_merge.log" python3 benchmarks/bench_merge.py --shapes 11008x4096
      run_step "bench masks" 60 "$R/bench_masks.log" python3 benchmarks/bench_masks.py --shapes 11008x4096
      run_step "bench sparsegpt" 45 "$R/bench_sparsegpt.log" python3 benchmarks/bench_sparsegpt.py \
        --shapes 4096x4096,11008x4096 --no-breakdown
      run_step "bench hessian" 25 "$R/bench_hessian.log" python3 benchmarks/bench_hessian.py --cols 4096
      run_step "bench csr" 35 "$R/bench_csr.log" python3 benchmarks/bench_csr.py --shapes 4096x4096,28672x8192 \
        --batches 1,16 --sparsities 0.7,0.9 --dtypes bfloat16
      for b in merge masks sparsegpt hessian csr; do echo "-- $b"; grep -v -E '^\s*$' "$R/bench_$b.log" | tail -14 | cut -c1-180; done ;;
    regress)  # issue 21's kernel table rows (11008x4096), after the host-wait cuts: <= 200 s
      # shellcheck disable=SC2086
      run_step "regress tests" 65 "$R/regress_tests.log" python3 -m pytest -q -p no:cacheprovider $XDIST -rfE \
        -m cuda tests/test_merge.py tests/test_masks.py tests/test_obs.py tests/test_contract.py
      show "$R/regress_tests.log" "^(FAILED|ERROR)|passed|failed"
      run_step "regress merge calls" 15 "$R/regress_calls.log" python3 scripts/merge_calls.py --shape 11008x4096
      grep -v "^    " "$R/regress_calls.log" | tail -4 | cut -c1-220
      run_step "regress bench merge" 45 "$R/regress_merge.log" python3 benchmarks/bench_merge.py \
        --shapes 11008x4096 --skip-whole
      show "$R/regress_merge.log" "11008x4096" 14 | cut -c1-180
      run_step "regress bench masks" 40 "$R/regress_masks.log" python3 benchmarks/bench_masks.py --shapes 11008x4096
      show "$R/regress_masks.log" "(topk_mask|magnitude_prune|della) +\\|" 40 | cut -c1-150
      run_step "regress bench sparsegpt" 35 "$R/regress_sparsegpt.log" python3 benchmarks/bench_sparsegpt.py \
        --shapes 4096x4096,11008x4096 --no-breakdown
      show "$R/regress_sparsegpt.log" "(4096x4096|11008x4096)" 8 | cut -c1-180 ;;
    *) echo "unknown step $s" ;;
  esac
done
echo "== done at $(elapsed) s"
pack
