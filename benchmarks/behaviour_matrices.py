"""Every registered recipe's accuracy matrices (CNN and NME) on digits at fp32 with fixed seeds:
record them before a refactoring that must preserve behaviour, compare after it, on the same
machine (CPUs differ in the last bits, so a file recorded elsewhere says nothing).

    python benchmarks/behaviour_matrices.py record benchmarks/out/matrices.json [--methods a,b]
    python benchmarks/behaviour_matrices.py compare benchmarks/out/matrices.json

``compare`` re-runs the recorded recipes and lists every recipe whose matrices differ in any bit;
exit code 1 when one does. Runs are small (B0-Inc2, 3 epochs, cheap extra stages), 2 to 3 minutes
for all recipes on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

SEEDS = (1993, 1)
# extra stages kept cheap: DF-GR's generator, the exemplar optimizer, CIM's bilevel steps
CHEAP = {"train": {"epochs": 3, "progress": False, "precision": "fp32", "checkpoint_every": 0}}


def cheap(method: str) -> dict:
    """CHEAP, and the extra stages' costs for the recipes that have them (a run refuses options it
    does not use)."""
    from cilearn.methods import METHODS
    from cilearn.methods.options import cheap_extra_stages
    return {**CHEAP, **cheap_extra_stages(METHODS.get(method), replay_steps=10, iterations=2)}


def matrices(method: str, seed: int) -> dict:
    import cilearn
    from cilearn.config import RunConfig, from_dict
    with tempfile.TemporaryDirectory() as d:
        cfg = from_dict(RunConfig, {**cheap(method), "method": method, "seed": seed, "out": str(Path(d) / "run"),
                                    "scenario": {"increment": 2}})
        m = cilearn.run(cfg, echo=False).metrics
    return {"cnn": m["accuracy_matrix"], "nme": m["accuracy_matrix_nme"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=("record", "compare"))
    p.add_argument("file")
    p.add_argument("--methods", help="comma list (record; default: every registered recipe)")
    a = p.parse_args(argv)
    from cilearn.methods import METHODS
    if a.mode == "record":
        names = a.methods.split(",") if a.methods else METHODS.names()
        out = {f"{n}@{s}": matrices(n, s) for n in names for s in SEEDS}
        Path(a.file).parent.mkdir(parents=True, exist_ok=True)
        Path(a.file).write_text(json.dumps(out, indent=1))
        print(f"{len(out)} runs recorded -> {a.file}")
        return 0
    recorded = json.loads(Path(a.file).read_text())
    differ = []
    for key, want in recorded.items():
        name, seed = key.rsplit("@", 1)
        got = matrices(name, int(seed))
        same = got == want
        differ += [] if same else [key]
        print(f"{key:24} {'identical' if same else 'DIFFERS'}", flush=True)
    print(f"{len(recorded) - len(differ)} of {len(recorded)} runs identical" + (f"; differ: {', '.join(differ)}" if differ else ""))
    return 1 if differ else 0


if __name__ == "__main__":
    # one thread: float reductions, hence the matrices, depend on the thread count; set here, not in
    # main(), so that a caller's process (the test suite) keeps its own
    import torch
    torch.set_num_threads(1)
    sys.exit(main())
