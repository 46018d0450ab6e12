"""Pre-trained backbones: embedding throughput and the phase time of SimpleCIL and RanPAC (issue 33).

1. **Pure forward**: the timm model (``--model``, seeded random weights, no classifier) on one
   fixed, already resized and normalised random batch ``[B, 3, S, S]``, under ``torch.inference_mode``
   and the run's precision: images per second, the ceiling of any embedding pipeline.
2. **cilearn**: ``cilearn run --method M --backbone timm:MODEL --weights random`` on CIFAR-100-shaped
   random data (100 classes of 32 px uint8 images, ``--train-per-class`` + ``--test-per-class``
   each, written in the CIFAR-100 pickle layout), B0-Inc10. Both methods' backbones are frozen in
   every phase (RanPAC with ``--base-epochs 0 --components.freeze-backbone.after -1``: no
   first-session adaptation, so that this measures the frozen-feature path), so each image is embedded once
   (``phases[i].embedded_images``: the phase's new training and test images) from uint8 at 32 px,
   resized and normalised on the device in batches. A phase's ratio = (its embedded images / the
   pure forward's images per second) / its ``phase_seconds``: 1.0 means the phase costs exactly one
   pure forward per new image; the rest is the resize, the prototypes or ridge statistics and solve,
   the evaluation's head and the bookkeeping.
3. **RanPAC's solve alone**: ``cilearn.ranpac.solve`` on an ``M x M`` float64 Gram matrix (``--ridge-dim``,
   10000 as the recipe) and 10 classes' targets, median of 2: the per-phase cost that does not
   depend on the number of images (the Gram matrix's size is fixed by M).

The pure forward's images per second depend on the batch (on a 2-core AVX-512 CPU, ViT-B/16 bf16:
about 16 at 16-32 images, 12 at 128), so ``--batch-size`` is used for both the pure forward and
the runs' embedding batch (``--train.eval-batch-size``); give the size where the pure forward is fastest.

    python benchmarks/ptm_throughput.py [--model vit_base_patch16_224] [--train-per-class 10]
        [--test-per-class 5] [--precision auto] [--batch-size 32] [--out runs/ptm-throughput]

Needs the ``ptm`` extra (timm). Prints a Markdown table for benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from cilearn.prepare import resolve_precision
from cilearn.threads import default_threads

sys.path.insert(0, str(Path(__file__).parent))
from scale import cifar100_shaped  # noqa: E402

# RanPAC frozen from phase 0 on (the benchmark's point is the frozen-feature path)
METHODS = {"simplecil": [], "ranpac": ["--base-epochs", "0", "--components.freeze-backbone.after", "-1"]}


def pure_forward(model_name: str, size: int, batch: int, dtype: torch.dtype | None, repeats: int) -> float:
    """Images per second of the timm model's pooled-embedding forward on a fixed batch."""
    import timm
    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False, num_classes=0).eval()
    x = torch.randn(batch, 3, size, size)
    times = []
    with torch.inference_mode(), torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        model(x)                                                  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    return batch / statistics.median(times)


def solve_seconds(dim: int, classes: int = 10) -> float:
    """Median wall seconds of RanPAC's ridge solve (``cilearn.ranpac.solve``) of an ``M x M`` float64
    Gram matrix (of 64 random rows; ``+ ridge I`` makes it positive definite, and the factorisation's
    cost does not depend on the values) for ``classes`` targets."""
    from cilearn.ranpac import solve
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(64, dim, dtype=torch.float64, generator=gen)
    g, q = h.T @ h, torch.randn(dim, classes, dtype=torch.float64, generator=gen)
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        solve(g, q, 1e4)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(method: str, args, data: Path, out: Path) -> dict:
    cmd = [sys.executable, "-m", "cilearn", "run", "--method", method, "--dataset", "cifar100", "--data-dir", str(data),
           "--backbone", f"timm:{args.model}", "--weights", "random", "--increment", "10", "--precision", args.precision,
           "--train.eval-batch-size", str(args.batch_size), "--out", str(out), "--overwrite", "--no-progress", "--quiet",
           *METHODS[method]]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"ptm_throughput.py: {' '.join(cmd)} failed:\n{res.stderr[-2000:]}")
    m = json.loads((out / "metrics.json").read_text())
    m["process_seconds"] = time.perf_counter() - t0
    return m


def table(pure: float, runs: dict[str, dict]) -> str:
    """One row per method: totals over its phases, and its phases' lowest ratio."""
    lines = ["| method | phases | images embedded | phase s (sum) | run wall s | process wall s | embed img/s "
             "(cilearn, all phases) | ratio (all phases) | lowest phase ratio | last acc |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in runs.items():
        rows = m["phases"]
        n, s = sum(r["embedded_images"] for r in rows), sum(r["phase_seconds"] for r in rows)
        low = min(r["embedded_images"] / pure / r["phase_seconds"] for r in rows)
        lines.append(f"| {name} | {len(rows)} | {n} | {s:.1f} | {m['wall_seconds']:.1f} | {m['process_seconds']:.1f} | "
                     f"{n / s:.1f} | {n / pure / s:.2f} | {low:.2f} | {m['last_acc']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--size", type=int, default=224, help="the model's input side (px)")
    ap.add_argument("--train-per-class", type=int, default=10)
    ap.add_argument("--test-per-class", type=int, default=5)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--batch-size", type=int, default=32, help="the pure forward's and the runs' embedding batch")
    ap.add_argument("--ridge-dim", type=int, default=10000, help="M of the solve timed alone (RanPAC's recipe: 10000)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--out", default="runs/ptm-throughput")
    args = ap.parse_args()
    out = Path(args.out)
    torch.set_num_threads(default_threads())                      # as the runs (--threads auto)
    dtype = resolve_precision(args.precision, torch.device("cpu"))
    pure = pure_forward(args.model, args.size, args.batch_size, dtype, args.repeats)
    source = cifar100_shaped(out / "data", args.train_per_class, args.test_per_class, random=True)
    runs = {m: run(m, args, out / "data", out / m) for m in args.methods}
    print(f"model {args.model} at {args.size} px, precision {args.precision} ({dtype or 'fp32'}), "
          f"{torch.get_num_threads()} threads; data: {source}, {args.train_per_class} + {args.test_per_class} "
          f"images per class, B0-Inc10\n")
    print(f"pure forward: {pure:.1f} images/s (batch {args.batch_size}, median of {args.repeats})\n")
    print(table(pure, runs))
    if "ranpac" in runs:
        print(f"\nRanPAC's ridge solve alone (M = {args.ridge_dim}, float64): {solve_seconds(args.ridge_dim):.1f} s per phase")
    for name, m in runs.items():
        print(f"\n{name} per phase (embedded images, phase s, ratio): " + ", ".join(
            f"{r['embedded_images']}/{r['phase_seconds']:.1f}/{r['embedded_images'] / pure / r['phase_seconds']:.2f}"
            for r in m["phases"]))


if __name__ == "__main__":
    main()
