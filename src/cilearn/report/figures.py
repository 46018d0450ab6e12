"""Figures of finished runs, drawn from ``metrics.json`` alone (matplotlib, imported lazily, Agg
backend): ``accuracy.png``, the HTML report's plots (PNG bytes), the overlaid curves of
``compare.png`` and of a seed directory's ``accuracy.png``."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from ..evaluate import class_forgetting
from ..results import Group, curve


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

def _png(fig) -> bytes:
    plt = _pyplot()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def class_names(m: dict[str, Any], k: int) -> list[str]:
    """Names of incremental ids ``0..k-1``: ``metrics["class_names"]``, else (a run from before
    names were recorded) the data set labels (``metrics["class_order"]``), else the ids."""
    names = m.get("class_names") or m.get("class_order") or list(range(k))
    return [str(names[c]) if c < len(names) else str(c) for c in range(k)]


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


