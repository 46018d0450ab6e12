"""Run several methods over several seeds with the same flags and print a markdown table of
mean +- std (sample std, n-1) of the summary metrics.

    python benchmarks/compare_seeds.py --methods lwf,lwm --seeds 1993,1,2 --out benchmarks/out/lwm \
        -- --dataset fashion-mnist --train-per-class 300 --increment 2 --epochs 10 --batch-size 64

Everything after ``--`` is passed to ``cilearn run`` (each run goes to OUT/<method>-s<seed>).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from cilearn.cli import main as cli_main

KEYS = [("avg_incremental_acc", "avg inc. acc"), ("last_acc", "last acc"), ("forgetting", "forgetting"),
        ("old_last", "old acc (last phase)"), ("new_last", "new acc (last phase)"),
        ("old_among_old", "old among old (mean of phases > 0)"), ("wall_seconds", "wall s")]


def fmt(vals: list[float]) -> str:
    if len(vals) == 1:
        return f"{vals[0]:.2f}"
    return f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f}"


def main() -> int:
    argv = sys.argv[1:]
    passthrough = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", required=True)
    p.add_argument("--seeds", default="1993,1,2")
    p.add_argument("--out", required=True)
    args = p.parse_args(own)
    rows = []
    for method in args.methods.split(","):
        per = {k: [] for k, _ in KEYS}
        for seed in args.seeds.split(","):
            out = Path(args.out) / f"{method}-s{seed}"
            if not (out / "metrics.json").exists():
                code = cli_main(["run", "--method", method, "--seed", seed, "--out", str(out), "--no-progress",
                                 "--quiet", "--overwrite", *passthrough])
                if code != 0:
                    return code
            m = json.loads((out / "metrics.json").read_text())
            m["old_last"] = m["phases"][-1]["acc_old"] or 0.0
            m["new_last"] = m["phases"][-1]["acc_new"]
            later = [r.get("acc_old_among_old") for r in m["phases"][1:]]
            m["old_among_old"] = sum(later) / len(later) if later and None not in later else float("nan")
            for k, _ in KEYS:
                per[k].append(m[k])
            print(f"{method} seed {seed}: avg inc {m['avg_incremental_acc']:.2f}, last {m['last_acc']:.2f}, "
                  f"wall {m['wall_seconds']:.0f} s", flush=True)
        rows.append((method, per))
    print()
    print("| method | " + " | ".join(label for _, label in KEYS) + " |")
    print("|---" * (len(KEYS) + 1) + "|")
    for method, per in rows:
        print(f"| {method} | " + " | ".join(fmt(per[k]) for k, _ in KEYS) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
