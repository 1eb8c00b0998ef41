#!/usr/bin/env bash
# One call on a lent GPU that runs the steps named on the command line, in order, each under its own time limit
# and all under one deadline (SE_DEADLINE seconds, default 520): a step that would start with less than 20 s left
# is skipped and says so. Logs and JSON go to $OUT/r, packed into $OUT/results.tgz after every step, so a call cut
# short still brings back what finished. The family scripts (gpu_core.sh, gpu_jobs.sh, gpu_merge.sh,
# gpu_bitmap.sh) run the same commands one family at a time; this one lets the lead fit several into one call.
#
#   bash scripts/gpu_session.sh ext tests jobs7b bitmap        # call 1
#   bash scripts/gpu_session.sh ext merge benches jobs70b      # call 2
#
# Steps: ext (build the extension just in time), tests (the core files in full on the GPU, then every `-m cuda`
# test of the other files), jobs7b (bench_prune_job --sizes 7b --ref --eval), jobs70b (--sizes 70b), jobs13b,
# bitmap (per-layer bench with the format rule, then the decode bench), merge (bench_merge_job --blocks
# $SE_BLOCKS, mergekit from carried .whl wheels), benches (the kernel benchmarks of gpu_core.sh).
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
      run_step "tests core files" 170 "$R/tests_core.log" python3 -m pytest -q -p no:cacheprovider $XDIST -rfE $CORE_FILES
      show "$R/tests_core.log" "^(FAILED|ERROR)|passed|failed"
      ign=""; for f in $CORE_FILES; do ign="$ign --ignore=$f"; done
      # shellcheck disable=SC2086
      run_step "tests -m cuda" 200 "$R/tests_cuda.log" python3 -m pytest -q -p no:cacheprovider $XDIST -rfE -m cuda tests/ $ign
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
    *) echo "unknown step $s" ;;
  esac
done
echo "== done at $(elapsed) s"
pack
