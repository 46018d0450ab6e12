"""What a run tells the layers above the engine while it runs (core layer: no cilearn imports).

The engine (``cilearn.runner``, ``cilearn.train``) and the components call an ``Observer``; the
reporting layer (``cilearn.report``: figures, TensorBoard) implements one, and ``cilearn.api``
hands it to the run. So no component and no engine module imports a plotting library or the
reporting code: figures are drawn from these events, on the process that writes (rank 0).
Every hook is a no-op here; an observer overrides the ones it needs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any


class Observer:
    def on_start(self, run: Any) -> None:
        """Once the run's objects exist (``cilearn.runner.RunView``: config, output directory,
        network, memory, augmentation, data), before the first phase."""

    def on_epoch(self, phase: int, stage: str, epoch: int, epochs: int, scalars: dict[str, float]) -> None:
        """After each epoch of a training stage: ``scalars`` = the epoch's mean loss, the mean of
        each loss term, and the lr of its last step."""

    def on_memory(self, phase: Any, originals: dict, selected: dict | None) -> None:
        """After a phase's memory update: ``originals`` = the new exemplars as selected (before any
        compression), ``selected`` = all exemplars before an exemplar optimizer changed them (None
        without one)."""

    def wants(self, kind: str) -> int:
        """How many images per row ``on_images(kind, ...)`` draws (0: not drawn): a component computes
        the images of a figure only when someone draws them (kind: ``samples``)."""
        return 0

    def on_images(self, kind: str, phase: int, data: dict[str, Any]) -> None:
        """A component's images of a phase for a figure: ``samples`` (``images`` uint8
        ``[rows * cols, C, H, W]``, ``rows``, ``cols``, ``labels``)."""

    def on_phase(self, row: dict[str, Any]) -> None:
        """After a phase's evaluation: its row of ``metrics.json``."""

    def on_complete(self, out: Path, metrics: dict[str, Any]) -> None:
        """Before ``metrics.json`` (the mark of a complete run) is written."""

    def close(self) -> None:
        """At the end of the run, whether it completed or not."""


NULL = Observer()
