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
