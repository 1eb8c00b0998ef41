#!/usr/bin/env bash
# One call on a lent GPU: build the extension just in time, run the GPU tests, run the benchmarks.
# Usage (repo root, on the GPU machine): bash scripts/device_check.sh [bench families...]
# Writes logs and JSON under $OUT (or ./out).
set -uo pipefail
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD SE_BENCH_OUT=$OUT
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
t0=$(date +%s)
python3 -c "from sparsity_engine import _ext; m = _ext.load_extension(); print('extension', m.__file__)" 2>&1 | tee "$OUT/ext.log"
echo "extension ready after $(( $(date +%s) - t0 )) s" | tee -a "$OUT/ext.log"
python3 -m pytest -q --maxfail=60 -p no:cacheprovider tests 2>&1 | tee "$OUT/tests.log" | tail -25
if [ "$#" -gt 0 ]; then
  python3 benchmarks/run_all.py --only "$@" 2>&1 | tee "$OUT/bench.log" | grep -v '^\s*$' | tail -150
fi
