"""Image-folder benchmark (issue "Scale", large image folders), on a synthetic ImageNet-like folder:

1. **decode**: building the memory-mapped cache (``--data.workers``) with 1 process and with N,
   images/s (the second build of each is a fresh cache directory; a third load shows the reuse).
2. **train**: the same run with the images on the device (``--data.resident device``) and on the
   host (``host``: the memory-mapped cache, each batch's rows moved), and host + ``--compile``:
   training images/s of the first phase (resnet18, random-resized-crop + flip on the device, bf16
   where available) and the accuracy (device and host must agree exactly).

The folder: ``train/<class>/*.JPEG`` and ``val/<class>/*.JPEG``, smooth random colour fields
(upsampled 8x8 noise plus fine noise, a per-class tint so classes are learnable), JPEG quality 90,
``--src`` pixels wide (height 3/4 of that), written once (in parallel) and reused.

    python benchmarks/imagefolder_cache.py --root /tmp/synth --classes 20 --per-class 500 \\
        --size 128 --workers 16 --epochs 3 [--no-train]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


def _write_class(args: tuple[str, int, int, int, int]) -> int:
    import numpy as np
    from PIL import Image

    folder, label, n, src, seed = args
    rng = np.random.default_rng(seed)
    tint = rng.uniform(0.3, 1.0, 3)
    h = src * 3 // 4
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        coarse = Image.fromarray((rng.random((8, 8, 3)) * 255 * tint).astype(np.uint8)).resize((src, h), Image.BILINEAR)
        img = np.asarray(coarse, dtype=np.int16) + rng.integers(-20, 21, (h, src, 3))
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(os.path.join(folder, f"{label}_{i}.JPEG"), quality=90)
    return n


def make_folder(root: Path, classes: int, per_class: int, val_per_class: int, src: int, workers: int) -> None:
    if (root / "done").exists():
        return
    jobs = [(str(root / split / f"c{c:03d}"), c, n, src, 1000 * c + (split == "val"))
            for split, n in (("train", per_class), ("val", val_per_class)) for c in range(classes)]
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_write_class, jobs))
    (root / "done").write_text("ok")


def time_build(root: Path, cache: Path, size: int, workers: int) -> tuple[float, int, bool]:
    """Seconds to load (build or reuse) the cache in a fresh process-free call; (s, images, hit)."""
    from cilearn.data.base import DataOptions
    from cilearn.data.datasets import load_dataset

    t0 = time.perf_counter()
    ds = load_dataset("imagefolder", DataOptions(data_dir=str(root), image_size=size, cache_dir=str(cache),
                                                 workers=workers))
    return time.perf_counter() - t0, len(ds.train_y) + len(ds.test_y), ds.info["cache_hit"]


def run(args: list[str]) -> dict:
    res = subprocess.run([sys.executable, "-m", "cilearn", "run", *args], capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"imagefolder_cache.py: cilearn run {' '.join(args)} failed:\n{res.stderr[-3000:]}")
    out = args[args.index("--out") + 1]
    return json.loads((Path(out) / "metrics.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", type=Path, required=True)
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--per-class", type=int, default=500)
    p.add_argument("--val-per-class", type=int, default=50)
    p.add_argument("--src", type=int, default=400, help="source image width, px")
    p.add_argument("--size", type=int, default=128, help="--image-size of the cache")
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--no-train", action="store_true")
    a = p.parse_args()

    data = a.root / "data"
    t0 = time.perf_counter()
    make_folder(data, a.classes, a.per_class, a.val_per_class, a.src, a.workers)
    print(f"folder: {a.classes} classes x ({a.per_class} + {a.val_per_class}) JPEGs of {a.src}x{a.src * 3 // 4} "
          f"({time.perf_counter() - t0:.1f} s to write or find)")
    print("\n| workers | images | build s | images/s |\n|---|---|---|---|")
    for w in sorted({1, a.workers}):
        s, n, hit = time_build(data, a.root / f"cache-w{w}", a.size, w)
        assert not hit, "the cache directory was not fresh"
        print(f"| {w} | {n} | {s:.1f} | {n / s:.0f} |")
    s, n, hit = time_build(data, a.root / f"cache-w{a.workers}", a.size, a.workers)
    print(f"\nreuse: {s:.2f} s for {n} images (cache hit: {hit})")
    same = (a.root / "cache-w1").exists() and all(
        open(f1, "rb").read() == open(a.root / f"cache-w{a.workers}" / f1.name, "rb").read()
        for f1 in (a.root / "cache-w1").glob("*.u8"))
    print(f"cache bytes identical, 1 vs {a.workers} workers: {same}")
    if a.no_train:
        return
    half = a.classes // 2
    common = ["--dataset", "imagefolder", "--data-dir", str(data), "--image-size", str(a.size),
              "--data.cache-dir", str(a.root / f"cache-w{a.workers}"), "--method", "icarl", "--base", str(half),
              "--increment", str(a.classes - half), "--epochs", str(a.epochs), "--batch-size", str(a.batch_size),
              "--backbone", "resnet18", "--no-progress", "--quiet", "--overwrite"]
    print("\n| images | compile | phase-0 train img/s | phase-0 train s | avg inc. acc | wall s |\n|---|---|---|---|---|---|")
    accs = {}
    for resident, compiled in (("device", False), ("host", False), ("host", True), ("device", True)):
        tag = f"{resident}{'-compile' if compiled else ''}"
        m = run(common + ["--data.resident", resident, "--out", str(a.root / "runs" / tag)]
                + (["--compile"] if compiled else []))
        ph = m["phases"][0]
        accs[tag] = m["accuracy_matrix"]
        print(f"| {resident} | {'yes' if compiled else 'no'} | {ph['train_images_per_s']:.0f} | "
              f"{ph['train_seconds']:.1f} | {m['avg_incremental_acc']:.2f} | {m['wall_seconds']:.1f} |", flush=True)
    print(f"\naccuracy matrices, device vs host: {'identical' if accs['device'] == accs['host'] else 'DIFFER'}")


if __name__ == "__main__":
    main()
