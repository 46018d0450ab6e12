"""Head components (cilearn.head_parts) and the compressor's artifacts component by hand, and how
recipes and flags choose them."""
import pytest
import torch

from cilearn.cli import main
from cilearn.components import PhaseData, build, component_class
from cilearn.config import RunConfig, from_dict
from cilearn.data.augment import Augmenter
from cilearn.data.scenario import Phase
from cilearn.memory import Budget, Memory
from cilearn.methods import METHODS
from cilearn.models import build_net
from cilearn.services import Context
from cilearn.train import Batch


def _ctx(quick, method="icarl"):
    torch.manual_seed(0)
    net = build_net("convnet", "linear", 1)
    aug = Augmenter("none", 0, (0.5,), (0.5,), channels_last=False)
    return Context(quick(method=method), net, Memory(Budget(per_class=4)), aug, torch.device("cpu"),
                   torch.Generator().manual_seed(0), None)


def test_weight_clip_and_freeze_old_rows_by_hand(quick):
    ctx = _ctx(quick)
    net = ctx.net
    net.add_classes(2)
    clip = build(component_class("head", "weight-clip"), {}, ctx)
    freeze = build(component_class("head", "freeze-old-rows"), {}, ctx)
    net.add_classes(2)
    x = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
    y = torch.tensor([0, 1, 2, 3])
    data = PhaseData(x, y, torch.ones(4), None, None)
    freeze.new_classes(Phase(1, 2, 4), net, data)
    old_w, old_b = net.head.weight[:2].detach().clone(), net.head.bias[:2].detach().clone()
    with torch.no_grad():
        net.head.weight.sub_(1.0)                      # an optimizer step: every weight moved, most negative
        net.head.bias.add_(1.0)
    clip.constrain(net)
    assert (net.head.weight >= 0).all() and (net.head.weight == 0).any()
    freeze.constrain(net)                              # the old rows back, the new ones left as they are
    assert torch.equal(net.head.weight[:2], old_w) and torch.equal(net.head.bias[:2], old_b)
    assert (net.head.weight[2:] >= 0).all() and torch.equal(net.head.bias[2:], net.head.bias[2:].detach())
    freeze.phase_end(Phase(1, 2, 4), net, data)
    with torch.no_grad():
        net.head.weight.add_(5.0)
    freeze.constrain(net)                              # nothing frozen after the phase
    assert not torch.equal(net.head.weight[:2], old_w)


def test_artifacts_change_only_new_rows_with_the_run_generator(quick):
    ctx = _ctx(quick, "foster-cim")
    comp = build(component_class("compressor", "artifacts"), {"mode": "random-box", "prob": 1.0}, ctx)
    mem = type("M", (), {"compressor": type("C", (), {"s": 2, "mode": "nearest"})()})()
    x = torch.rand(6, 1, 8, 8)
    y = torch.tensor([0, 1, 2, 3, 2, 3])
    comp.phase_start(Phase(1, 2, 4), None, None, PhaseData(x, y, torch.ones(4), mem, None))
    out = comp.batch(Batch(x, y, torch.arange(6), 0))
    assert out.view is None                            # no longer one of the cached views
    assert torch.equal(out.x[:2], x[:2])               # old classes (exemplars) untouched
    assert not torch.equal(out.x[2:], x[2:])
    assert comp.needs_old_model                                                 # random-box: phases > 0 only
    zero = build(component_class("compressor", "artifacts"), {"mode": "random-box", "prob": 0.0}, ctx)
    b = Batch(x, y, torch.arange(6), 0)
    assert zero.batch(b) is b


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
    cfg = from_dict(RunConfig, {"method": method, **flags})
    assert METHODS.get(method).head_component_names(cfg) == expect


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
