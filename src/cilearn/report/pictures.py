"""Pictures of images (matplotlib, imported lazily): Grad-CAM overlays, sample grids, exemplars as
selected and as stored, t-SNE of embeddings. Pure drawing from tensors and arrays; the live
observer (``cilearn.report.live``) computes what they show."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .figures import _pyplot


def exemplar_plot(orig: list, stored: list, boxes: list, labels: list, counts: list[int], baseline: int,
                  names: list, path: Path, title: str) -> None:
    """The figure of ``exemplar_figure``: images ``[C, H, W]`` (uint8 or float in [0, 255]), boxes
    ``(y0, x0, y1, x1)`` or None, exemplars per class ``counts`` against ``baseline``."""
    plt = _pyplot()
    from matplotlib.patches import Rectangle

    k = max(len(orig), 1)
    fig = plt.figure(figsize=(max(6.0, 1.1 * k), 5.2), dpi=110)
    grid = fig.add_gridspec(3, k, height_ratios=[1, 1, 1.6])

    def show(ax, img, box=None):
        a = np.asarray(img.detach().float().cpu().clamp(0, 255)).astype(np.uint8)
        ax.imshow(a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0), cmap="gray" if a.shape[0] == 1 else None,
                  vmin=0, vmax=255)
        if box is not None and box[2] > box[0] and box[3] > box[1]:
            ax.add_patch(Rectangle((box[1] - 0.5, box[0] - 0.5), box[3] - box[1], box[2] - box[0], fill=False,
                                   edgecolor="red", linewidth=1.2))
        ax.set_xticks([])
        ax.set_yticks([])

    for j, (o, st, b, lab) in enumerate(zip(orig, stored, boxes, labels)):
        show(fig.add_subplot(grid[0, j]), o, b)
        show(fig.add_subplot(grid[1, j]), st)
        fig.axes[-2].set_title(str(lab), fontsize=7)
    if orig:
        fig.axes[0].set_ylabel("selected", fontsize=8)
        fig.axes[1].set_ylabel("stored", fontsize=8)
    ax = fig.add_subplot(grid[2, :])
    xs = np.arange(len(counts))
    ax.bar(xs - 0.2, counts, 0.4, label="stored (this memory)")
    ax.bar(xs + 0.2, [baseline] * len(counts), 0.4, label="uncompressed, same bytes")
    ax.set_xticks(xs)
    ax.set_xticklabels([str(n) for n in names], fontsize=7)
    ax.set_xlabel("class")
    ax.set_ylabel("exemplars")
    ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def tsne_figure(emb, labels, n_test: int, panels: list[tuple[str, int]], names: list[str], path: Path,
                title: str) -> None:
    """One t-SNE of ``emb [N, D]`` (rows: ``n_test`` test embeddings, then each panel's exemplars
    in turn, ``panels``: (title, count)), drawn as one subplot per panel: all test points light,
    that panel's exemplars dark with a black edge; colour = ``labels [N]`` (incremental ids),
    legend = ``names`` (class names, by incremental id)."""
    plt = _pyplot()
    from sklearn.manifold import TSNE

    perplexity = float(min(30.0, max(2.0, (len(emb) - 1) / 3)))
    xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=0).fit_transform(emb)
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 5), dpi=110, squeeze=False)
    start = n_test
    for ax, (name, count) in zip(axes[0], panels):
        for c in range(len(names)):
            t = labels[:n_test] == c
            ax.scatter(xy[:n_test][t, 0], xy[:n_test][t, 1], s=6, color=cmap(c % cmap.N), alpha=0.25, linewidths=0)
            e = labels[start:start + count] == c
            ax.scatter(xy[start:start + count][e, 0], xy[start:start + count][e, 1], s=60, color=cmap(c % cmap.N),
                       edgecolors="black", linewidths=0.8, label=str(names[c]))
        start += count
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][-1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------- report figures (PNG bytes)
def overlay_grid(images: torch.Tensor, cams_teacher: torch.Tensor, cams_student: torch.Tensor,
                 path: str | Path, titles: list[str] | None = None, size: float = 2.0,
                 dpi: int = 100) -> Path:
    """Write a PNG grid, one row per image, 3 columns: the image, the teacher's Grad-CAM over it,
    the student's Grad-CAM over it (column titles "image", "teacher (class b)", "student
    (class b)"). ``images``: uint8 ``[N, C, H, W]`` (C = 1: drawn in grey, C = 3: RGB);
    ``cams_*``: ``[N, h, w]``, upsampled bilinearly to ``H x W`` and min-max normalised per map,
    drawn with the "jet" colormap at alpha 0.5. ``titles``: optional label per row (e.g. the
    label and ``b``). Each panel is ``size`` inches square at ``dpi``, so the file is
    ``3 * size * dpi`` by ``N * size * dpi`` pixels. Returns the path.
    """
    plt = _pyplot()

    n, c, h, w = images.shape
    if cams_teacher.shape[0] != n or cams_student.shape[0] != n:
        raise ValueError("overlay_grid: images and maps must have the same number of rows")
    if titles is not None and len(titles) != n:
        raise ValueError(f"overlay_grid: {len(titles)} titles for {n} rows")

    def prepare(cams: torch.Tensor) -> torch.Tensor:
        m = F.interpolate(cams.detach().float().cpu()[:, None], size=(h, w), mode="bilinear",
                          align_corners=False)[:, 0]
        lo = m.flatten(1).min(1).values[:, None, None]
        hi = m.flatten(1).max(1).values[:, None, None]
        return (m - lo) / (hi - lo).clamp_min(1e-12)

    imgs = images.detach().cpu()
    cams = (prepare(cams_teacher), prepare(cams_student))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(n, 3, figsize=(3 * size, n * size), dpi=dpi, squeeze=False)
    try:
        for i in range(n):
            img = imgs[i].permute(1, 2, 0).numpy()
            kw = dict(cmap="gray", vmin=0, vmax=255) if c == 1 else {}
            img = img[:, :, 0] if c == 1 else img
            for j, ax in enumerate(axes[i]):
                ax.imshow(img, **kw)
                if j > 0:
                    ax.imshow(cams[j - 1][i].numpy(), cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0)
                ax.set_xticks([])
                ax.set_yticks([])
            if titles is not None:
                axes[i][0].set_ylabel(titles[i], fontsize=8)
        for ax, t in zip(axes[0], ("image", "teacher (class b)", "student (class b)")):
            ax.set_title(t, fontsize=9)
        fig.subplots_adjust(left=0.05, right=0.99, top=0.92, bottom=0.01, wspace=0.05, hspace=0.1)
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)
    return path


def sample_grid(images: torch.Tensor, rows: int, cols: int, labels: list[str], path: str | Path,
                size: float = 1.0, dpi: int = 100) -> Path:
    """``images``: uint8 ``[rows * cols, C, H, W]``, row-major (row r = class ``labels[r]``);
    C = 1 drawn in grey, C = 3 as RGB. Each panel is ``size`` inches square at ``dpi``."""
    plt = _pyplot()

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


