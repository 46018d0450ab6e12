"""GPU check of the training loop, for a session that has a CUDA device: every registered recipe
on digits (B0-Inc2, 3 epochs, cheap extra stages, the settings of ``behaviour_matrices.py``) at
fp32 and bf16 on the GPU, the mean over phases of the mean task accuracy of each against the same run on
the CPU when a CPU record is given, and whether two identical fp32 GPU runs give the same matrix.

    python benchmarks/gpu_check.py [--cpu-record FILE] [--out runs/gpu_check.json]

``--cpu-record``: a file ``behaviour_matrices.py record`` wrote (seed 1993 entries are used).
Prints one table row per recipe; exits 1 when a run fails.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from behaviour_matrices import cheap  # noqa: E402


def run(method: str, seed: int, precision: str) -> tuple[dict, float]:
    import cilearn
    from cilearn.config import RunConfig, from_dict
    d = cheap(method)
    d["train"] = {**d["train"], "precision": precision, "device": "cuda"}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = from_dict(RunConfig, {**d, "method": method, "seed": seed, "out": str(Path(tmp) / "run"), "scenario": {"increment": 2}})
        t0 = time.perf_counter()
        m = cilearn.run(cfg, echo=False).metrics
        return m, time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu-record")
    p.add_argument("--out", default="runs/gpu_check.json")
    p.add_argument("--methods")
    a = p.parse_args()
    import torch
    if not torch.cuda.is_available():
        print("no GPU: not measured")
        return 0
    from cilearn.methods import METHODS
    cpu = json.loads(Path(a.cpu_record).read_text()) if a.cpu_record else {}
    names = a.methods.split(",") if a.methods else METHODS.names()
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}")
    print("| recipe | CPU fp32 avg | GPU fp32 avg | GPU bf16 avg | GPU fp32 s | GPU bf16 s |\n|---|---|---|---|---|---|")
    out, failed = {}, []
    for n in names:
        row = {}
        for prec in ("fp32", "bf16"):
            try:
                m, s = run(n, 1993, prec)
                row[prec] = {"matrix": m["accuracy_matrix"], "avg": avg_of(m["accuracy_matrix"]), "seconds": s}
            except Exception:                     # a failing recipe is a finding, not the end of the check
                failed.append(f"{n}/{prec}")
                row[prec] = {"error": traceback.format_exc()[-1500:]}
                print(row[prec]["error"], file=sys.stderr)
        c = cpu.get(f"{n}@1993")
        cpu_avg = f"{avg_of(c['cnn']):.2f}" if c else "-"
        f, b = row["fp32"], row["bf16"]
        print(f"| {n} | {cpu_avg} | {f.get('avg', float('nan')):.2f} | {b.get('avg', float('nan')):.2f} | "
              f"{f.get('seconds', 0):.1f} | {b.get('seconds', 0):.1f} |", flush=True)
        out[n] = row
    m1, _ = run("icarl", 1993, "fp32")
    m2, _ = run("icarl", 1993, "fp32")
    same = m1["accuracy_matrix"] == m2["accuracy_matrix"]
    print(f"icarl fp32 on the GPU twice: matrices {'identical' if same else 'DIFFER'}")
    out["_repeat_identical"] = same
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(f"failed: {', '.join(failed) or 'none'}")
    return 1 if failed else 0


def avg_of(matrix: list[list[float | None]]) -> float:
    """Average incremental accuracy from an accuracy matrix (row i: accuracy on each task after
    phase i, tasks weighted by their test images being equal in size on digits)."""
    accs = []
    for i, row in enumerate(matrix):
        vals = [v for v in row[: i + 1] if v is not None]
        accs.append(sum(vals) / len(vals))
    return sum(accs) / len(accs)


if __name__ == "__main__":
    sys.exit(main())
