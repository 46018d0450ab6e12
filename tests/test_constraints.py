"""Constraint components (cilearn.constraints: freeze-old-rows, weight-clip) and the compressor's
artifact augmentation by hand, and how recipes and flags choose the head-init and constraint
components."""
import pytest
import torch

from cilearn.cli import main
from cilearn.components import Components, PhaseContext, Step, build, component_class
from cilearn.config import RunConfig, from_dict
from cilearn.data.augment import Augmenter
from cilearn.data.scenario import Phase
from cilearn.memory import Budget, Memory
from cilearn.methods import METHODS
from cilearn.methods.recipe import plan
from cilearn.models import build_net
from cilearn.services import RunServices
from cilearn.train import Batch


def _services(quick, method="icarl") -> RunServices:
    torch.manual_seed(0)
    net = build_net("convnet", "linear", 1)
    aug = Augmenter("none", 0, (0.5,), (0.5,), channels_last=False)
    return RunServices(quick(method=method), net, Memory(Budget(per_class=4)), aug, torch.device("cpu"),
                       torch.Generator().manual_seed(0), None)


def test_weight_clip_and_freeze_old_rows_by_hand(quick):
    s = _services(quick)
    net = s.net
    net.add_classes(2)
    clip = build(component_class("constraint", "weight-clip"), {}, s)
    freeze = build(component_class("constraint", "freeze-old-rows"), {}, s)
    comps = Components([clip, freeze])
    phase = Phase(1, 2, 4)
    comps.start(phase)
    assert comps.active == [clip, freeze]
    net.add_classes(2)                                 # the model grows before the phase starts
    x = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
    y = torch.tensor([0, 1, 2, 3])
    ctx = PhaseContext(phase, net, None, x, y, torch.ones(4), None)
    comps.phase_start(ctx)
    old_w, old_b = net.head.weight[:2].detach().clone(), net.head.bias[:2].detach().clone()
    with torch.no_grad():
        net.head.weight.sub_(1.0)                      # an optimizer step: every weight moved, most negative
        net.head.bias.add_(1.0)
    clip.constrain(ctx)
    assert (net.head.weight >= 0).all() and (net.head.weight == 0).any()
    freeze.constrain(ctx)                              # the old rows back, the new ones left as they are
    assert torch.equal(net.head.weight[:2], old_w) and torch.equal(net.head.bias[:2], old_b)
    assert (net.head.weight[2:] >= 0).all() and torch.equal(net.head.bias[2:], net.head.bias[2:].detach())
    comps.phase_end(ctx)
    with torch.no_grad():
        net.head.weight.add_(5.0)
    freeze.constrain(ctx)                              # nothing frozen after the phase
    assert not torch.equal(net.head.weight[:2], old_w)
    # freeze-old-rows acts in phases > 0 only, weight-clip in every phase
    comps.start(Phase(0, 0, 2))
    assert comps.active == [clip]


def _artifact_step(compressor, phase: Phase, x, y) -> tuple[Step, Batch]:
    """A main-stage step of ``phase`` on the normalised batch ``x`` after the compressor's
    ``before_step``, and the batch as it was."""
    batch = Batch(x, y, torch.arange(len(y)), torch.zeros(len(y), dtype=torch.long))
    net = compressor.services.net
    step = Step(batch, PhaseContext(phase, net, None, x, y, torch.ones(phase.seen), None))
    compressor.phase_start(step.ctx)
    compressor.before_step(step)
    return step, batch


def test_artifacts_change_only_new_rows_with_the_run_generator(quick):
    """The compressor's artifact augmentation (random-box, probability 1): the new classes' rows of
    a training batch compressed (the compressor's sqrt(eta) = 2, nearest), the old classes' rows
    (exemplars) untouched, drawn from the run's generator."""
    s = _services(quick, "foster-cim")
    s.net.add_classes(4)
    name = METHODS.get("foster-cim").compressor
    opts = {"artifacts": "random-box", "artifact_prob": 1.0}
    comp = build(component_class("compressor", name), opts, s)
    assert comp.s == 2 and comp.mode == "nearest"
    x = torch.rand(6, 1, 8, 8)
    y = torch.tensor([0, 1, 2, 3, 2, 3])
    state = s.gen.get_state()
    step, b = _artifact_step(comp, Phase(1, 2, 4), x, y)
    out = step.batch
    assert out.view is None                            # no longer one of the cached views
    assert torch.equal(out.x[:2], x[:2])               # old classes (exemplars) untouched
    assert not torch.equal(out.x[2:], x[2:])
    s.gen.set_state(state)                             # the same draws of the run's generator: the same batch
    again, _ = _artifact_step(build(component_class("compressor", name), opts, s), Phase(1, 2, 4), x, y)
    assert torch.equal(again.batch.x, out.x)
    step, b = _artifact_step(comp, Phase(0, 0, 4), x, y)
    assert step.batch is b                             # random-box: phases > 0 only
    zero = build(component_class("compressor", name), {"artifacts": "random-box", "artifact_prob": 0.0}, s)
    step, b = _artifact_step(zero, Phase(1, 2, 4), x, y)
    assert step.batch is b


@pytest.mark.parametrize("method,flags,expect", [
    ("icarl", {}, []),
    ("icarl", {"train": {"freeze_old_head": True}}, ["freeze-old-rows"]),
    ("wa", {}, ["weight-clip"]),
    ("wa", {"train": {"weight_clip": False}}, []),
    ("lucir", {}, ["imprint", "freeze-old-rows"]),
    ("lucir", {"train": {"weight_clip": True, "freeze_old_head": False}}, ["imprint", "weight-clip"]),
    ("lucir-bsce", {}, ["imprint"]),
])
def test_head_components_from_recipe_and_flags(method, flags, expect):
    p = plan(from_dict(RunConfig, {"method": method, **flags}), 8)
    assert p.names("head-init") + p.names("constraint") == expect


def test_component_shorthands_and_errors(tmp_path, capsys):
    code = main(["run", "--method", "lucir", "--epochs", "1", "--base-epochs", "1", "--increment", "5",
                 "--loss.less-forget-weight", "7", "--loss.margin-weight", "0.5", "--no-progress", "--quiet",
                 "--precision", "fp32", "--out", str(tmp_path / "r")])
    assert code == 0
    import yaml
    cfg = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert cfg["components"]["less-forget"] == {"weight": 7.0}
    assert cfg["components"]["margin-ranking"] == {"weight": 0.5, "margin": 0.5, "k": 2}
    assert "less_forget_weight" not in cfg["loss"] and "margin_weight" not in cfg["loss"]
    capsys.readouterr()
    code = main(["run", "--method", "lucir", "--components.less-forget.weight", "-1", "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert code == 2 and "components.less-forget.weight must be >= 0" in err and not (tmp_path / "bad").exists()
    code = main(["run", "--method", "icarl", "--components.pod.spatial-weight", "2", "--out", str(tmp_path / "bad2")])
    err = capsys.readouterr().err
    assert code == 2 and "pod" in err and "not a component of this run" in err
