"""Run every benchmark script (bench_*.py) in turn, each in its own process, and print their tables.

    python benchmarks/run_all.py            # realistic LLM sizes (GPU)
    python benchmarks/run_all.py --quick    # tiny sizes: a smoke test that runs on a CPU in seconds
    python benchmarks/run_all.py --only csr hessian

A failing script is reported and the others still run; the exit code is non-zero if any failed.
"""
from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke test)")
    parser.add_argument("--only", nargs="*", default=None, help="families to run, e.g. csr hessian")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per script")
    args = parser.parse_args(argv)

    scripts = sorted(glob.glob(os.path.join(HERE, "bench_*.py")))
    if args.only:
        scripts = [s for s in scripts if os.path.basename(s)[6:-3] in args.only]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.path.dirname(HERE), os.environ.get("PYTHONPATH")])))
    failed = []
    for script in scripts:
        name = os.path.basename(script)
        print(f"\n===== {name} =====", flush=True)
        t0 = time.perf_counter()
        cmd = [sys.executable, script] + (["--quick"] if args.quick else [])
        try:
            rc = subprocess.run(cmd, env=env, timeout=args.timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        print(f"----- {name}: {'ok' if rc == 0 else f'FAILED ({rc})'} in {time.perf_counter() - t0:.1f} s", flush=True)
        if rc != 0:
            failed.append(name)
    if failed:
        print(f"\nfailed: {', '.join(failed)}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
