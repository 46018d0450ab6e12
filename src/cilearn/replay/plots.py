"""PNG of generated samples (matplotlib, imported lazily)."""
from __future__ import annotations

from pathlib import Path

import torch


def sample_grid(images: torch.Tensor, rows: int, cols: int, labels: list[str], path: str | Path,
                size: float = 1.0, dpi: int = 100) -> Path:
    """``images``: uint8 ``[rows * cols, C, H, W]``, row-major (row r = class ``labels[r]``);
    C = 1 drawn in grey, C = 3 as RGB. Each panel is ``size`` inches square at ``dpi``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if images.shape[0] != rows * cols or len(labels) != rows:
        raise ValueError(f"sample_grid: {images.shape[0]} images, {len(labels)} labels for a {rows}x{cols} grid")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * size + 0.8, rows * size), dpi=dpi, squeeze=False)
    try:
        for i in range(rows * cols):
            ax = axes[i // cols][i % cols]
            img = images[i].permute(1, 2, 0).numpy()
            if img.shape[2] == 1:
                ax.imshow(img[:, :, 0], cmap="gray", vmin=0, vmax=255)
            else:
                ax.imshow(img)
            ax.set_xticks([])
            ax.set_yticks([])
            if i % cols == 0:
                ax.set_ylabel(labels[i // cols], fontsize=7)
        fig.subplots_adjust(left=0.12, right=0.99, top=0.99, bottom=0.01, wspace=0.05, hspace=0.05)
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)
    return path
