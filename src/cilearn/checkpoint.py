"""Atomic, checksummed checkpoints and the run-state bookkeeping for ``--resume``.

Two files in the run directory:

* ``checkpoint-phase.pt``: written after every phase. The model, the exemplar memory, the RNG
  states, the metrics so far and the index of the next phase. Enough to start that phase.
* ``checkpoint-epoch.pt``: written every ``--checkpoint-every`` epochs inside a phase and when the
  run is interrupted (SIGINT/SIGTERM) mid-phase: the model, the optimizer, the position in the
  epoch (its permutation and step), the RNG states. It belongs to the phase after the one in
  ``checkpoint-phase.pt`` and needs that file (the memory and the phase-start model live there).

Both are resume state: a run that finishes deletes them (``remove_checkpoints``) unless
``--keep-checkpoint``; its final model is kept in ``model.safetensors`` (``cilearn.model_io``).

File format: 8-byte magic, 8-byte payload length, 32-byte SHA-256 of the payload, payload
(``torch.save`` bytes). Written to a temporary file, fsynced, renamed over the old one and the
directory fsynced: a crash at any moment leaves either the old or the new file, never a torn one;
a truncated or corrupted file is detected on load.

Loading never runs code from the file: a checkpoint may come from someone else (a shared run
directory), and the checksum proves integrity, not origin. The payload is read with
``torch.load(weights_only=True)``, PyTorch's restricted unpickler, which builds only tensors and
plain containers (dict, list, tuple, str, numbers, None) and refuses any other global before it is
called; cilearn's checkpoints hold nothing else. The structure is then checked against what
cilearn writes (``SCHEMA``: keys and their types), so a file with a missing or wrong-typed key is a
one-line ``CheckpointError`` naming the file and the key, not a traceback later.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import signal
import struct
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import CilearnError, one_line

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


def remove_checkpoints(out: Path) -> None:
    """Deletes a finished run's resume state (both files), which only ``--resume`` reads."""
    for f in (PHASE_FILE, EPOCH_FILE):
        (out / f).unlink(missing_ok=True)


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


def load_checkpoint(path: Path, kind: str | None = None) -> dict[str, Any]:
    """The state saved in ``path``, unpickled with ``weights_only=True`` (no code runs). ``kind``
    ("phase" or "epoch"): also check the structure against ``SCHEMA[kind]``."""
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
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (any unpickling failure is a corrupt or foreign file)
        text = str(e)
        if (m := re.search(r"[Uu]nsupported (?:global: )?GLOBAL ([\w.]+)", text)) is not None:
            raise CheckpointError(f"checkpoint {path} holds a pickle that calls {m.group(1)}, which cilearn never "
                                  "writes; refused without running it") from None
        raise CheckpointError(f"checkpoint {path} cannot be loaded: {text.splitlines()[0] if text else type(e).__name__}") from None
    if kind is not None:
        check_structure(state, SCHEMA[kind], path, kind)
    return state


_Number = (int, float)
_NoneType = type(None)
# What cilearn writes: key -> accepted type(s), or a nested schema for a dict; ``kind`` must match.
_RNG = {"gen": torch.Tensor, "torch": torch.Tensor}
SCHEMA: dict[str, dict[str, Any]] = {
    "phase": {"kind": str, "rng": _RNG, "next_phase": int, "num_classes": int, "net": dict,
              "memory": (dict, _NoneType), "method": dict, "evals": list, "rows": list, "wall_seconds": _Number},
    "epoch": {"kind": str, "phase": int, "net": dict, "rng": _RNG, "method": dict,
              "fit": {"desc": str, "epoch": int, "step": int, "perm": (torch.Tensor, _NoneType),
                      "total": torch.Tensor, "sums": dict, "opt": dict, "images": int, "seconds": _Number}},
}


def check_structure(state: Any, schema: dict[str, Any], path: Path, kind: str, where: str = "") -> None:
    """``CheckpointError`` (one line: file and key) unless ``state`` has every key of ``schema`` with
    a value of the listed type; the network's state must map names to tensors."""
    def fail(what: str) -> None:
        raise CheckpointError(f"checkpoint {path} is not a cilearn {kind} checkpoint: {what}; "
                              "it was not written by this version of cilearn or was edited")
    if not isinstance(state, dict):
        fail(f"{where or 'the payload'} is a {type(state).__name__}, expected a dict")
    for key, tp in schema.items():
        name = f"{where}{key}"
        if key not in state:
            fail(f"key '{name}' is missing")
        value = state[key]
        if isinstance(tp, dict):
            check_structure(value, tp, path, kind, name + ".")
        elif not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            fail(f"key '{name}' is a {type(value).__name__}")
    if not where:
        if state["kind"] != kind:
            fail(f"its kind is '{state['kind']}'")
        if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state["net"].items()):
            fail("key 'net' does not map parameter names to tensors")


@contextlib.contextmanager
def restoring(path: Path):
    """Around the code that puts a loaded checkpoint's state back into the model, memory, method or
    optimizer: a state that passed ``check_structure`` but does not fit what this run builds (a
    shape, a missing entry deeper down, an edited ``config.yaml``) is a one-line ``CheckpointError``
    naming the file, not a traceback."""
    try:
        yield
    except CheckpointError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {path} does not fit this run ({type(e).__name__}: {one_line(e)[:300]}); "
                              "it was not written by this run's configuration or was edited") from None


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
        self.net: torch.nn.Module | None = None     # the run's network: what an epoch checkpoint holds
        self.phase = 0
        # on_epoch(phase, stage, epoch (0-based), stage's epochs, {"loss": mean, term: mean, "lr": last})
        self.on_epoch: Callable[[int, str, int, int, dict[str, float]], None] | None = None
        self.resume_fit: dict[str, Any] | None = None   # fit state of the stage to continue
        # this phase's stages: {stage: [first epoch's mean loss, last epoch's]} (``cilearn.health``);
        # in the epoch checkpoints, so that a run resumed inside a stage still has its first epoch's
        self.losses: dict[str, list[float]] = {}
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
        if epoch == 0:
            self.losses[stage] = [scalars["loss"], scalars["loss"]]
        elif stage in self.losses:
            self.losses[stage][1] = scalars["loss"]
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

    def restoring(self):
        """``restoring`` for the epoch checkpoint whose stage ``fit`` continues."""
        return restoring(self.out / EPOCH_FILE if self.out is not None else Path(EPOCH_FILE))

    def skip_stage(self, desc: str) -> bool:
        """While resuming a later stage of this phase, earlier stages are already done."""
        return self.resume_fit is not None and self.resume_fit["desc"] != desc

    def save_fit(self, net: torch.nn.Module, fit_state: dict[str, Any]) -> None:
        """The epoch checkpoint: the run's network (``self.net``; ``net``, the stage's, when unset),
        the fit position, the RNG and the components' state (a stage's own network among them)."""
        if self.out is None:
            return
        net = self.net if self.net is not None else net
        save_checkpoint(self.out / EPOCH_FILE, {"kind": "epoch", "phase": self.phase, "fit": fit_state,
                                                "net": net.state_dict(), "rng": rng_state(self.gen),
                                                "method": self.method_state(), "losses": self.losses})

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
        self.losses = {}                                  # the next phase's stages
        if self.out is None:
            return
        save_checkpoint(self.out / PHASE_FILE, {"kind": "phase", "rng": rng_state(self.gen), **state})
        (self.out / EPOCH_FILE).unlink(missing_ok=True)   # it belonged to the phase just finished
