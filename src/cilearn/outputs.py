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
    st = memory.optimizer.stats if memory.optimizer is not None else {}
    if st:      # an exemplar optimizer ran: its pixel change (grey levels: optimised floats, stored images), seconds
        row["exemplar_pixel_change"], row["exemplar_optimizer_seconds"] = st.get("exemplar_pixel_change"), st["seconds"]
        row["exemplar_stored_pixel_change"] = st.get("exemplar_stored_pixel_change")
    if memory.compressor is not None:
        row["compressor"] = dict(memory.compressor.stats)
    return row


def summarize(evals: list[PhaseEval], rows: list[dict], memory: Memory | None, wall: float,
              class_order: list[int] | None = None, class_names: list[str] | None = None) -> dict[str, Any]:
    """metrics.json. Besides the summary (CNN, NME and task-aware ``_task``, ``cilearn.evaluate``):
    ``confusion`` (the last phase's ``[true][predicted]`` counts, incremental ids), ``class_order``
    (incremental id -> data set label), ``class_names`` (incremental id -> the data set's name of
    that label), ``warnings`` (every phase's, ``cilearn.health``: the run was not learning) and, in
    ``memory``, ``class_images`` / ``class_bytes`` (exemplars and bytes of each class id)."""
    matrix = [e.task_acc for e in evals]
    nme = [e.acc_nme for e in evals]
    has_nme = all(v is not None for v in nme)
    task = [e.acc_task for e in evals]
    has_task = all(v is not None for v in task)    # (None in phases of a run resumed from an older cilearn)
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
        "avg_incremental_acc_task": average_incremental_accuracy(task) if has_task else None,
        "last_acc_task": task[-1] if has_task else None,
        "accuracy_matrix_task": [e.task_acc_task for e in evals] if has_task else None,
        "phases": rows,
        "memory": {"per_class": per_class, "total_images": len(memory) if memory else 0,
                   "total_bytes": memory.nbytes if memory else 0,
                   "class_images": [len(stored[c]) if c in stored else 0 for c in range(seen)],
                   "class_bytes": [memory.class_bytes(c) if c in stored else 0 for c in range(seen)],
                   **memory_units(memory, seen)},
        "wall_seconds": wall,
        "confusion": confusion,
        "class_order": list(class_order) if class_order is not None else None,
        "class_names": list(class_names) if class_names is not None else None,
        "warnings": warnings,
        **other_networks(rows),
    }


def other_accuracies(row: dict[str, Any]) -> dict[str, float | None]:
    """A phase row's accuracies of networks other than the evaluated one (a component's diagnostic
    named ``<network>_acc``, e.g. ``student_acc``: FOSTER's compressed student)."""
    return {k: v for k, v in row.items() if k.endswith("_acc") and k != "acc" and (v is None or isinstance(v, float))}


def other_networks(rows: list[dict]) -> dict[str, float]:
    """``avg_incremental_acc_<network>`` for each ``<network>_acc`` of the rows (``other_accuracies``),
    the mean over the phases of that network's accuracy, the evaluated network's ``acc`` in a phase
    that has none (e.g. phase 0, before there is a student to compress)."""
    keys = sorted({k for r in rows for k, v in other_accuracies(r).items() if v is not None})
    return {f"avg_incremental_acc_{k[:-4]}": average_incremental_accuracy(
        [r[k] if r.get(k) is not None else r["acc"] for r in rows]) for k in keys}


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
    cols = ["phase", "classes_seen", "acc", "acc_task", "acc_nme", "acc_old", "acc_new", "top5", "train_seconds",
            "finetune_seconds", "train_images_per_s"]
    lines = [",".join(cols)] + [",".join("" if r.get(c) is None else (f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c]))
                                         for c in cols) for r in metrics["phases"]]
    atomic_write(out / "metrics.csv", "\n".join(lines) + "\n")
    events.on_complete(out, metrics)                                    # figures (accuracy.png)
    atomic_write(out / "metrics.json", json.dumps(metrics, indent=2))   # last: marks the run complete
