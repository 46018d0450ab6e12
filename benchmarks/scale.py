"""Scale benchmark (issue "Scale"), two parts:

1. ``--part cpu``: the same run in one process and under ``torchrun --nproc_per_node=2`` (gloo, CPU):
   the accuracy matrices' difference and each run's wall time (process start included).
2. ``--part gpu`` (needs CUDA; prints "no GPU: not measured" otherwise): a CIFAR-100-shaped run,
   100 classes x 500 training (+ 100 test) images of 32x32, built from the real Fashion-MNIST
   (10 labels x 10 colour tints, bilinearly upsampled from 28 px) or random uint8 when it is not
   installed, written in the CIFAR-100 pickle layout and run with ``--dataset cifar100``: resnet32,
   iCaRL B0-Inc10, the paper's epochs (cilearn's CIFAR defaults: 200 base / 170 incremental, or
   ``--epochs``), fp32, bf16 and, when cilearn has a ``train.compile`` option, bf16 + compile:
   training images/s (all phases) and total wall time.

    OMP_NUM_THREADS=1 python benchmarks/scale.py --part cpu [--out runs/scale] [-- extra run flags]
    python benchmarks/scale.py --part gpu [--epochs E] [--nproc 1]
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

CPU_FLAGS = ["--method", "icarl", "--dataset", "digits", "--increment", "2", "--no-progress", "--quiet"]


def run_cli(args: list[str], nproc: int) -> float:
    """``cilearn run ARGS`` in ``nproc`` processes (torchrun when > 1); returns the wall seconds."""
    launcher = [sys.executable, "-m", "cilearn", "run"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone", "-m", "cilearn", "run"]
    t0 = time.perf_counter()
    res = subprocess.run(launcher + args, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"scale.py: {' '.join(launcher + args)} failed:\n{res.stderr[-2000:]}")
    return time.perf_counter() - t0


def matrix_difference(a: list[list[float]], b: list[list[float]]) -> tuple[float, float]:
    """(max, mean) absolute difference of two accuracy matrices' entries, in points."""
    d = [abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
    return max(d), sum(d) / len(d)


def part_cpu(out: Path, extra: list[str]) -> str:
    rows = []
    metrics = {}
    for nproc in (1, 2):
        d = out / f"cpu-{nproc}proc"
        wall = run_cli(CPU_FLAGS + extra + ["--out", str(d), "--overwrite"], nproc)
        metrics[nproc] = m = json.loads((d / "metrics.json").read_text())
        train = sum(r["train_seconds"] for r in m["phases"])
        rows.append(f"| {nproc} | {m['avg_incremental_acc']:.2f} | {m['last_acc']:.2f} | "
                    f"{m['avg_incremental_acc_nme']:.2f} | {train:.1f} | {m['wall_seconds']:.1f} | {wall:.1f} |")
    mx, mean = matrix_difference(metrics[1]["accuracy_matrix"], metrics[2]["accuracy_matrix"])
    head = ("| processes | avg inc. acc | last acc | avg inc. acc NME | train s (all phases) | run wall s | "
            "process wall s (start included) |\n|---|---|---|---|---|---|---|")
    return (f"{head}\n" + "\n".join(rows) +
            f"\n\naccuracy matrix, 2 processes against 1: max |difference| {mx:.2f} points, mean {mean:.2f} "
            f"points over {sum(len(r) for r in metrics[1]['accuracy_matrix'])} entries")


def cifar100_shaped(root: Path, per_class: int = 500, test_per_class: int = 100, random: bool = False) -> str:
    """Writes ``root/cifar-100-python/{train,test,meta}``; returns where the images came from
    (``random``: random uint8 images even where Fashion-MNIST is installed)."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    n = per_class + test_per_class
    try:
        if random:
            raise LookupError("random images asked for")
        from cilearn.data.datasets import load_dataset
        from cilearn.data.base import DataOptions
        fm = load_dataset("fashion-mnist", DataOptions())
        x, y = fm.train_x, fm.train_y                                   # [60000, 1, 28, 28] uint8
        tints = torch.tensor([[1, 1, 1], [1, .3, .3], [.3, 1, .3], [.3, .3, 1], [1, 1, .3],
                              [1, .3, 1], [.3, 1, 1], [1, .6, .2], [.6, .2, 1], [.5, .5, .5]])
        xs, ys = [], []
        for label in range(10):
            imgs = x[y == label][: 10 * n].float()
            up = F.interpolate(imgs, size=32, mode="bilinear", align_corners=False)    # [10 n, 1, 32, 32]
            for t in range(10):
                xs.append((up[t * n:(t + 1) * n] * tints[t].view(1, 3, 1, 1)).round().clamp(0, 255).byte())
                ys += [label * 10 + t] * n
        data, labels, source = torch.cat(xs).numpy(), np.array(ys), "Fashion-MNIST, 10 labels x 10 tints, upsampled 28->32"
    except Exception as e:  # noqa: BLE001  (not installed, or asked for: random images)
        rng = np.random.RandomState(0)
        data = rng.randint(0, 256, (100 * n, 3, 32, 32), dtype=np.uint8)
        labels = np.repeat(np.arange(100), n)
        source = "random uint8" + ("" if random else f" (Fashion-MNIST not loaded: {type(e).__name__})")
    d = root / "cifar-100-python"
    d.mkdir(parents=True, exist_ok=True)
    train = np.concatenate([np.nonzero(labels == c)[0][:per_class] for c in range(100)])
    test = np.concatenate([np.nonzero(labels == c)[0][per_class:] for c in range(100)])
    for name, idx in (("train", train), ("test", test)):
        with open(d / name, "wb") as f:
            pickle.dump({b"data": data[idx].reshape(len(idx), -1), b"fine_labels": labels[idx].tolist()}, f)
    with open(d / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"c{i}".encode() for i in range(100)]}, f)
    return source


def part_gpu(out: Path, epochs: int | None, nproc: int) -> str:
    import torch
    if not torch.cuda.is_available():
        return "no GPU: not measured"
    from cilearn.config import TrainConfig
    source = cifar100_shaped(out / "data")
    base = ["--method", "icarl", "--dataset", "cifar100", "--data-dir", str(out / "data"), "--backbone", "resnet32",
            "--base", "0", "--increment", "10", "--device", "cuda", "--no-progress", "--quiet"]
    if epochs is not None:
        base += ["--epochs", str(epochs), "--base-epochs", str(epochs)]
    variants = [("fp32", ["--precision", "fp32"]), ("bf16", ["--precision", "bf16"])]
    if "compile" in TrainConfig.__dataclass_fields__:
        variants.append(("bf16 + compile", ["--precision", "bf16", "--train.compile", "true"]))
    rows = []
    for name, flags in variants:
        d = out / f"gpu-{name.replace(' ', '').replace('+', '-')}"
        wall = run_cli(base + flags + ["--out", str(d), "--overwrite"], nproc)
        m = json.loads((d / "metrics.json").read_text())
        secs = sum(r["train_seconds"] for r in m["phases"])
        imgs = sum(r["train_seconds"] * r["train_images_per_s"] for r in m["phases"])
        rows.append(f"| {name} | {imgs / secs:,.0f} | {secs:.0f} | {m['wall_seconds']:.0f} | {wall:.0f} | "
                    f"{m['avg_incremental_acc']:.2f} |")
        print(rows[-1], flush=True)          # as it comes: a run cut short by a time limit keeps the rows before
    if len(variants) < 3:
        rows.append("| bf16 + compile | not measured (no train.compile option yet) | | | | |")
    gpu = torch.cuda.get_device_name(0)
    return (f"GPU: {gpu}, {nproc} process(es); data: {source}\n\n| precision | train images/s | train s | run wall s | "
            "process wall s | avg inc. acc |\n|---|---|---|---|---|---|\n" + "\n".join(rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=("cpu", "gpu", "all"), default="all")
    p.add_argument("--out", default="runs/scale")
    p.add_argument("--epochs", type=int, help="gpu part: epochs of every phase (default: the paper's 200/170)")
    p.add_argument("--nproc", type=int, default=1, help="gpu part: processes (torchrun when > 1)")
    args, extra = p.parse_known_args()
    extra = [a for a in extra if a != "--"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.part in ("cpu", "all"):
        print("## 1-process vs 2-process gloo (CPU)\n\n" + part_cpu(out, extra) + "\n", flush=True)
    if args.part in ("gpu", "all"):
        print("## GPU: CIFAR-100-shaped iCaRL B0-Inc10, resnet32\n\n" + part_gpu(out, args.epochs, args.nproc))


if __name__ == "__main__":
    main()
