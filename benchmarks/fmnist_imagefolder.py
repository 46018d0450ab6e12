"""Fashion-MNIST written as an image folder (``train/<class>/*.png``, ``val/<class>/*.png``) at a
larger size, for runs where a CIM box can cover less of the image than at 28 px: each 28 x 28
item is pasted at a seeded random position on a black ``canvas`` x ``canvas`` image (the item
keeps its pixels: at 64 px it covers 19% of the image, against 100% of the 28 px original).

    python benchmarks/fmnist_imagefolder.py OUT --canvas 64 --train-per-class 200 --test-per-class 100
    cilearn run --method foster --dataset imagefolder --data-dir OUT --image-size 64 ...

``--classes 0,1,2,3,4`` writes only these labels' images (e.g. one half of the classes to pre-train
a backbone on, the other half to learn incrementally from it: ``benchmarks/ptm_fashion.py``).

Needs Debian's dataset-fashion-mnist (or ``--data-dir``). Refuses to write into a non-empty OUT.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cilearn.data.base import DataOptions
from cilearn.data.datasets import load_fashion_mnist, subsample_per_class


def place(x: np.ndarray, canvas: int, rng: np.random.Generator) -> np.ndarray:
    """``x`` uint8 ``[h, w]`` on a black ``[canvas, canvas]`` image at a random offset."""
    h, w = x.shape
    out = np.zeros((canvas, canvas), dtype=np.uint8)
    r, c = rng.integers(0, canvas - h + 1), rng.integers(0, canvas - w + 1)
    out[r:r + h, c:c + w] = x
    return out


def write_split(root: Path, x: torch.Tensor, y: torch.Tensor, names: list[str], canvas: int,
                rng: np.random.Generator) -> int:
    """PNG files ``root/<class name>/<i>.png`` of images ``x`` uint8 ``[N, 1, 28, 28]``."""
    for i, (img, label) in enumerate(zip(x[:, 0].numpy(), y.tolist())):
        folder = root / names[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(place(img, canvas, rng)).save(folder / f"{i:06d}.png")
    return len(x)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="empty or new folder to write")
    p.add_argument("--canvas", type=int, default=64, help="side of the written images (>= 28)")
    p.add_argument("--train-per-class", type=int, default=200)
    p.add_argument("--test-per-class", type=int, default=100)
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST idx files (default: Debian's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--classes", default=None, help="comma list of the labels (0-9) to write; default: all")
    a = p.parse_args(argv)
    out = Path(a.out)
    if a.canvas < 28:
        p.error(f"--canvas: expected at least 28 (the items are 28 x 28), got {a.canvas}")
    if out.exists() and any(out.iterdir()):
        p.error(f"{out}: exists and is not empty; give a new folder")
    try:
        keep = sorted({int(c) for c in a.classes.split(",")}) if a.classes else list(range(10))
    except ValueError:
        p.error(f"--classes: expected a comma list of labels 0-9, got '{a.classes}'")
    if not set(keep) <= set(range(10)):
        p.error(f"--classes: expected labels 0-9, got '{a.classes}'")
    ds = load_fashion_mnist(DataOptions(data_dir=a.data_dir))
    names = [n.replace("/", "-").replace(" ", "_") for n in ds.class_names]
    rng = np.random.default_rng(a.seed)
    tx, ty = subsample_per_class(ds.train_x, ds.train_y, a.train_per_class, a.seed)
    vx, vy = subsample_per_class(ds.test_x, ds.test_y, a.test_per_class, a.seed)
    (tx, ty), (vx, vy) = [(x[torch.isin(y, torch.tensor(keep))], y[torch.isin(y, torch.tensor(keep))])
                          for x, y in ((tx, ty), (vx, vy))]
    n = write_split(out / "train", tx, ty, names, a.canvas, rng) + write_split(out / "val", vx, vy, names, a.canvas, rng)
    print(f"wrote {n} images ({a.canvas} x {a.canvas}, {len(keep)} classes) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
