"""Print, for each run directory, the mean of each loss term over the last epoch of every phase
(``loss`` in ``metrics.json``) next to the phase's old / new accuracy: how the objective's terms
compare in size, and what the model fitted.

    python benchmarks/loss_terms.py benchmarks/out/lwm-kdstats/lwm-s1993 benchmarks/out/digits-kdstats/lwm-s1993
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def rows(run: Path) -> list[str]:
    m = json.loads((run / "metrics.json").read_text())
    names = sorted({k for r in m["phases"] for k in r["loss"]})
    out = [f"| {run} | " + " | ".join(names) + " | old acc | new acc |", "|---" * (len(names) + 3) + "|"]
    acc = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    for r in m["phases"]:
        terms = " | ".join(f"{r['loss'][n]:.3f}" if n in r["loss"] else "-" for n in names)
        out.append(f"| phase {r['phase']} | {terms} | {acc(r['acc_old'])} | {acc(r['acc_new'])} |")
    return out


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip())
        return 2
    for a in argv:
        if not (Path(a) / "metrics.json").is_file():
            print(f"error: {a}: no metrics.json (expected a cilearn run directory)", file=sys.stderr)
            return 2
    for a in argv:
        print("\n".join(rows(Path(a))) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
