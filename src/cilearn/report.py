"""Plots and the HTML report (matplotlib, imported lazily, Agg backend).

``html_report(run_dirs, out)`` (``cilearn report``) writes one self-contained HTML file: every
picture is a PNG inlined as a ``data:`` URI, the style sheet and the one script are inline, and a
Content-Security-Policy forbids any other source, so the page renders without network access.
The script checks that every image decoded and records it in ``<body data-images="N/M">``.
"""
from __future__ import annotations

import base64
import copy
import html
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from .attention import gradcam, teacher_gradcam
from .models.net import eval_mode, freeze

from .errors import ConfigError
from .evaluate import class_forgetting, predict
from .events import Observer
from .files import atomic_write
from .results import (
    METRICS,
    Comparison,
    Group,
    Run,
    csv_table,
    curve,
    load_group,
    markdown_table,
    protocol_title,
    run_summary,
    seed_markdown,
    seed_summary,
    table_rows,
    unique_labels,
)
from .tblog import TensorBoardLog, summary_writer_class


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def draw_accuracy(ax, metrics: dict[str, Any]) -> None:
    """Top-1 on all seen classes after each phase, CNN and (when present) NME, on ``ax``."""
    rows = metrics["phases"]
    seen = [r["classes_seen"] for r in rows]
    ax.plot(seen, [r["acc"] for r in rows], "o-", label=f"CNN (avg {metrics['avg_incremental_acc']:.1f})")
    if metrics.get("avg_incremental_acc_nme") is not None:
        ax.plot(seen, [r["acc_nme"] for r in rows], "s--", label=f"NME (avg {metrics['avg_incremental_acc_nme']:.1f})")
    ax.set_xlabel("classes seen")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend()


def accuracy_plot(metrics: dict[str, Any], path: Path) -> None:
    """``accuracy.png`` of a run: ``draw_accuracy``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    draw_accuracy(ax, metrics)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def tsne_plot(ctx, phase, data, before: dict | None, per_class: int = 100) -> None:
    # ctx: the run's objects (``cilearn.runner.RunView``: cfg, out, net, memory, augmenter, autocast_dtype)
    """``--save-tsne``: ``tsne-phase<i>.png`` in the run directory, a t-SNE (scikit-learn) of the
    embeddings of up to ``per_class`` test images of every seen class (light dots) with the
    exemplars in memory (large dots, black edge), as Figure 1 of the Mnemonics paper. With an
    exemplar optimizer, two panels share one t-SNE: the exemplars as selected before this
    phase's optimisation (new classes: the selection rule's, herding by default) and after it."""

    mem = ctx.memory
    seen = (data.test_y < phase.end).nonzero().flatten()
    rng = np.random.RandomState(phase.index)
    keep = [seen[data.test_y[seen] == c] for c in range(phase.end)]
    keep = torch.cat([k[torch.from_numpy(rng.permutation(len(k))[:per_class]).to(k.device)] for k in keep])
    sets = [("exemplars", mem.exemplars)] if before is None else [("selected (before optimisation)", before),
                                                                 (f"{ctx.cfg.memory.optimizer} (optimised)", mem.exemplars)]
    xs, ys, panels = [data.test_x[keep]], [data.test_y[keep]], []
    for name, ex in sets:
        ids = [c for c in sorted(ex) if c < phase.end]
        xs += [ex[c].float() for c in ids]
        ys += [torch.full((len(ex[c]),), c, dtype=torch.long, device=data.test_y.device) for c in ids]
        panels.append((name, sum(len(ex[c]) for c in ids)))
    emb = predict(ctx.net, torch.cat([x.float() for x in xs]), ctx.augmenter, ctx.cfg.train.eval_batch_size,
                  ctx.autocast_dtype)[1].cpu().numpy()                                  # [N, D], one pass
    order = ctx.cfg.scenario.class_order
    tsne_figure(emb, torch.cat(ys).cpu().numpy(), len(keep), panels, [order[c] for c in range(phase.end)],
                ctx.out / f"tsne-phase{phase.index}.png", f"phase {phase.index}: {phase.end} classes, seed {ctx.cfg.seed}")


def attention_figure(run, phase: int, teacher: torch.nn.Module, num_old: int, n: int) -> Path:
    """``--save-attention N``: ``attention-phase<i>.png`` in the run directory, N test images of the
    seen classes (a fixed draw per phase) with the previous phase's model's (the teacher's) and the
    current model's Grad-CAM for b, the teacher's top old class (LwM's Fig. 1; ``overlay_grid``).
    Drawn from the end of phase i-1 and the end of phase i, so a resumed run has no figure for the
    phase it resumed in."""
    data, aug, net = run.data, run.augmenter, run.net
    seen = (data.test_y < run.net.num_classes).nonzero().flatten()
    pick = seen[torch.from_numpy(np.random.RandomState(phase).permutation(len(seen))[:n]).to(seen.device)]
    x, y = data.test_x[pick], data.test_y[pick]
    cam_t, b, _ = teacher_gradcam(teacher, aug.test(x), num_old)
    with eval_mode(net), torch.enable_grad():
        o = net(aug.test(x).requires_grad_(True))
        cam_s = gradcam(o.maps[-1], o.logits, b, create_graph=False, retain_graph=False)
    order = run.cfg.scenario.class_order
    titles = [f"y={order[int(a)]} b={order[int(c)]}" for a, c in zip(y, b)]
    return overlay_grid(x.cpu(), cam_t, cam_s, run.out / f"attention-phase{phase}.png", titles)


def exemplar_figure(ctx, phase, originals: dict) -> Path:
    # ctx: as tsne_plot's
    """``--save-exemplars N``: ``compressed-phase<i>.png`` in the run directory. Top rows: up to N
    of this phase's new exemplars (taken in turn from each new class, selection order), as selected
    (box of the compressor drawn in red) and as stored (decoded); bottom: exemplars per class in
    memory against the uncompressed baseline's (the budget share in whole images)."""
    mem, n = ctx.memory, ctx.cfg.report.save_exemplars
    picks = []                                        # (class, index within the class)
    depth = max((len(v) for v in originals.values()), default=0)
    for i in range(depth):
        picks += [(c, i) for c in sorted(originals) if i < len(originals[c])]
    picks = picks[:n]
    orig = [originals[c][i] for c, i in picks]
    stored = [mem.exemplars[c][i] for c, i in picks]
    boxes = [mem.codes[c].boxes[i].tolist() if c in mem.codes and mem.codes[c].with_boxes else None for c, i in picks]
    counts = [len(mem.exemplars.get(c, ())) for c in range(phase.end)]
    path = ctx.out / f"compressed-phase{phase.index}.png"
    order = ctx.cfg.scenario.class_order
    name = ctx.cfg.memory.compressor
    exemplar_plot(orig, stored, boxes, [order[c] for c, _ in picks], counts, mem.budget.share(phase.seen),
                  [order[c] for c in range(phase.end)], path,
                  f"phase {phase.index}: compressor {name}, {len(mem)} exemplars, {mem.nbytes} bytes")
    return path


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
        fig.axes[-2].set_title(f"class {lab}", fontsize=7)
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


def tsne_figure(emb, labels, n_test: int, panels: list[tuple[str, int]], names: list[int], path: Path,
                title: str) -> None:
    """One t-SNE of ``emb [N, D]`` (rows: ``n_test`` test embeddings, then each panel's exemplars
    in turn, ``panels``: (title, count)), drawn as one subplot per panel: all test points light,
    that panel's exemplars dark with a black edge; colour = ``labels [N]`` (incremental ids),
    legend = ``names`` (original class ids)."""
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
                       edgecolors="black", linewidths=0.8, label=f"class {names[c]}")
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


class Reporter(Observer):
    """The figures and TensorBoard scalars of one run, drawn from its events (``cilearn.events``)
    on the process that writes: ``accuracy.png`` when the run completes; with ``--save-exemplars``,
    ``--save-tsne``, ``--save-attention``, ``--save-samples`` the pictures of each phase; with
    ``--tensorboard`` the scalars (``cilearn.tblog``)."""

    def __init__(self) -> None:
        self.run = None
        self.tb = None
        self.previous = None          # --save-attention: the model of the previous phase (frozen), its classes

    @staticmethod
    def check(cfg) -> None:
        """Before the run writes anything: what the reporting options need is installed."""
        if cfg.report.tensorboard:
            summary_writer_class()                 # a ConfigError naming the package when it is missing

    def on_start(self, run) -> None:
        self.run = run
        if run.cfg.report.tensorboard:
            self.tb = TensorBoardLog(run.out, run.cfg.train.base_epochs or run.cfg.train.epochs or 0)

    def on_epoch(self, phase, stage, epoch, epochs, scalars) -> None:
        if self.tb is not None:
            self.tb.on_epoch(phase, stage, epoch, epochs, scalars)

    def on_phase(self, row) -> None:
        if self.tb is not None:
            self.tb.on_phase(row)
        n = self.run.cfg.report.save_attention
        if n > 0:
            if self.previous is not None:
                attention_figure(self.run, row["phase"], *self.previous, n)
            self.previous = (freeze(copy.deepcopy(self.run.net)), row["classes_seen"])

    def on_memory(self, phase, originals, selected) -> None:
        rep = self.run.cfg.report
        if rep.save_exemplars:
            exemplar_figure(self.run, phase, originals)
        if rep.save_tsne:
            tsne_plot(self.run, phase, self.run.data, selected)

    def wants(self, kind: str) -> int:
        rep = self.run.cfg.report if self.run is not None else None
        return rep.save_samples if rep is not None and kind == "samples" else 0

    def on_images(self, kind, phase, data) -> None:
        if kind == "samples":
            sample_grid(data["images"], data["rows"], data["cols"], data["labels"],
                        self.run.out / f"samples-phase{phase}.png")

    def on_complete(self, out, metrics) -> None:
        accuracy_plot(metrics, out / "accuracy.png")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def _png(fig) -> bytes:
    plt = _pyplot()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def class_names(m: dict[str, Any], k: int) -> list[str]:
    """Data set labels of incremental ids ``0..k-1`` (``metrics["class_order"]``), else the ids."""
    order = m.get("class_order") or list(range(k))
    return [str(order[c]) if c < len(order) else str(c) for c in range(k)]


def fig_accuracy(m: dict[str, Any]) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=100)
    draw_accuracy(ax, m)
    return _png(fig)


def fig_accuracy_matrix(m: dict[str, Any]) -> bytes:
    """Heatmap of ``a[i][j]`` (after phase i, task j), CNN and NME side by side when present."""
    plt = _pyplot()
    mats = [("CNN", m["accuracy_matrix"])] + ([("NME", m["accuracy_matrix_nme"])] if m.get("accuracy_matrix_nme") else [])
    T = len(m["accuracy_matrix"])
    fig, axes = plt.subplots(1, len(mats), figsize=(0.45 * T * len(mats) + 2.5 * len(mats), 0.45 * T + 1.6),
                             dpi=100, squeeze=False)
    for ax, (name, rows) in zip(axes[0], mats):
        a = np.full((T, T), np.nan)
        for i, row in enumerate(rows):
            a[i, :len(row)] = [np.nan if v is None else v for v in row]
        im = ax.imshow(np.ma.masked_invalid(a), vmin=0, vmax=100, cmap="viridis")
        if T <= 12:
            for i in range(T):
                for j in range(i + 1):
                    if not np.isnan(a[i, j]):
                        ax.text(j, i, f"{a[i, j]:.0f}", ha="center", va="center", fontsize=7,
                                color="white" if a[i, j] < 60 else "black")
        ax.set_xlabel("task j (classes of phase j)")
        ax.set_ylabel("after phase i")
        ax.set_title(f"accuracy matrix, {name} (%)", fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return _png(fig)


def fig_class_forgetting(m: dict[str, Any]) -> bytes | None:
    rows = [r.get("per_class_acc") for r in m["phases"]]
    if any(r is None for r in rows) or len(rows) < 2:
        return None
    f = class_forgetting(rows)
    names = class_names(m, len(f))
    kept = [(n, v) for n, v in zip(names, f) if v is not None]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.22 * len(kept) + 1.5), 3.2), dpi=100)
    ax.bar(range(len(kept)), [v for _, v in kept], color="tab:red")
    if len(kept) <= 40:
        ax.set_xticks(range(len(kept)), [n for n, _ in kept], fontsize=7, rotation=90 if len(kept) > 20 else 0)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xlabel("class (in order of arrival; the last phase's omitted)", fontsize=8)
    ax.set_ylabel("forgetting (points)")
    ax.grid(alpha=0.3, axis="y")
    return _png(fig)


def fig_old_new(m: dict[str, Any]) -> bytes:
    plt = _pyplot()
    rows = m["phases"]
    seen = [r["classes_seen"] for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=100)
    for key, style, label in (("acc", "o-", "all seen"), ("acc_old", "v-", "old classes"), ("acc_new", "^-", "new classes"),
                              ("acc_old_among_old", "v:", "old among old logits"),
                              ("acc_new_among_new", "^:", "new among new logits")):
        pts = [(s, r.get(key)) for s, r in zip(seen, rows) if r.get(key) is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, ms=4, label=label)
    ax.set_xlabel("classes seen")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig)


def fig_confusion(m: dict[str, Any]) -> bytes | None:
    conf = m.get("confusion")
    if not conf:
        return None
    a = np.asarray(conf, dtype=float)
    a = a / np.maximum(a.sum(1, keepdims=True), 1) * 100          # row-normalised: % of the true class
    k = len(a)
    names = class_names(m, k)
    plt = _pyplot()
    side = min(9.0, 2.5 + 0.3 * k)
    fig, ax = plt.subplots(figsize=(side + 1, side), dpi=100)
    im = ax.imshow(a, vmin=0, vmax=100, cmap="Blues")
    if k <= 30:
        ax.set_xticks(range(k), names, fontsize=7, rotation=90 if k > 15 else 0)
        ax.set_yticks(range(k), names, fontsize=7)
    if k <= 12:
        for i in range(k):
            for j in range(k):
                if a[i, j] >= 0.5:
                    ax.text(j, i, f"{a[i, j]:.0f}", ha="center", va="center", fontsize=7,
                            color="white" if a[i, j] > 60 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class (in order of arrival)")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="% of the true class")
    return _png(fig)


def fig_memory(m: dict[str, Any]) -> bytes | None:
    mem = m.get("memory") or {}
    counts = mem.get("class_images")
    if not counts or not any(counts):
        return None
    names = class_names(m, len(counts))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.22 * len(counts) + 1.5), 3.2), dpi=100)
    ax.bar(range(len(counts)), counts, color="tab:green")
    if len(counts) <= 40:
        ax.set_xticks(range(len(counts)), names, fontsize=7, rotation=90 if len(counts) > 20 else 0)
    ax.set_xlabel("class (in order of arrival)", fontsize=8)
    ax.set_ylabel("exemplars stored")
    ax.set_title(f"{mem.get('total_images', sum(counts))} exemplars, {mem.get('total_bytes', 0):,} bytes", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    return _png(fig)


TIMINGS = (("train_seconds", "train (all stages)"), ("finetune_seconds", "of which fine-tuning"),
           ("generator_seconds", "generator (DF-GR)"), ("new_teacher_seconds", "new-class teacher (DT-ID)"),
           ("exemplar_optimizer_seconds", "exemplar optimizer"))


def phase_timings(row: dict[str, Any]) -> dict[str, float]:
    """The recorded seconds of one phase, by ``TIMINGS`` key."""
    flat = {**row, "exemplar_optimizer_seconds": (row.get("exemplar_optimizer") or {}).get("seconds")}
    return {k: float(flat[k]) for k, _ in TIMINGS if isinstance(flat.get(k), (int, float))}


def fig_timings(m: dict[str, Any]) -> bytes:
    plt = _pyplot()
    rows = [phase_timings(r) for r in m["phases"]]
    keys = [(k, label) for k, label in TIMINGS if any(r.get(k) for r in rows)] or list(TIMINGS[:1])
    x = np.arange(len(rows))
    w = 0.8 / len(keys)
    fig, ax = plt.subplots(figsize=(max(4.5, 0.5 * len(rows) + 2), 3.2), dpi=100)
    for i, (k, label) in enumerate(keys):
        ax.bar(x + (i - (len(keys) - 1) / 2) * w, [r.get(k, 0.0) for r in rows], w, label=label)
    ax.set_xticks(x, [str(i) for i in range(len(rows))])
    ax.set_xlabel("phase")
    ax.set_ylabel("seconds")
    ax.set_title(f"wall {m.get('wall_seconds', 0):.1f} s for the whole run", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    return _png(fig)


# ---------------------------------------------------------------- HTML
def img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def missing(what: str) -> str:
    return f'<p class="missing">{html.escape(what)}</p>'


def table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _num(v: Any, digits: int = 2) -> str:
    return "-" if not isinstance(v, (int, float)) or isinstance(v, bool) else f"{v:.{digits}f}"


def sec_config(run: "Run") -> str:
    text = (run.path / "config.yaml").read_text() if (run.path / "config.yaml").is_file() else ""
    return f"<pre>{html.escape(text)}</pre>" if text else missing("no config.yaml in this run directory")


def sec_summary(run: "Run") -> str:
    s = run_summary(run.metrics)
    return table(["metric", "value"], [[mt.label, _num(s[mt.key], mt.digits)] for mt in METRICS])


def sec_accuracy(run: "Run") -> str:
    m = run.metrics
    rows = [[str(r["phase"]), str(r["classes_seen"]), _num(r.get("acc")), _num(r.get("acc_nme")), _num(r.get("top5"))]
            for r in m["phases"]]
    return img(fig_accuracy(m), "accuracy curves") + table(["phase", "classes seen", "CNN", "NME", "top-5"], rows)


def sec_matrix(run: "Run") -> str:
    return img(fig_accuracy_matrix(run.metrics), "accuracy matrix")


def sec_forgetting(run: "Run") -> str:
    png = fig_class_forgetting(run.metrics)
    if png is None:
        return missing("not available: a single phase, or metrics.json has no per_class_acc (a run from before "
                       "per-class accuracies were recorded)")
    return img(png, "per-class forgetting")


def sec_old_new(run: "Run") -> str:
    rows = [[str(r["phase"]), _num(r.get("acc_old")), _num(r.get("acc_new")), _num(r.get("acc_old_among_old")),
             _num(r.get("acc_new_among_new"))] for r in run.metrics["phases"]]
    return img(fig_old_new(run.metrics), "old and new accuracy per phase") + \
        table(["phase", "old", "new", "old among old", "new among new"], rows)


def sec_confusion(run: "Run") -> str:
    png = fig_confusion(run.metrics)
    return img(png, "confusion matrix of the last phase") if png else \
        missing("not available: metrics.json has no confusion matrix (a run from before it was recorded)")


def sec_memory(run: "Run") -> str:
    mem = run.metrics.get("memory") or {}
    png = fig_memory(run.metrics)
    if png is None:
        return missing("this run keeps no exemplars" if not mem.get("total_images") else
                       f"{mem.get('total_images')} exemplars, {mem.get('total_bytes', 0):,} bytes; the per-class "
                       "counts were not recorded by this run")
    return img(png, "memory per class")


def sec_timings(run: "Run") -> str:
    rows = [phase_timings(r) for r in run.metrics["phases"]]
    keys = [(k, label) for k, label in TIMINGS if any(k in r for r in rows)]
    body = [[str(i)] + [_num(r.get(k), 1) for k, _ in keys] + [_num(p.get("train_images_per_s"), 0)]
            for i, (r, p) in enumerate(zip(rows, run.metrics["phases"]))]
    return img(fig_timings(run.metrics), "timings per phase") + \
        table(["phase"] + [f"{label} s" for _, label in keys] + ["train img/s"], body)


# method-specific pictures written by the run itself: (title, file pattern, how to ask for them)
PICTURES = (("Attention maps (LwM)", "attention-phase*.png", "--save-attention N"),
            ("t-SNE of embeddings and exemplars", "tsne-phase*.png", "--save-tsne"),
            ("Generated samples (DF-GR)", "samples-phase*.png", "--save-samples N"),
            ("Compressed exemplars (CIM)", "compressed-phase*.png", "an exemplar compressor"))


def _phase_of(p: Path) -> int:
    m = re.search(r"phase(\d+)", p.stem)
    return int(m.group(1)) if m else -1


def sec_pictures(run: "Run") -> str:
    parts = []
    for title, pattern, flag in PICTURES:
        files = sorted(run.path.glob(pattern), key=_phase_of)
        if files:
            parts.append(f"<h3>{html.escape(title)}</h3>" + "".join(
                f"<figure>{img(f.read_bytes(), f'{title}, {f.name}')}<figcaption>{html.escape(f.name)}</figcaption>"
                "</figure>" for f in files))
    if not parts:
        return missing("none for this run (they are written with --save-attention N, --save-tsne, --save-samples N)")
    return "".join(parts)


@dataclass(frozen=True)
class Section:
    key: str                 # the HTML id suffix and data-section value
    title: str
    build: Callable[["Run"], str]


SECTIONS: tuple[Section, ...] = (
    Section("config", "Configuration", sec_config),
    Section("summary", "Summary", sec_summary),
    Section("accuracy", "Accuracy per phase (CNN and NME)", sec_accuracy),
    Section("matrix", "Accuracy matrix", sec_matrix),
    Section("forgetting", "Per-class forgetting", sec_forgetting),
    Section("old-new", "Old and new classes per phase", sec_old_new),
    Section("confusion", "Confusion matrix of the last phase", sec_confusion),
    Section("memory", "Memory per class", sec_memory),
    Section("timings", "Timings", sec_timings),
    Section("pictures", "Method-specific pictures", sec_pictures),
)

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5em auto;max-width:1100px;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}h3{font-size:1.05em}
section.run{margin-top:2.5em}nav a{margin-right:.8em}img{max-width:100%;height:auto;display:block;margin:.5em 0}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}td,th{border:1px solid #ddd;padding:.2em .6em;text-align:right}
td:first-child,th:first-child{text-align:left}pre{background:#f6f6f6;padding:.8em;overflow:auto;font-size:.8em;max-height:30em}
.missing{color:#777;font-style:italic}figure{margin:0 0 1em 0}figcaption{font-size:.8em;color:#555}
#img-status{font-size:.8em;color:#555}
"""

# Marks <body data-images="N/M"> once the page has loaded: N of its M images decoded (complete, with
# naturalWidth > 0; a broken image has none). Read by the headless-browser test; a person sees the
# same count at the top of the page.
SCRIPT = """
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var n = imgs.filter(function (im) { return im.complete && im.naturalWidth > 0; }).length;
  document.body.setAttribute("data-images", n + "/" + imgs.length);
  document.getElementById("img-status").textContent = n + " of " + imgs.length + " images decoded";
});
"""

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"


def run_title(run: "Run") -> str:
    data = (run.config.get("data") or {}).get("dataset", "?")
    seed = f", seed {run.seed}" if run.seed is not None else ""
    return f"{run.method} on {data}{seed} ({run.path})"


def render_run(run: "Run", index: int) -> str:
    parts = [f'<section class="run" id="run{index}"><h2>{html.escape(run_title(run))}</h2>']
    for s in SECTIONS:
        parts.append(f'<section id="run{index}-{s.key}" data-section="{s.key}"><h3>{html.escape(s.title)}</h3>'
                     f"{s.build(run)}</section>")
    return "".join(parts) + "</section>"


def curves_figure(groups: list["Group"], title: str = ""):
    """Top-1 on all seen classes after each phase, one line per group (CNN), its mean with a ±1
    std band when the group has several runs; the legend gives each average incremental accuracy."""
    import statistics

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=100)
    for g in groups:
        c = curve(g)
        if c is None:
            continue
        n = f", {len(g.runs)} runs" if len(g.runs) > 1 else ""
        line, = ax.plot(c.classes_seen, c.mean, "o-", ms=3.5, label=f"{g.label} ({statistics.mean(c.mean):.1f}{n})")
        if len(g.runs) > 1:
            ax.fill_between(c.classes_seen, [m - s for m, s in zip(c.mean, c.std)],
                            [m + s for m, s in zip(c.mean, c.std)], color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel("classes seen")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return fig


def curves_plot(groups: list["Group"], path: Path, title: str = "") -> None:
    """``compare.png`` / a seed directory's ``accuracy.png``: ``curves_figure`` as a PNG file."""
    Path(path).write_bytes(_png(curves_figure(groups, title)))


def render_comparison(groups: list["Group"]) -> str:
    """Several runs: the comparison table and the overlaid curves first."""
    groups = unique_labels(groups)
    head, rows = table_rows(groups)
    return (f'<section id="comparison" data-section="comparison"><h2>Comparison</h2>'
            f"{table(head, rows)}{img(_png(curves_figure(groups)), 'accuracy curves of all runs, mean ± std')}"
            "</section>")


def render_html(groups: list["Group"]) -> str:
    """The whole page for ``groups`` (each group's runs in turn)."""
    runs = [r for g in groups for r in g.runs]
    methods = ", ".join(dict.fromkeys(r.method for r in runs))
    datasets = ", ".join(dict.fromkeys(str((r.config.get("data") or {}).get("dataset", "?")) for r in runs))
    title = f"cilearn report: {methods} on {datasets}"
    nav = "".join(f'<a href="#run{i}">{html.escape(run_title(r).split(" (")[0])}</a>' for i, r in enumerate(runs))
    body = [f"<h1>{html.escape(title)}</h1>", f'<p id="img-status">images not checked yet</p><nav>{nav}</nav>']
    if len(runs) > 1:
        body.append(render_comparison(groups))
    body += [render_run(r, i) for i, r in enumerate(runs)]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>\n"
            f'<body data-images="pending">{"".join(body)}<script>{SCRIPT}</script></body></html>\n')


def html_report(run_dirs: list[str | Path], out: str | Path | None = None) -> Path:
    """``cilearn report RUN_DIR... --html OUT``: one self-contained HTML file for the runs (a run
    directory, or a seed directory of ``cilearn run --seeds``). ``out`` defaults to
    ``RUN_DIR/report.html`` for a single directory."""
    if not run_dirs:
        raise ConfigError("cilearn report needs at least one run directory")
    if out is None:
        if len(run_dirs) > 1:
            raise ConfigError("--html OUT.html is needed with several run directories")
        out = Path(run_dirs[0]) / "report.html"
    groups = [load_group(d) for d in run_dirs]
    path = Path(out)
    if path.parent and not path.parent.is_dir():
        raise ConfigError(f"--html {path}: the directory {path.parent} does not exist")
    atomic_write(path, render_html(groups))
    return path


# ---------------------------------------------------------------- summaries and comparisons
def write_seed_summary(path: str | Path, seeds: list[int] | None = None) -> Group:
    """(Re)write ``summary.json``, ``summary.md`` and ``accuracy.png`` (mean ± std band) of a seed
    directory from its ``seed-*/`` runs; returns the group."""
    d = Path(path)
    group = load_group(d, seeds=seeds)
    atomic_write(d / "summary.md", seed_markdown(group))
    curves_plot([group], d / "accuracy.png", f"{group.label}, mean ± std over {len(group.runs)} seeds")
    atomic_write(d / "summary.json", json.dumps(seed_summary(group), indent=2))
    return group


def write_compare(groups: list[Group], out: str | Path, title: str = "") -> Comparison:
    """``compare.md``, ``compare.csv`` and ``compare.png`` (the overlaid curves) in ``out``."""
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    groups = unique_labels(groups)
    md, table = markdown_table(groups), csv_table(groups)
    atomic_write(d / "compare.md", md + "\n")
    atomic_write(d / "compare.csv", table)
    curves_plot(groups, d / "compare.png", title)
    return Comparison(groups, md, table, d)


def compare_dirs(dirs: list[str | Path], out: str | Path, labels: list[str] | None = None) -> Comparison:
    """``cilearn compare RUN_DIR...``: each directory (a run or a seed directory) is one row."""
    if labels is not None and len(labels) != len(dirs):
        raise ConfigError(f"--labels gives {len(labels)} labels for {len(dirs)} run directories")
    groups = [load_group(d, labels[i] if labels else None) for i, d in enumerate(dirs)]
    return write_compare(groups, out, protocol_title(groups[0].runs[0]))
