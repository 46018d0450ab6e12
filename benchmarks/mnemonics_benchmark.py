"""Herding vs Mnemonics exemplars (both forms) on one base method, over several seeds; prints a
markdown table for benchmarks/RESULTS.md: average incremental accuracy (CNN and NME), last
accuracy (CNN and NME), the seconds of the exemplar optimisation (all phases), of training and of
the whole run, and the bytes of the memory at the end.

    python benchmarks/mnemonics_benchmark.py --base icarl --seeds 1993,1,2 --out benchmarks/out/mnemonics

Default protocol (after ``--``, replaceable): Fashion-MNIST B0-Inc2, 300 training images per class,
resnet32, 10 epochs, batch 64, 5 exemplars per class. Runs go to OUT/<label>-s<seed> (the labels of
``compare_seeds.py``, whose runs are read when they exist); ``--variants`` picks some of herding,
mnemonics, single; extra flags for the mnemonics variants with ``--mnemonics-flags``.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from compare_seeds import run_dir, run_variants, split_argv  # noqa: E402

PROTOCOL = ["--dataset", "fashion-mnist", "--train-per-class", "300", "--backbone", "resnet32", "--increment", "2",
            "--epochs", "10", "--batch-size", "64", "--memory-per-class", "5"]
KINDS = ("herding", "mnemonics", "single")
KEYS = [("avg_incremental_acc", "avg inc. acc (CNN)"), ("avg_incremental_acc_nme", "avg inc. acc (NME)"),
        ("last_acc", "last acc (CNN)"), ("last_acc_nme", "last acc (NME)"), ("opt_s", "exemplar opt. s"),
        ("opt_s_phase", "opt. s per phase"), ("moved", "pixels moved (grey levels)"),
        ("stored", "stored change (grey levels)"), ("train_s", "train s"), ("wall_seconds", "wall s"),
        ("bytes", "memory bytes")]


def variants(base: str, kinds: tuple[str, ...] = KINDS, flags: list[str] | None = None) -> list[tuple[str, str, list[str]]]:
    """(label, method, flags): the base with herding, with ``mnemonics`` and with ``mnemonics-single``."""
    extra = flags or []
    suffix = (" " + " ".join(extra)) if extra else ""
    out = {"herding": (base, base, ["--memory.optimizer", "none"]),
           "mnemonics": (f"{base} --memory.optimizer mnemonics{suffix}", base, ["--memory.optimizer", "mnemonics", *extra]),
           "single": (f"{base} --memory.optimizer mnemonics-single{suffix}", base,
                      ["--memory.optimizer", "mnemonics-single", *extra])}
    return [out[k] for k in kinds]


def summary(m: dict) -> dict[str, float]:
    """The table's numbers from a run's metrics.json; per phase (mean over the phases that
    optimised): the optimizer's seconds, how far it moved the exemplars' float pixels and how far
    the stored (rounded) images changed, grey levels."""
    nan = float("nan")
    opt = [r for r in m["phases"] if r.get("exemplar_optimizer")]
    per = (lambda key: statistics.mean(float(r.get(key) or 0.0) for r in opt)) if opt else (lambda key: nan)
    return {"avg_incremental_acc": m["avg_incremental_acc"], "avg_incremental_acc_nme": m["avg_incremental_acc_nme"] or nan,
            "last_acc": m["last_acc"], "last_acc_nme": m["last_acc_nme"] or nan,
            "opt_s": sum(r.get("exemplar_optimizer", {}).get("seconds", 0.0) for r in m["phases"]),
            "train_s": sum(r["train_seconds"] for r in m["phases"]), "wall_seconds": m["wall_seconds"],
            "bytes": float(m["memory"]["total_bytes"]), "opt_s_phase": per("exemplar_optimizer_seconds"),
            "moved": per("exemplar_pixel_change"), "stored": per("exemplar_stored_pixel_change")}


def fmt(vals: list[float], key: str) -> str:
    if key == "bytes":
        return f"{statistics.mean(vals):.0f}"
    if any(math.isnan(v) for v in vals):
        return "-"
    if key in ("moved", "stored"):
        return f"{statistics.mean(vals):.2g}"      # (the releases move pixels by 1e-10 to 1e-2)
    if len(vals) == 1:
        return f"{statistics.mean(vals):.2f}"
    return f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f}"


def table(rows: list[tuple[str, list[dict[str, float]]]]) -> str:
    lines = ["| exemplars | " + " | ".join(t for _, t in KEYS) + " |", "|---" * (len(KEYS) + 1) + "|"]
    lines += [f"| {label} | " + " | ".join(fmt([r[k] for r in runs], k) for k, _ in KEYS) + " |" for label, runs in rows]
    return "\n".join(lines)


def main() -> int:
    own, passthrough = split_argv(sys.argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="icarl", help="a method that keeps exemplars (icarl, lucir, ...)")
    p.add_argument("--variants", default=",".join(KINDS), help=f"comma list of {', '.join(KINDS)}")
    p.add_argument("--mnemonics-flags", default="", help='flags for the mnemonics variants, e.g. "--memory.mnemonics.iterations 10"')
    p.add_argument("--seeds", default="1993,1,2")
    p.add_argument("--out", required=True)
    args = p.parse_args(own)
    kinds = tuple(args.variants.split(","))
    if bad := [k for k in kinds if k not in KINDS]:
        p.error(f"--variants: unknown {', '.join(bad)}; expected some of {', '.join(KINDS)}")
    vs = variants(args.base, kinds, args.mnemonics_flags.split())
    seeds, out = args.seeds.split(","), Path(args.out)
    got = run_variants(vs, seeds, out, passthrough or PROTOCOL)
    if isinstance(got, int):
        return got
    rows = [(label, [summary(json.loads((run_dir(out, label, s) / "metrics.json").read_text())) for s in seeds])
            for label, _, _ in vs]
    print("\n" + table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
