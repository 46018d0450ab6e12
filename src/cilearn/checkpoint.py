"""Atomic, checksummed checkpoints and the run-state bookkeeping for ``--resume``.

Two files in the run directory:

* ``checkpoint-phase.pt``: written after every phase. The model, the exemplar memory, the RNG
  states, the metrics so far and the index of the next phase. Enough to start that phase.
* ``checkpoint-epoch.pt``: written every ``--checkpoint-every`` epochs inside a phase and when the
  run is interrupted (SIGINT/SIGTERM) mid-phase: the model, the optimizer, the position in the
  epoch (its permutation and step), the RNG states. It belongs to the phase after the one in
  ``checkpoint-phase.pt`` and needs that file (the memory and the phase-start model live there).

File format: 8-byte magic, 8-byte payload length, 32-byte SHA-256 of the payload, payload
(``torch.save`` bytes). Written to a temporary file, fsynced, renamed over the old one and the
directory fsynced: a crash at any moment leaves either the old or the new file, never a torn one;
a truncated or corrupted file is detected on load.
"""
from __future__ import annotations

import hashlib
import io
import os
import signal
import struct
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import CilearnError

MAGIC = b"CILCKPT1"
PHASE_FILE = "checkpoint-phase.pt"
EPOCH_FILE = "checkpoint-epoch.pt"


class CheckpointError(CilearnError):
    """A checkpoint could not be written or read."""


class Interrupted(CilearnError):
    """SIGINT/SIGTERM: a checkpoint was written and the run stopped."""

    def __init__(self, msg: str, signum: int):
        super().__init__(msg)
        self.signum = signum


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(MAGIC + struct.pack("<Q", len(payload)) + hashlib.sha256(payload).digest())
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise CheckpointError(f"cannot write checkpoint {path}: {e.strerror or e}; "
                              "the previous checkpoint is kept") from None


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    head = 8 + 8 + 32
    if len(data) < head or data[:8] != MAGIC:
        raise CheckpointError(f"checkpoint {path} is not a cilearn checkpoint (bad header)")
    (n,) = struct.unpack("<Q", data[8:16])
    payload = data[head:]
    if len(payload) != n:
        raise CheckpointError(f"checkpoint {path} is truncated: {len(payload)} of {n} payload bytes")
    if hashlib.sha256(payload).digest() != data[16:head]:
        raise CheckpointError(f"checkpoint {path} is corrupt: checksum mismatch")
    try:
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001  (any unpickling failure is a corrupt file)
        raise CheckpointError(f"checkpoint {path} cannot be loaded: {str(e).splitlines()[0]}") from None


def rng_state(gen: torch.Generator) -> dict[str, Any]:
    st = {"gen": gen.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(gen: torch.Generator, st: dict[str, Any]) -> None:
    gen.set_state(st["gen"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


class Checkpointer:
    """What the training loop sees: where to save, how often, whether a stop was requested,
    (when resuming mid-phase) where to continue, and who is told each epoch's losses
    (``on_epoch``, e.g. ``--tensorboard``). ``out=None`` disables checkpoints."""

    def __init__(self, out: Path | None, every: int, gen: torch.Generator):
        self.out, self.every, self.gen = out, every, gen
        self.phase = 0
        # on_epoch(phase, stage, epoch (0-based), stage's epochs, {"loss": mean, term: mean, "lr": last})
        self.on_epoch: Callable[[int, str, int, int, dict[str, float]], None] | None = None
        self.resume_fit: dict[str, Any] | None = None   # fit state of the stage to continue
        self.stop_signal: int | None = None
        self._old_handlers: dict[int, Any] = {}

    # -- signals: finish the current step, checkpoint, stop
    def install_signal_handlers(self) -> None:
        def handler(signum, frame):
            self.stop_signal = signum
            # a second Ctrl-C stops at once
            signal.signal(signum, self._old_handlers.get(signum, signal.SIG_DFL))
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old_handlers[s] = signal.signal(s, handler)
            except ValueError:   # not in the main thread
                return

    def restore_signal_handlers(self) -> None:
        for s, h in self._old_handlers.items():
            try:
                signal.signal(s, h)
            except ValueError:
                pass
        self._old_handlers = {}

    def end_epoch(self, stage: str, epoch: int, epochs: int, scalars: dict[str, float]) -> None:
        """Called by ``fit`` once per finished epoch of the stage ``stage``."""
        if self.on_epoch is not None:
            self.on_epoch(self.phase, stage, epoch, epochs, scalars)

    @property
    def stop_requested(self) -> bool:
        return self.stop_signal is not None

    # -- inside a phase
    def take_resume(self, desc: str) -> dict[str, Any] | None:
        """The saved fit state if the stage ``desc`` is the one being resumed."""
        if self.resume_fit is not None and self.resume_fit["desc"] == desc:
            st, self.resume_fit = self.resume_fit, None
            return st
        return None

    def skip_stage(self, desc: str) -> bool:
        """While resuming a later stage of this phase, earlier stages are already done."""
        return self.resume_fit is not None and self.resume_fit["desc"] != desc

    def save_fit(self, net: torch.nn.Module, fit_state: dict[str, Any]) -> None:
        if self.out is None:
            return
        save_checkpoint(self.out / EPOCH_FILE, {"kind": "epoch", "phase": self.phase, "fit": fit_state,
                                                "net": net.state_dict(), "rng": rng_state(self.gen),
                                                "method": self.method_state()})

    def method_state(self) -> dict[str, Any]:
        return {}   # replaced by the runner with the method's state_dict

    def interrupted(self, where: str) -> Interrupted:
        name = signal.Signals(self.stop_signal).name if self.stop_signal else "signal"
        if self.out is None:
            return Interrupted(f"interrupted by {name} in {where}; no checkpoint (checkpoints are off)",
                               self.stop_signal or signal.SIGINT)
        return Interrupted(f"interrupted by {name} in {where}; checkpoint written to {self.out}; "
                           f"resume with: cilearn run --resume {self.out}", self.stop_signal or signal.SIGINT)

    def kept_note(self) -> str:
        if self.out is None or not ((self.out / PHASE_FILE).exists() or (self.out / EPOCH_FILE).exists()):
            return ""
        return f"; the last good checkpoint is kept in {self.out}"

    def save_phase(self, state: dict[str, Any]) -> None:
        if self.out is None:
            return
        save_checkpoint(self.out / PHASE_FILE, {"kind": "phase", "rng": rng_state(self.gen), **state})
        (self.out / EPOCH_FILE).unlink(missing_ok=True)   # it belonged to the phase just finished
