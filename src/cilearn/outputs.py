"""What a finished phase and a finished run write: the per-phase metrics row's memory figures,
the run's summary (``metrics.json``: accuracy matrix, average incremental accuracy, forgetting,
memory), ``metrics.csv``, and the ``Results`` the API returns. ``metrics.json`` is written last
(atomically): a directory without it is not a finished run.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import RunConfig
from .evaluate import PhaseEval, average_incremental_accuracy, forgetting
from .events import NULL, Observer
from .files import atomic_write
from .memory import Memory

@dataclass
class Results:
    metrics: dict[str, Any]
    out_dir: Path
    config: RunConfig

    @property
    def accuracy_matrix(self) -> list[list[float]]:
        return self.metrics["accuracy_matrix"]

    @property
    def avg_incremental_acc(self) -> float:
        return self.metrics["avg_incremental_acc"]

    @property
    def last_acc(self) -> float:
        return self.metrics["last_acc"]

def memory_row(memory: Memory | None) -> dict[str, Any]:
    """Per-phase memory figures for the metrics rows: exemplars and bytes stored, with a compressor
    its statistics (e.g. a compressor's losses and mask means)."""
    if memory is None:
        return {}
    row = {"memory_images": len(memory), "memory_bytes": memory.nbytes}
    st = memory.optimizer.stats
    if st:      # an exemplar optimizer ran: its pixel change (grey levels: optimised floats, stored images), seconds
        row["exemplar_pixel_change"], row["exemplar_optimizer_seconds"] = st.get("exemplar_pixel_change"), st["seconds"]
        row["exemplar_stored_pixel_change"] = st.get("exemplar_stored_pixel_change")
    if memory.compressor is not None:
        row["compressor"] = dict(memory.compressor.stats)
    return row


def summarize(evals: list[PhaseEval], rows: list[dict], memory: Memory | None, wall: float,
              class_order: list[int] | None = None) -> dict[str, Any]:
    """metrics.json. Besides the summary: ``confusion`` (the last phase's ``[true][predicted]``
    counts, incremental ids), ``class_order`` (incremental id -> data set label), ``warnings`` (every
    phase's, ``cilearn.health``: the run was not learning) and, in
    ``memory``, ``class_images`` / ``class_bytes`` (exemplars and bytes of each class id)."""
    matrix = [e.task_acc for e in evals]
    nme = [e.acc_nme for e in evals]
    has_nme = all(v is not None for v in nme)
    per_class = 0
    if memory is not None and memory.exemplars:
        per_class = max(len(v) for v in memory.exemplars.values())
    seen, stored = rows[-1]["classes_seen"], (memory.exemplars if memory is not None else {})
    confusion = rows[-1].get("confusion")
    warnings = [w for r in rows for w in r.get("warnings", [])]
    rows = [{k: v for k, v in r.items() if k not in ("confusion", "warnings")} for r in rows]
    return {
        "avg_incremental_acc": average_incremental_accuracy([e.acc for e in evals]),
        "last_acc": evals[-1].acc,
        "forgetting": forgetting(matrix),
        "avg_incremental_acc_nme": average_incremental_accuracy(nme) if has_nme else None,
        "last_acc_nme": nme[-1] if has_nme else None,
        "accuracy_matrix": matrix,
        "accuracy_matrix_nme": [e.task_acc_nme for e in evals] if has_nme else None,
        "phases": rows,
        "memory": {"per_class": per_class, "total_images": len(memory) if memory else 0,
                   "total_bytes": memory.nbytes if memory else 0,
                   "class_images": [len(stored[c]) if c in stored else 0 for c in range(seen)],
                   "class_bytes": [memory.class_bytes(c) if c in stored else 0 for c in range(seen)],
                   **memory_units(memory, seen)},
        "wall_seconds": wall,
        "confusion": confusion,
        "class_order": list(class_order) if class_order is not None else None,
        "warnings": warnings,
    }


def memory_units(memory: Memory | None, seen: int) -> dict[str, Any]:
    """The budget in full-image units (one unit: one uncompressed image's bytes): each class's
    stored bytes in units and the share per class, with the compressor's name."""
    unit = memory.unit_bytes() if memory is not None else None
    if unit is None:
        return {}
    return {"compressor": "none" if memory.compressor is None else memory.compressor.name,
            "unit_bytes": unit, "share_units": memory.budget.share(seen),
            "class_units": [round(memory.class_bytes(c) / unit, 4) for c in range(seen)]}


def write_outputs(out: Path, metrics: dict[str, Any], events: Observer = NULL) -> None:
    cols = ["phase", "classes_seen", "acc", "acc_nme", "acc_old", "acc_new", "top5", "train_seconds",
            "finetune_seconds", "train_images_per_s"]
    lines = [",".join(cols)] + [",".join("" if r.get(c) is None else (f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c]))
                                         for c in cols) for r in metrics["phases"]]
    atomic_write(out / "metrics.csv", "\n".join(lines) + "\n")
    events.on_complete(out, metrics)                                    # figures (accuracy.png)
    atomic_write(out / "metrics.json", json.dumps(metrics, indent=2))   # last: marks the run complete
