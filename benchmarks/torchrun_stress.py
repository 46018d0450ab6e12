"""Runs the two-process torchrun digits run of tests/test_distributed.py again and again while other
processes keep every core busy, and counts the runs that failed (a rank killed by SIGABRT at exit,
"terminate called without an active exception", was one run in three before the fix).

    python benchmarks/torchrun_stress.py --runs 30 --burners 2 [--epochs 30] [--out DIR]

Prints one line per run (exit code, seconds, whether a rank aborted) and a summary; exit code 1
when any run failed.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time


def burn() -> None:   # pragma: no cover (runs in a child process until terminated)
    x = 0
    while True:
        x = (x * 1103515245 + 12345) % 2**31


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--burners", type=int, default=2, help="busy-looping processes alongside (default 2)")
    p.add_argument("--epochs", type=int, default=30, help="epochs per phase of the digits run (default 30)")
    p.add_argument("--out", default=None, help="directory for the runs (default: a temporary one)")
    a = p.parse_args(argv)
    root = a.out or tempfile.mkdtemp(prefix="torchrun-stress-")
    burners = [mp.Process(target=burn, daemon=True) for _ in range(a.burners)]
    for b in burners:
        b.start()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    failed = 0
    try:
        for i in range(a.runs):
            out = os.path.join(root, f"run{i}")
            shutil.rmtree(out, ignore_errors=True)
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                   "-m", "cilearn", "run", "--increment", "2", "--epochs", str(a.epochs), "--no-progress",
                   "--quiet", "--out", out]
            t0 = time.time()
            res = subprocess.run(cmd, env=env, capture_output=True, text=True)
            aborted = "terminate called" in res.stderr or "SIGABRT" in res.stderr
            ok = res.returncode == 0 and not aborted and os.path.exists(os.path.join(out, "metrics.json"))
            failed += not ok
            print(f"run {i + 1:>3}/{a.runs}: exit {res.returncode}, {time.time() - t0:5.1f} s"
                  + (", a rank aborted (SIGABRT)" if aborted else "") + ("" if ok else "  FAILED"), flush=True)
            if not ok:
                print(res.stderr[-2000:], flush=True)
    finally:
        for b in burners:
            b.terminate()
        if a.out is None:
            shutil.rmtree(root, ignore_errors=True)
    print(f"{a.runs - failed} of {a.runs} runs passed, {failed} failed "
          f"({a.burners} busy processes alongside, {os.cpu_count()} CPUs)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
