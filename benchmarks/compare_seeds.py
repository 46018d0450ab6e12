"""Run several methods (or variants: a method plus flags) over several seeds with the same flags
and print a markdown table of mean +- std (sample std, n-1) of the summary metrics.

    python benchmarks/compare_seeds.py --methods lwf,lwm --seeds 1993,1,2 --out benchmarks/out/lwm \
        -- --dataset fashion-mnist --train-per-class 300 --increment 2 --epochs 10 --batch-size 64

An entry of ``--methods`` may carry flags of its own (``"lwf-mc,lwf-mc --distill attention"``).
Everything after ``--`` is passed to ``cilearn run`` (each run goes to OUT/<label>-s<seed>; a run
whose metrics.json exists is read, not run again). ``benchmarks/bsce_ablation.py`` uses
``run_and_print`` with flags per variant.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

from cilearn.cli import main as cli_main

KEYS = [("avg_incremental_acc", "avg inc. acc"), ("last_acc", "last acc"), ("forgetting", "forgetting"),
        ("old_last", "old acc (last phase)"), ("new_last", "new acc (last phase)"),
        ("old_among_old", "old among old (mean of phases > 0)"), ("train_s", "train s (all stages)"),
        ("finetune_s", "of which fine-tuning s"), ("wall_seconds", "wall s"), ("params_m", "params (M, last phase)")]


def fmt(vals: list[float]) -> str:
    if any(v != v for v in vals):          # nan: not recorded by that run
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.2f}"
    return f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f}"


def summary(m: dict) -> dict:
    """The table's metrics from a run's metrics.json."""
    later = [r.get("acc_old_among_old") for r in m["phases"][1:]]
    return {**{k: m[k] for k in ("avg_incremental_acc", "last_acc", "forgetting", "wall_seconds")},
            "old_last": m["phases"][-1]["acc_old"] or 0.0, "new_last": m["phases"][-1]["acc_new"],
            "old_among_old": sum(later) / len(later) if later and None not in later else float("nan"),
            "train_s": sum(r["train_seconds"] for r in m["phases"]),
            "finetune_s": sum(r.get("finetune_seconds", 0.0) for r in m["phases"]),
            "params_m": m["phases"][-1].get("params", float("nan")) / 1e6}   # nan: a run from before the count


def run_variants(variants: list[tuple[str, str, list[str]]], seeds: list[str], out: Path,
                 passthrough: list[str]) -> list[tuple[str, dict[str, list[float]]]] | int:
    """``variants``: (label, method, extra flags). Returns [(label, {key: per-seed values})], or
    the exit code of a failed run."""
    rows = []
    for label, method, flags in variants:
        per: dict[str, list[float]] = {k: [] for k, _ in KEYS}
        for seed in seeds:
            d = out / f"{re.sub(r'[^A-Za-z0-9.-]+', '_', label)}-s{seed}"
            if not (d / "metrics.json").exists():
                code = cli_main(["run", "--method", method, "--seed", seed, "--out", str(d), "--no-progress",
                                 "--quiet", "--overwrite", *passthrough, *flags])
                if code != 0:
                    return code
            s = summary(json.loads((d / "metrics.json").read_text()))
            for k, _ in KEYS:
                per[k].append(s[k])
            print(f"{label} seed {seed}: avg inc {s['avg_incremental_acc']:.2f}, last {s['last_acc']:.2f}, "
                  f"wall {s['wall_seconds']:.0f} s", flush=True)
        rows.append((label, per))
    return rows


def markdown(rows: list[tuple[str, dict[str, list[float]]]]) -> str:
    lines = ["| method | " + " | ".join(label for _, label in KEYS) + " |", "|---" * (len(KEYS) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(fmt(per[k]) for k, _ in KEYS) + " |" for name, per in rows]
    return "\n".join(lines)


def run_and_print(variants: list[tuple[str, str, list[str]]], seeds: list[str], out: Path,
                  passthrough: list[str]) -> int:
    """``run_variants``, then the markdown table on stdout; the exit code."""
    rows = run_variants(variants, seeds, out, passthrough)
    if isinstance(rows, int):
        return rows
    print("\n" + markdown(rows))
    return 0


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(own arguments, arguments after ``--`` for cilearn run)."""
    return (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])


def parse_variant(text: str) -> tuple[str, str, list[str]]:
    """``"lwf-mc --distill attention"`` -> (label = the text, method, its own flags)."""
    method, *flags = text.split()
    return text.strip(), method, flags


def main() -> int:
    own, passthrough = split_argv(sys.argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", required=True,
                   help='comma list; an entry may carry its own flags: "lwf-mc,lwf-mc --distill attention"')
    p.add_argument("--seeds", default="1993,1,2")
    p.add_argument("--out", required=True)
    args = p.parse_args(own)
    return run_and_print([parse_variant(m) for m in args.methods.split(",")], args.seeds.split(","),
                         Path(args.out), passthrough)


if __name__ == "__main__":
    sys.exit(main())
