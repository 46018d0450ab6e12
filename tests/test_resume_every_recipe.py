"""Every registered recipe resumes exactly (registry-driven): a run stopped at a phase boundary,
resumed, stopped again inside the next phase's first stage and resumed once more ends with the
uninterrupted run's accuracy matrices, bit for bit. The state each part of a recipe keeps (the
network, the memory, the method's and its components' state, the RNG, the optimizer position)
must all be in the checkpoints for that to hold."""
import pytest

import cilearn
from cilearn.checkpoint import Checkpointer, Interrupted
from cilearn.methods import METHODS
from cilearn.methods.options import cheap_extra_stages
from conftest import backbone_for

# 3 phases (4 + 3 + 3 classes), 30 images per class, 2 epochs; extra stages kept cheap (each option
# only where the recipe has the component: a run refuses options it does not use)
OVER = dict(scenario={"base": 4, "increment": 3}, data={"dataset": "digits", "train_per_class": 30},
            train={"epochs": 2, "progress": False, "schedule": "cosine"})


def over(method: str) -> dict:
    m = METHODS.get(method)
    components = cheap_extra_stages(m, replay_steps=5, iterations=2).get("components", {})
    if "balanced-finetune" in m.calibration:
        components["balanced-finetune"] = {"epochs": 2}
    return {**OVER, **({"components": components} if components else {}), **backbone_for(method)}


def _stop_after_phase(monkeypatch, phase: int):
    """SIGTERM right after the phase checkpoint of ``phase`` is written (a phase-boundary stop)."""
    real = Checkpointer.save_phase

    def save_phase(self, state):
        real(self, state)
        if state["next_phase"] == phase + 1:
            self.stop_signal = 15
    monkeypatch.setattr(Checkpointer, "save_phase", save_phase)


def _stop_inside_phase(monkeypatch, phase: int):
    """SIGTERM at the end of the first epoch of ``phase``'s first stage (the run stops after the
    next training step, inside the stage, and checkpoints there)."""
    real = Checkpointer.end_epoch

    def end_epoch(self, stage, epoch, epochs, scalars):
        real(self, stage, epoch, epochs, scalars)
        if self.phase == phase and epoch == 0 and self.resume_fit is None and not getattr(self, "_stopped", False):
            self._stopped = True
            self.stop_signal = 15
    monkeypatch.setattr(Checkpointer, "end_epoch", end_epoch)


@pytest.mark.parametrize("method", METHODS.names())
def test_every_recipe_resumes_exactly(method, quick, tmp_path, monkeypatch):
    check_resume(quick, tmp_path, monkeypatch, method, over(method))


@pytest.mark.parametrize("optim", ["adam", "adamw"])
def test_adam_resumes_exactly(optim, quick, tmp_path, monkeypatch):
    """Adam's moments and step counts are in the epoch checkpoint (the optimiser's state dict)."""
    check_resume(quick, tmp_path, monkeypatch, "finetune", {**OVER, "train": {**OVER["train"], "optim": optim,
                                                                               "lr": 0.001}})
    import yaml
    assert yaml.safe_load((tmp_path / "ref" / "config.yaml").read_text())["train"]["optim"] == optim


def check_resume(quick, tmp_path, monkeypatch, method: str, options: dict) -> None:
    ref = cilearn.run(quick(method=method, out=str(tmp_path / "ref"), **options), echo=False).metrics
    out = tmp_path / "stopped"
    with monkeypatch.context() as m:
        _stop_after_phase(m, 0)
        with pytest.raises(Interrupted, match="phase 0 \\(finished\\)"):
            cilearn.run(quick(method=method, out=str(out), **options), echo=False)
    if ref["phases"][1]["loss"]:          # (a recipe whose phase 1 trains nothing has no stage to stop in)
        with monkeypatch.context() as m:
            _stop_inside_phase(m, 1)
            with pytest.raises(Interrupted, match="phase 1"):
                cilearn.resume(out, echo=False)
    got = cilearn.resume(out, echo=False).metrics
    assert got["accuracy_matrix"] == ref["accuracy_matrix"]
    assert got["accuracy_matrix_nme"] == ref["accuracy_matrix_nme"]
    # each stage's first and last epoch loss (cilearn.health) survive the stop inside phase 1's first stage
    assert [r["stage_losses"] for r in got["phases"]] == [r["stage_losses"] for r in ref["phases"]]
    assert got["warnings"] == ref["warnings"]
