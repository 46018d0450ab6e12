"""Calibration components (cilearn.calibration): BiC's bias layer and hold-out by hand, the
component options in the config, and the runs."""
import json

import pytest
import torch
import torch.nn.functional as F
import yaml

import cilearn
from cilearn.calibration import BiC
from cilearn.cli import main
from cilearn.components import PhaseContext, build
from cilearn.data.augment import Augmenter
from cilearn.data.scenario import Phase
from cilearn.memory import Budget, Memory
from cilearn.models import build_net
from cilearn.models.net import LogitBias
from cilearn.services import RunServices


def test_logit_bias_by_hand():
    lb = LogitBias(2)
    z = torch.tensor([[1.0, 2.0]])
    assert torch.equal(lb(z), z)                          # identity until set
    lb.add_classes(2)
    lb.set(2, 4, 2.0, -1.0)
    assert lb(torch.tensor([[1.0, 2.0, 3.0, 4.0]])).tolist() == [[1.0, 2.0, 5.0, 7.0]]
    lb.add_classes(1)                                      # a later phase's classes start uncorrected
    assert lb(torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])).tolist() == [[1.0, 2.0, 5.0, 7.0, 5.0]]


def test_net_logits_pass_through_the_bias_and_grow_with_the_head():
    torch.manual_seed(0)
    net = build_net("convnet", "linear", 1)
    net.add_classes(2)
    net.eval()                                             # BatchNorm with running statistics, as a teacher
    x = torch.rand(3, 1, 8, 8)
    before = net(x).logits
    net.enable_logit_bias()
    assert torch.equal(net(x).logits, before)              # identity: bit for bit
    net.add_classes(2)
    net.logit_bias.set(2, 4, 0.5, 1.0)
    out = net(x)
    raw = net.head(out.embedding)
    assert torch.allclose(out.logits, torch.cat([raw[:, :2], 0.5 * raw[:, 2:] + 1.0], 1))
    teacher = net.frozen_copy()                            # the next phase's teacher is corrected too
    assert torch.equal(teacher(x).logits, out.logits)
    assert set(net.state_dict()) >= {"logit_bias.scale", "logit_bias.shift"}


def _services(quick, per_class=20) -> RunServices:
    """A bic run's services on a tiny linear-head network, no checkpoints."""
    torch.manual_seed(0)
    net = build_net("convnet", "linear", 1)
    aug = Augmenter("none", 0, (0.5,), (0.5,), channels_last=False)
    return RunServices(quick(method="bic"), net, Memory(Budget(per_class=per_class)), aug, torch.device("cpu"),
                       torch.Generator().manual_seed(0), None)


def test_bic_holds_out_the_first_new_images_and_the_last_exemplars(quick):
    s = _services(quick, per_class=20)            # v = ceil(0.1 * 20) = 2 per class
    bic = build(BiC, {}, s)
    y = torch.tensor([2] * 30 + [3] * 30 + [0] * 20 + [1] * 20)       # new images, then the exemplars
    x = torch.arange(len(y), dtype=torch.uint8)[:, None, None, None].expand(-1, 1, 2, 2).contiguous()
    xt, yt = bic.training_set(Phase(1, 2, 4), x, y, s.memory, None)
    xv, yv = bic.val
    ids = xv[:, 0, 0, 0].tolist()
    assert sorted(ids) == [0, 1, 30, 31, 78, 79, 98, 99]          # new: first 2; old: last 2 exemplars
    assert torch.bincount(yv).tolist() == [2, 2, 2, 2]
    assert len(yt) == len(y) - 8 and not set(xt[:, 0, 0, 0].tolist()) & set(ids)
    assert build(BiC, {"val_fraction": 0.5}, s).training_set(Phase(1, 2, 4), x, y, s.memory, None)[1].numel() == 60


def test_bic_loss_by_hand_and_the_layer_it_writes(quick, monkeypatch):
    """The stage's loss is CE over [old logits, alpha * new logits + beta] + 0.1 beta^2 / 2, on the
    frozen model's logits; the learnt pair becomes the model's logit correction of the new classes."""
    s = _services(quick)
    net = s.net
    net.add_classes(4)
    bic = build(BiC, {"epochs": 30}, s)
    bic.attach(net)
    phase = Phase(1, 2, 4)
    x = torch.randint(0, 255, (8, 1, 8, 8), dtype=torch.uint8)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    bic.val = (x, y)
    ctx = PhaseContext(phase, net, None, x, y, torch.ones(4), s.memory)
    bic.phase_start(ctx)
    with torch.no_grad():        # new classes scored far too high: the correction must push them down
        net.head.weight[2:] *= 3.0
        net.head.bias[2:] += 5.0
    net.eval()                   # the stage reads the frozen model in eval mode
    z = net(s.augmenter.test(x)).logits.detach()
    seen = {}
    real_fit = s.fit

    def fit(xs, ys, loss_fn, settings, desc, params=None, model=None, epoch_end=None):
        assert desc == "phase 1 bias-correction" and settings.weight_decay == 0.0 and settings.lr == 0.1
        assert settings.momentum == 0.9 and settings.milestones == () and settings.epochs == 30
        with torch.no_grad():
            bic.alpha.fill_(2.0)
            bic.beta.fill_(-1.0)
        from cilearn.train import Batch
        seen["loss"] = loss_fn(Batch(s.augmenter.test(xs), ys, torch.arange(len(ys)), 0))[0].item()
        with torch.no_grad():
            bic.alpha.fill_(1.0)
            bic.beta.fill_(0.0)
        return real_fit(xs, ys, loss_fn, settings, desc, params, model, epoch_end)
    monkeypatch.setattr(s, "fit", fit)
    bic.after_training(ctx)
    q = torch.cat([z[:, :2], 2.0 * z[:, 2:] - 1.0], 1)
    assert seen["loss"] == pytest.approx(F.cross_entropy(q, y).item() + 0.1 * 1.0 / 2, rel=1e-6)
    a, b = bic.pair
    assert net.logit_bias.scale.tolist() == pytest.approx([1.0, 1.0, a, a])
    assert net.logit_bias.shift.tolist() == pytest.approx([0.0, 0.0, b, b])
    assert b < 0                                               # the new classes pushed down
    net.eval()
    after = F.cross_entropy(net(s.augmenter.test(x)).logits, y).item()
    assert after < F.cross_entropy(z, y).item()                # and the held-out loss went down


def test_bic_end_to_end(quick):
    res = cilearn.run(quick(method="bic", train={"epochs": 6, "progress": False, "schedule": "cosine"}), echo=False)
    m = res.metrics
    assert m["phases"][0]["bic_alpha"] is None
    assert all(r["bic_alpha"] is not None and r["finetune_seconds"] > 0 for r in m["phases"][1:])
    assert m["avg_incremental_acc_nme"] is not None and m["accuracy_matrix"][0][0] > 90
    cfg = (res.out_dir / "config.yaml").read_text()
    assert "calibration:\n- bic\n" in cfg and "  bic:\n    val_fraction: 0.1\n    epochs: 200\n    lr: 0.1\n" in cfg


def test_component_options_are_checked(tmp_path, capsys):
    code = main(["run", "--method", "icarl", "--components.bic.epochs", "5", "--out", str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert code == 2 and "components.bic" in err and "not a component of this run" in err
    assert "its components: " in err and "kd" in err and "bic," not in err    # the run's components, named
    code = main(["run", "--method", "bic", "--components.bic.epoch", "5", "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert code == 2 and "components.bic.epoch" in err and len(err.strip().splitlines()) == 1
    code = main(["run", "--method", "lwf", "--calibration", "bic", "--out", str(tmp_path / "c")])
    assert code == 2 and "--calibration bic needs exemplars" in capsys.readouterr().err
    code = main(["run", "--calibration", "nope", "--out", str(tmp_path / "d")])
    assert code == 2 and "nope" in capsys.readouterr().err
    assert not any((tmp_path / d).exists() for d in "abcd")


def test_calibration_composes_with_any_exemplar_method(tmp_path, quick):
    """``--calibration`` replaces the recipe's list: bic on replay, weight-align + bic on icarl."""
    for method, cal in (("replay", ["bic"]), ("icarl", ["weight-align", "bic"]), ("wa", [])):
        res = cilearn.run(quick(method=method, calibration=cal, out=None,
                                components={"bic": {"epochs": 20}} if "bic" in cal else {}), echo=False)
        m = res.metrics
        assert all((r.get("bic_alpha") is not None) == ("bic" in cal) for r in m["phases"][1:])
        saved = yaml.safe_load((res.out_dir / "config.yaml").read_text())
        assert saved["calibration"] == cal and ("weight-align" in saved["components"]) == ("weight-align" in cal)


@pytest.mark.parametrize("method", ["icarl", "lucir-bsce", "podnet", "foster", "bic"])
def test_config_yaml_replays_the_run(method, tmp_path, capsys):
    """``cilearn run --config RUN/config.yaml`` gives RUN's matrix again: the file says what ran."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["run", "--method", method, "--epochs", "3", "--base", "4", "--increment", "3",
                 "--out", str(a), "--no-progress", "--quiet"]) == 0
    assert main(["run", "--config", str(a / "config.yaml"), "--out", str(b), "--no-progress", "--quiet"]) == 0
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    assert ma["accuracy_matrix"] == mb["accuracy_matrix"] and ma["accuracy_matrix_nme"] == mb["accuracy_matrix_nme"]
    cfg = (a / "config.yaml").read_text()
    for key in ("calibration", "head_init", "constraints", "stages"):   # what ran, not "the method's default"
        assert f"\n{key}:" in cfg and f"{key}: null" not in cfg
