"""How a run's CPU threads behave under load (issue 35, "CPU threads under load"): the wall time of
the default ``cilearn run`` (iCaRL on digits) alone, beside one busy process (a Python busy loop),
and as one of two runs started together, for thread settings and OpenMP wait policies.

    python benchmarks/threads_load.py --repeats 3 [--variants passive-auto,active-auto,passive-1] [run flags]

A variant is ``<wait policy>-<threads>``: ``passive`` / ``active`` is ``OMP_WAIT_POLICY`` (cilearn
sets passive unless the environment says otherwise), the threads ``auto`` or a number
(``--threads``). Each run is a fresh ``cilearn run`` process (``--precision fp32 --no-progress
--quiet``, own output directory); the wall time is the process's. Prints a markdown table of the
median over the repeats and each median's ratio to the variant's run alone. Run it on an otherwise
idle machine.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUSY = [sys.executable, "-c", "while True: pass"]


def command(out: Path, threads: str, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "cilearn", "run", "--threads", threads, "--precision", "fp32", "--no-progress",
            "--quiet", "--out", str(out), *extra]


def env_of(policy: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "CILEARN_THREADS")}
    env["OMP_WAIT_POLICY"] = policy.upper()
    return env


def timed(cmds: list[list[str]], env: dict[str, str]) -> list[float]:
    """Start every command at once; the wall time of each."""
    t0 = time.perf_counter()
    procs = [subprocess.Popen(c, env=env) for c in cmds]
    out = []
    for p in procs:
        if p.wait() != 0:
            raise SystemExit(f"a run failed: {' '.join(p.args)}")
        out.append(time.perf_counter() - t0)
    return out


def measure(policy: str, threads: str, repeats: int, extra: list[str], root: Path) -> dict[str, float]:
    env = env_of(policy)
    alone, busy, two = [], [], []
    for r in range(repeats):
        alone += timed([command(root / f"a{r}", threads, extra)], env)
        hog = subprocess.Popen(BUSY)
        try:
            time.sleep(1.0)                               # the busy loop is running
            busy += timed([command(root / f"b{r}", threads, extra)], env)
        finally:
            hog.kill()
            hog.wait()
        two += timed([command(root / f"c{r}", threads, extra), command(root / f"d{r}", threads, extra)], env)
    return {"alone": statistics.median(alone), "busy": statistics.median(busy), "two": statistics.median(two)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", default="active-auto,passive-auto,active-1,passive-1")
    a, extra = p.parse_known_args(argv)
    rows = ["| wait policy | threads | alone s | beside a busy process s (x alone) | two at once s (x alone) |",
            "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as d:
        for v in a.variants.split(","):
            policy, threads = v.split("-", 1)
            m = measure(policy, threads, a.repeats, extra, Path(d) / v)
            rows.append(f"| {policy} | {threads} | {m['alone']:.1f} | {m['busy']:.1f} ({m['busy'] / m['alone']:.2f}x) "
                        f"| {m['two']:.1f} ({m['two'] / m['alone']:.2f}x) |")
            print(rows[-1], flush=True)
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
