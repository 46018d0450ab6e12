"""Run several methods (or variants: a method plus flags) over several seeds with the same flags
and print a markdown table of mean +- std (sample std, n-1) of the summary metrics.

    python benchmarks/compare_seeds.py --methods lwf,lwm --seeds 1993,1,2 --out benchmarks/out/lwm \
        -- --dataset fashion-mnist --train-per-class 300 --increment 2 --epochs 10 --batch-size 64

An entry of ``--methods`` may carry flags of its own (``"lwf-mc,lwf-mc --distill attention"``).
Everything after ``--`` is passed to ``cilearn run`` (each run goes to OUT/<label>-s<seed>; a run
whose metrics.json exists is read, not run again). ``benchmarks/bsce_ablation.py`` uses
``run_and_print`` with flags per variant. The metrics and the mean ± std are ``cilearn.results``'s
(the same as ``cilearn run --seeds`` and ``cilearn compare``); this script adds the variants with
flags of their own and the reuse of finished runs.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from cilearn.cli import main as cli_main
from cilearn.results import METRIC, format_stat, mean_std, run_summary

KEYS = [(k, METRIC[k].label) for k in ("avg_incremental_acc", "last_acc", "forgetting", "old_last", "new_last",
                                       "old_among_old", "train_seconds", "finetune_seconds", "wall_seconds",
                                       "params_m")]


def fmt(vals: list[float]) -> str:
    """``mean ± sample std``; one value as it is; ``-`` when a run lacks it (nan)."""
    return format_stat(mean_std(vals))


def summary(m: dict) -> dict:
    """The metrics of a run's metrics.json (``cilearn.results.run_summary``), nan where not recorded."""
    return {k: float("nan") if v is None else v for k, v in run_summary(m).items()}


def run_dir(out: Path, label: str, seed: str) -> Path:
    """``OUT/<label>-s<seed>``: where a variant's run of one seed goes (the label's characters
    outside ``[A-Za-z0-9.-]`` as ``_``)."""
    return out / f"{re.sub(r'[^A-Za-z0-9.-]+', '_', label)}-s{seed}"


def run_variants(variants: list[tuple[str, str, list[str]]], seeds: list[str], out: Path,
                 passthrough: list[str]) -> list[tuple[str, dict[str, list[float]]]] | int:
    """``variants``: (label, method, extra flags). Returns [(label, {key: per-seed values})], or
    the exit code of a failed run."""
    rows = []
    for label, method, flags in variants:
        per: dict[str, list[float]] = {k: [] for k, _ in KEYS}
        for seed in seeds:
            d = run_dir(out, label, seed)
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
