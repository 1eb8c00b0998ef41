#!/usr/bin/env bash
# The merge job on one GPU machine (issue 19): GPU tests of the merge job, then benchmarks/bench_merge_job.py
# (7B-shaped bf16 base + 3 fine-tunes on disk, disk speed, ours vs mergekit-yaml --cuda, dare_ties and ties).
#
# Before the call, here in the repo root (mergekit's missing wheels, ~3 MB; see bench_merge_job.py's docstring):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64 -d .whl mergekit==0.1.5 pydantic==2.14.4 \
#     pydantic-core==2.50.5 annotated-types==0.7.0 typing-inspection==0.4.5 typing-extensions==4.16.0 immutables==0.21
# The call: run(command="bash scripts/gpu_merge.sh", carry=[".whl"], timeout_s=540)
# Environment: SE_BLOCKS (decoder blocks kept, default 8), SE_MERGE_LIMIT (seconds for the benchmark, default 420),
# SE_MERGE_TESTS (pytest args, default the merge job's cuda tests; "" for none).
# Comes back in $OUT: gpu.txt, tests.log, bench_merge_job.log, merge_job.json (the table and the JSON for
# BENCHMARKS.md). Expected: ~30 s start and tests, then the benchmark (its docstring: ~5-8 minutes at 8 blocks).
set -uo pipefail
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
T0=$(date +%s)
step() { echo "== $1 at $(( $(date +%s) - T0 )) s"; }
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || echo "could not install the carried wheels: mergekit will not run"
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"; df -h /tmp | tail -1; free -g | head -2
step "extension + mergekit import"
timeout 300 python3 -c "from sparsity_engine import _ext; m = _ext.load_extension(); print('extension', m.__file__)" 2>&1 | tail -2
python3 -c "import mergekit.scripts.run_yaml, mergekit; print('mergekit importable')" 2>&1 | tail -1
TESTS=${SE_MERGE_TESTS-tests/test_merge_job.py -m cuda}
if [ -n "$TESTS" ]; then
  step tests
  # shellcheck disable=SC2086
  timeout 120 python3 -m pytest -q -p no:cacheprovider -rfE $TESTS > "$OUT/tests.log" 2>&1
  echo "pytest exit $?"; grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.log" | tail -20
fi
step "bench_merge_job --blocks ${SE_BLOCKS:-8}"
timeout "${SE_MERGE_LIMIT:-420}" python3 benchmarks/bench_merge_job.py --blocks "${SE_BLOCKS:-8}" \
  --out "$OUT/merge_job.json" > "$OUT/bench_merge_job.log" 2>&1
echo "bench exit $?"
grep -v -E '^\s*$' "$OUT/bench_merge_job.log" | tail -30
rm -rf /tmp/se_merge_bench
step done
