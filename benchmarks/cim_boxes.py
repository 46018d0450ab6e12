"""Where a finished run's compressed exemplars keep their pixels: for each run directory, the
exemplars stored, the mean box area as a fraction of the image, and, for image folders whose
items sit on a black canvas (``benchmarks/fmnist_imagefolder.py``), the share of the item's
pixels (decoded grey level > ``--item-level``) that lie inside the box.

    python benchmarks/cim_boxes.py runs/cim23-64e15/foster_--compressor_cim-s1993 ...

Reads the run's ``checkpoint-phase.pt`` with cilearn's checkpoint parser (nothing is unpickled):
runs made with ``--keep-checkpoint`` (a finished run deletes it otherwise).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Iterator

import torch

from cilearn.checkpoint import load_checkpoint
from cilearn.errors import CilearnError
from cilearn.memory.codec import Codes, decode


def code_states(o: Any) -> Iterator[dict]:
    """Every stored ``Codes`` state (a dict with ``boxes`` and ``shape``) inside a checkpoint."""
    if isinstance(o, dict):
        if "boxes" in o and "shape" in o and "sharp" in o:
            yield o
            return
        for v in o.values():
            yield from code_states(v)
    elif isinstance(o, (list, tuple)):
        for v in o:
            yield from code_states(v)


def box_stats(codes: Codes, item_level: float = 20.0) -> tuple[list[float], list[float]]:
    """(box area / image area, share of the item's pixels inside the box) per exemplar; the item:
    decoded pixels whose mean over channels is above ``item_level`` (a black canvas elsewhere)."""
    if len(codes) == 0:
        return [], []
    x = decode(codes).float().mean(1)                            # [N, H, W]
    H, W = x.shape[-2:]
    rows, cols = torch.arange(H)[None, :, None], torch.arange(W)[None, None, :]
    b = codes.boxes.cpu()
    inside = (rows >= b[:, 0, None, None]) & (rows < b[:, 2, None, None]) \
        & (cols >= b[:, 1, None, None]) & (cols < b[:, 3, None, None])   # [N, H, W]
    item = x > item_level
    area = inside.float().mean((1, 2))
    share = (item & inside).sum((1, 2)).float() / item.sum((1, 2)).clamp(min=1)
    return area.tolist(), share.tolist()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--item-level", type=float, default=20.0)
    a = p.parse_args(argv)
    for d in a.runs:
        if (Path(d) / "metrics.json").exists() and not (Path(d) / "checkpoint-phase.pt").exists():
            print(f"cim_boxes: {d} kept no checkpoint-phase.pt: run it with --keep-checkpoint", file=sys.stderr)
            return 2
        try:
            st = load_checkpoint(Path(d) / "checkpoint-phase.pt")
        except CilearnError as e:
            print(f"cim_boxes: {e}", file=sys.stderr)
            return 2
        area, share = [], []
        for c in code_states(st):
            s_area, s_share = box_stats(Codes.from_state(c, "cpu"), a.item_level)
            area += s_area
            share += s_share
        if not area:
            print(f"{d}: no compressed exemplars")
            continue
        print(f"{d}: {len(area)} exemplars, box area {sum(area) / len(area):.3f} of the image, "
              f"item pixels inside the box {sum(share) / len(share):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
