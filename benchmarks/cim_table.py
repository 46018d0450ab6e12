"""The compressed-exemplar comparison table (issue 23): for each variant directory group written by
``compare_seeds.py`` (``OUT/<label>-s<seed>``), mean ± std over the seeds of the exemplars kept per
class, the bytes stored, the average incremental accuracy (CNN, NME; and, for a run with a second
network, e.g. FOSTER's compressed student, that network's: ``avg_incremental_acc_student``), the
last accuracy and, for ``cim``, the mask model's seconds per phase and its meta-iterations (run /
skipped as not finite).

    python benchmarks/cim_table.py runs/cim23 --labels "foster,foster --compressor full,..." --seeds 1993,1,2

A label whose runs are missing is reported on stderr and left out (exit 2 if none is found).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cilearn.results import ResultsError, format_stat, load_run, mean_std

sys.path.insert(0, str(Path(__file__).parent))
from compare_seeds import run_dir  # noqa: E402


def run_row(m: dict) -> dict[str, float]:
    """The table's values of one run's metrics.json."""
    mem = m["memory"]
    phases = m["phases"]
    steps = [p.get("cim_meta_steps") for p in phases]
    return {
        "per_class": mem["total_images"] / len(mem["class_images"]),
        "bytes": mem["total_bytes"],
        "cnn": m["avg_incremental_acc"],
        "nme": m.get("avg_incremental_acc_nme") or float("nan"),
        "student": m.get("avg_incremental_acc_student", float("nan")),
        "last": m["last_acc"],
        "phi_s": (sum(p.get("cim_meta_seconds", 0.0) for p in phases) / len(phases)) if None not in steps
        else float("nan"),
        "steps": sum(steps) if None not in steps else float("nan"),
        "skipped": sum(p.get("cim_meta_skipped", 0) for p in phases) if None not in steps else float("nan"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="the directory compare_seeds.py wrote (OUT/<label>-s<seed>)")
    p.add_argument("--labels", required=True, help="comma-separated variants as given to compare_seeds.py")
    p.add_argument("--seeds", default="1993,1,2")
    a = p.parse_args(argv)
    out, seeds = Path(a.out), a.seeds.split(",")
    lines = ["| variant | exemplars per class | bytes stored | avg inc. acc CNN | avg inc. acc NME | last acc CNN "
             "| phi s per phase | meta-iterations run / skipped per run |", "|---" * 8 + "|"]
    student = []
    per_seed = []
    for label in a.labels.split(","):
        rows = []
        for seed in seeds:
            try:
                rows.append(run_row(load_run(run_dir(out, label, seed)).metrics))
            except ResultsError as e:
                print(f"cim_table: {e}", file=sys.stderr)
        if len(rows) != len(seeds):
            continue
        col = {k: [r[k] for r in rows] for k in rows[0]}
        cim = col["steps"][0] == col["steps"][0]            # not nan: a run with the mask model
        lines.append(f"| {label} | {format_stat(mean_std(col['per_class']))} | "
                     f"{format_stat(mean_std(col['bytes']), 0)} | {format_stat(mean_std(col['cnn']))} | "
                     f"{format_stat(mean_std(col['nme']))} | {format_stat(mean_std(col['last']))} | "
                     + (f"{format_stat(mean_std(col['phi_s']))} | "
                        f"{'/'.join(str(int(s)) for s in col['steps'])} / "
                        f"{'/'.join(str(int(s)) for s in col['skipped'])} |" if cim else "- | - |"))
        per_seed.append(f"{label}: " + ", ".join(f"{c:.2f} / {n:.2f}" for c, n in zip(col["cnn"], col["nme"])))
        if all(s == s for s in col["student"]):            # every run has a second network's accuracy
            student.append(f"{label}: {format_stat(mean_std(col['student']))} ("
                           + ", ".join(f"{s:.2f}" for s in col["student"]) + ")")
    if len(lines) == 2:
        print(f"cim_table: no variant has all its runs in {out}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    print(f"\nPer seed ({', '.join(seeds)}), CNN / NME: " + "; ".join(per_seed) + ".")
    if student:
        print("\nThe second network's (avg_incremental_acc_student) average incremental accuracy, mean ± std "
              "(per seed): " + "; ".join(student) + ".")
    return 0


if __name__ == "__main__":
    sys.exit(main())
