"""Checkpoints, resume, interruption, divergence, determinism and hostile input around runs."""
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import cilearn
from cilearn.checkpoint import EPOCH_FILE, PHASE_FILE, CheckpointError, load_checkpoint, save_checkpoint
from cilearn.cli import main

# 4 phases (4 + 2 + 2 + 2 classes of digits), enough epochs to be killed inside a phase
ARGS = ["--base", "4", "--increment", "2", "--epochs", "25", "--checkpoint-every", "1", "--no-progress", "--quiet"]


def cli(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, err


@pytest.fixture(scope="module")
def reference_matrix(tmp_path_factory):
    """The uninterrupted run's accuracy matrix (one run for the module's resume tests)."""
    out = tmp_path_factory.mktemp("ref") / "ref"
    assert main(["run", *ARGS, "--out", str(out)]) == 0
    return json.loads((out / "metrics.json").read_text())["accuracy_matrix"]


def start(out: Path) -> subprocess.Popen:
    """The run in a child process with this process's thread count: the child's phases and the
    in-process resume must compute alike (float sums depend on the number of threads)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    return subprocess.Popen([sys.executable, "-m", "cilearn", "run", *ARGS, "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_inside_phase(out: Path, phase: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until an in-phase checkpoint of ``phase`` exists (so the run is inside that phase)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        assert proc.poll() is None, proc.communicate()
        f = out / EPOCH_FILE
        if f.exists():
            try:
                if load_checkpoint(f)["phase"] == phase:
                    return
            except CheckpointError:
                pass   # being replaced right now
        time.sleep(0.05)
    raise AssertionError("the run never reached the phase")


def test_sigkill_mid_phase_then_resume_gives_the_same_matrix(tmp_path, capsys, reference_matrix):
    ref = reference_matrix
    out = tmp_path / "killed"
    proc = start(out)
    wait_inside_phase(out, 1, proc)   # phase 2 of 4
    time.sleep(0.3)
    proc.kill()
    proc.wait()
    assert not (out / "metrics.json").exists()
    assert load_checkpoint(out / PHASE_FILE)["next_phase"] == 1
    code, err = cli(capsys, "run", "--resume", str(out), "--no-progress", "--quiet")
    assert code == 0, err
    got = json.loads((out / "metrics.json").read_text())["accuracy_matrix"]
    assert got == ref                     # bit-identical on the CPU
    assert "resumed" in (out / "log.txt").read_text()


def test_sigint_writes_checkpoint_says_how_to_resume_and_resumes_exactly(tmp_path, capsys, reference_matrix):
    ref = reference_matrix
    out = tmp_path / "int"
    proc = start(out)
    wait_inside_phase(out, 2, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT
    assert f"resume with: cilearn run --resume {out}" in err and "SIGINT" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    st = load_checkpoint(out / EPOCH_FILE)
    assert st["phase"] == 2 and "opt" in st["fit"]
    assert cli(capsys, "run", "--resume", str(out), "--no-progress", "--quiet")[0] == 0
    assert json.loads((out / "metrics.json").read_text())["accuracy_matrix"] == ref


def test_sigterm_also_checkpoints(tmp_path):
    out = tmp_path / "term"
    proc = start(out)
    wait_inside_phase(out, 1, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM and "SIGTERM" in err
    assert (out / EPOCH_FILE).exists() and not (out / "metrics.json").exists()


def test_nan_loss_stops_naming_phase_and_epoch_and_keeps_checkpoint(tmp_path, capsys):
    out = tmp_path / "nan"
    code, err = cli(capsys, "run", "--base", "4", "--increment", "2", "--epochs", "3", "--base-lr", "0.1",
                    "--lr", "1e30", "--out", str(out), "--no-progress", "--quiet")
    assert code == 2 and "phase 1" in err and "epoch" in err and "nan" in err.lower()
    assert "last good checkpoint" in err and len(err.strip().splitlines()) == 1
    assert load_checkpoint(out / PHASE_FILE)["next_phase"] == 1
    assert not (out / "metrics.json").exists()


def test_full_disk_while_checkpointing(tmp_path, capsys, monkeypatch):
    import cilearn.checkpoint as ck
    real_fsync, calls = os.fsync, {"n": 0}

    def fsync(fd):
        calls["n"] += 1
        if calls["n"] > 2:    # the first checkpoint (file + directory) succeeds, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)
    monkeypatch.setattr(ck.os, "fsync", fsync)
    out = tmp_path / "full"
    code, err = cli(capsys, "run", "--base", "4", "--increment", "2", "--epochs", "2", "--checkpoint-every", "0",
                    "--out", str(out), "--no-progress", "--quiet")
    assert code == 2 and "No space left on device" in err and PHASE_FILE in err
    assert load_checkpoint(out / PHASE_FILE)["next_phase"] == 1      # the previous checkpoint is intact
    assert not list(out.glob("*.tmp")) and not (out / "metrics.json").exists()


def test_checkpoint_truncated_or_corrupt_is_detected(tmp_path):
    f = tmp_path / "c.pt"
    save_checkpoint(f, {"a": torch.arange(100)})
    assert torch.equal(load_checkpoint(f)["a"], torch.arange(100))
    data = f.read_bytes()
    f.write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(f)
    f.write_bytes(data[:-10] + bytes(10))
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(f)
    f.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a cilearn checkpoint"):
        load_checkpoint(f)


def test_resume_with_unreadable_checkpoint(tmp_path, capsys):
    out = tmp_path / "r"
    assert cli(capsys, "run", "--epochs", "1", "--out", str(out), "--no-progress", "--quiet", "--keep-checkpoint")[0] == 0
    (out / "metrics.json").unlink()
    (out / PHASE_FILE).write_bytes((out / PHASE_FILE).read_bytes()[:100])
    code, err = cli(capsys, "run", "--resume", str(out))
    assert code == 2 and PHASE_FILE in err and "truncated" in err and len(err.strip().splitlines()) == 1


def test_resume_refusals(tmp_path, capsys):
    out = tmp_path / "r"
    assert cli(capsys, "run", "--epochs", "1", "--out", str(out), "--no-progress", "--quiet")[0] == 0
    code, err = cli(capsys, "run", "--resume", str(out))
    assert code == 2 and "already complete" in err
    code, err = cli(capsys, "run", "--resume", str(out), "--lr", "0.5")
    assert code == 2 and "--lr" in err
    code, err = cli(capsys, "run", "--resume", str(tmp_path / "nothing"))
    assert code == 2 and "config.yaml" in err


def test_out_dir_with_a_run_needs_resume_or_overwrite(tmp_path, capsys):
    out = tmp_path / "r"
    assert cli(capsys, "run", "--epochs", "1", "--out", str(out), "--no-progress", "--quiet")[0] == 0
    code, err = cli(capsys, "run", "--method", "lwf", "--epochs", "1", "--out", str(out))
    assert code == 2 and "--resume" in err and "--overwrite" in err
    assert cli(capsys, "run", "--method", "lwf", "--epochs", "1", "--out", str(out), "--overwrite",
               "--no-progress", "--quiet")[0] == 0
    assert "lwf" in (out / "config.yaml").read_text()


def test_stop_between_phases_then_resume_in_process(tmp_path, quick, monkeypatch):
    """A signal that arrives outside training (evaluation, memory update) stops the run after
    the phase checkpoint; resuming from there reproduces the matrix exactly."""
    from cilearn.checkpoint import Checkpointer, Interrupted
    ref = cilearn.run(quick(out=str(tmp_path / "a")), echo=False).accuracy_matrix
    real = Checkpointer.save_phase

    def save_then_signal(self, state):
        real(self, state)
        if state["next_phase"] == 2:
            self.stop_signal = signal.SIGTERM
    monkeypatch.setattr(Checkpointer, "save_phase", save_then_signal)
    b = tmp_path / "b"
    with pytest.raises(Interrupted, match="phase 1"):
        cilearn.run(quick(out=str(b)), echo=False)
    monkeypatch.setattr(Checkpointer, "save_phase", real)
    assert load_checkpoint(b / PHASE_FILE)["next_phase"] == 2 and not (b / EPOCH_FILE).exists()
    assert cilearn.resume(b, echo=False).accuracy_matrix == ref


@pytest.mark.parametrize("stage, named", [("phase 1 balanced-ft", "stage 'phase 1 balanced-ft'"),
                                          ("phase 1", "stage 'phase 1' (main training)")])
def test_resume_message_names_the_stage(tmp_path, quick, monkeypatch, capsys, stage, named):
    """Interrupted inside a stage of phase 1 (LUCIR: the main stage, then balanced fine-tuning), the
    resumed run says which stage and epoch it continues, as the epoch checkpoint records them."""
    from cilearn.checkpoint import Checkpointer, Interrupted
    cfg = quick(method="lucir", out=str(tmp_path / "r"), data={"dataset": "digits", "train_per_class": 20},
                scenario={"base": 0, "increment": 5},
                train={"epochs": 3, "finetune_epochs": 3, "progress": False, "precision": "fp32"})
    real = Checkpointer.end_epoch

    def end_epoch(self, desc, epoch, epochs, scalars):
        real(self, desc, epoch, epochs, scalars)
        if desc == stage and epoch == 0:
            self.stop_signal = signal.SIGTERM          # stops after the next training step
    monkeypatch.setattr(Checkpointer, "end_epoch", end_epoch)
    with pytest.raises(Interrupted, match=f"in {stage}, epoch 2"):
        cilearn.run(cfg, echo=False)
    monkeypatch.setattr(Checkpointer, "end_epoch", real)
    fit = load_checkpoint(tmp_path / "r" / EPOCH_FILE)["fit"]
    assert fit["desc"] == stage
    capsys.readouterr()
    cilearn.resume(tmp_path / "r", echo=True)
    where = f"at phase 1, {named}, epoch {fit['epoch'] + 1}" + (f", step {fit['step'] + 1}" if fit["step"] else "")
    assert f"resumed {tmp_path / 'r'} {where}\n" in capsys.readouterr().out
    assert f"resumed {tmp_path / 'r'} {where}\n" in (tmp_path / "r" / "log.txt").read_text()
