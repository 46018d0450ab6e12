"""``--tensorboard``: scalars of a run in ``RUN_DIR/tensorboard/`` (``tensorboard --logdir RUN_DIR``).

* per epoch, for each training stage: the mean loss and the mean of each loss term over the
  epoch, and the learning rate at the epoch's last step. Tags ``train/<term>`` for the main
  stage of each phase, ``<stage>/<term>`` for the others (``balanced-ft``, ``compression``);
  step: the epoch's index in the run, 1-based, counted over the phases (the main stage: the
  base phase's epochs, then each phase's; the other stages run in phases > 0 only), so a
  resumed run writes the same steps as an uninterrupted one.
* per phase: ``phase/<metric>`` (``acc``, ``acc_task``, ``acc_nme``, ``acc_old``, ``acc_new``, ``top5``,
  ``train_seconds``, ...), step: the phase index.

``torch.utils.tensorboard`` (the ``tensorboard`` package) is imported only when the flag is given.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import ConfigError

PHASE_SCALARS = ("acc", "acc_task", "acc_nme", "acc_old", "acc_new", "acc_old_among_old", "acc_new_among_new", "top5",
                 "train_seconds", "finetune_seconds", "train_images_per_s")


def summary_writer_class():
    """``torch.utils.tensorboard.SummaryWriter``, or a ConfigError saying what to install."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("--tensorboard needs the tensorboard package: pip install tensorboard "
                          "(or pip install 'cilearn[tensorboard]')") from None
    return SummaryWriter


def epoch_step(stage: str, phase: int, epoch: int, epochs: int, base_epochs: int) -> tuple[str, int]:
    """(tag prefix, 1-based step in the run) of epoch ``epoch`` (0-based) of stage ``stage``
    (``"phase 3"``, ``"phase 3 balanced-ft"``) run with ``epochs`` epochs; ``base_epochs``: the
    first phase's main-stage epochs."""
    kind = stage.split(" ", 2)[2] if stage.count(" ") >= 2 else "train"
    if kind == "train":
        done = 0 if phase == 0 else base_epochs + (phase - 1) * epochs
    else:
        done = max(phase - 1, 0) * epochs
    return kind.replace(" ", "-"), done + epoch + 1


class TensorBoardLog:
    """Writes the scalars above; ``on_epoch`` plugs into ``Checkpointer.on_epoch``."""

    def __init__(self, out: Path, base_epochs: int):
        self.writer = summary_writer_class()(log_dir=str(out / "tensorboard"))
        self.base_epochs = base_epochs

    def on_epoch(self, phase: int, stage: str, epoch: int, epochs: int, scalars: dict[str, float]) -> None:
        prefix, step = epoch_step(stage, phase, epoch, epochs, self.base_epochs)
        for name, value in scalars.items():
            self.writer.add_scalar(f"{prefix}/{name}", value, step)

    def on_phase(self, row: dict[str, Any]) -> None:
        for name in PHASE_SCALARS:
            if isinstance(row.get(name), (int, float)):
                self.writer.add_scalar(f"phase/{name}", row[name], row["phase"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
