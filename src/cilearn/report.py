"""Plots (matplotlib, imported lazily, Agg backend)."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def accuracy_plot(metrics: dict[str, Any], path: Path) -> None:
    """Top-1 on all seen classes after each phase, CNN and (when present) NME."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = metrics["phases"]
    seen = [r["classes_seen"] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    ax.plot(seen, [r["acc"] for r in rows], "o-", label=f"CNN (avg {metrics['avg_incremental_acc']:.1f})")
    if metrics.get("avg_incremental_acc_nme") is not None:
        ax.plot(seen, [r["acc_nme"] for r in rows], "s--", label=f"NME (avg {metrics['avg_incremental_acc_nme']:.1f})")
    ax.set_xlabel("classes seen")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def tsne_plot(ctx, phase, data, before: dict | None, per_class: int = 100) -> None:
    """``--save-tsne``: ``tsne-phase<i>.png`` in the run directory, a t-SNE (scikit-learn) of the
    embeddings of up to ``per_class`` test images of every seen class (light dots) with the
    exemplars in memory (large dots, black edge), as Figure 1 of the Mnemonics paper. With an
    exemplar optimizer, two panels share one t-SNE: the exemplars as selected before this
    phase's optimisation (new classes: the selection rule's, herding by default) and after it."""
    import numpy as np
    import torch

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
    emb = ctx.embed(ctx.net, torch.cat([x.float() for x in xs])).cpu().numpy()          # [N, D], one pass
    order = ctx.cfg.scenario.class_order
    tsne_figure(emb, torch.cat(ys).cpu().numpy(), len(keep), panels, [order[c] for c in range(phase.end)],
                ctx.out / f"tsne-phase{phase.index}.png", f"phase {phase.index}: {phase.end} classes, seed {ctx.cfg.seed}")


def tsne_figure(emb, labels, n_test: int, panels: list[tuple[str, int]], names: list[int], path: Path,
                title: str) -> None:
    """One t-SNE of ``emb [N, D]`` (rows: ``n_test`` test embeddings, then each panel's exemplars
    in turn, ``panels``: (title, count)), drawn as one subplot per panel: all test points light,
    that panel's exemplars dark with a black edge; colour = ``labels [N]`` (incremental ids),
    legend = ``names`` (original class ids)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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
