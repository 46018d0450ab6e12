"""DER and FOSTER: the expandable net, FOSTER's losses on hand-computed values, end-to-end runs
on digits, and resuming inside their extra stages."""
import math
import signal

import pytest
import torch

import cilearn
from cilearn.errors import ConfigError
from cilearn.components import build, component_class
from cilearn.losses import balanced_kd, effective_number_weights, logit_adjusted_ce
from cilearn.models.expandable import ExpandableNet, count_parameters
from cilearn.models import build_net, part

CONVNET = sum(p.numel() for p in part("backbone", "convnet").create(1).parameters())   # one digits extractor


# ---------------------------------------------------------------- losses by hand
def test_effective_number_weights_by_hand():
    # beta 0.5, counts 1 and 2: (1 - b)/(1 - b^n) = 0.5/0.5 = 1 and 0.5/0.75 = 2/3; sum 5/3;
    # normalised to sum K = 2: 1 * 2 / (5/3) = 1.2 and (2/3) * 2 / (5/3) = 0.8
    w = effective_number_weights(torch.tensor([1.0, 2.0]), 0.5)
    assert torch.allclose(w, torch.tensor([1.2, 0.8]))
    # beta 0: all weights 1; a class with no sample is counted as one (finite)
    assert torch.allclose(effective_number_weights(torch.tensor([3.0, 500.0]), 0.0), torch.ones(2))
    assert torch.equal(effective_number_weights(torch.tensor([0.0, 2.0]), 0.5),
                       effective_number_weights(torch.tensor([1.0, 2.0]), 0.5))
    # FOSTER's setting: 20 exemplars against 300 images: the rare class weighs more
    w = effective_number_weights(torch.tensor([20.0, 300.0]), 0.96)
    assert w[0] > 1.5 * w[1] and math.isclose(float(w.sum()), 2.0, rel_tol=1e-6)


def test_logit_adjusted_ce_by_hand():
    # logits [1, 1] / weights [1.2, 0.8] = [0.8333, 1.25]; y = 0:
    # -log(e^0.8333 / (e^0.8333 + e^1.25)) = log(1 + e^(1.25 - 0.8333))
    z, y, counts = torch.tensor([[1.0, 1.0]]), torch.tensor([0]), torch.tensor([1.0, 2.0])
    got = logit_adjusted_ce(z, y, counts, beta=0.5)
    assert math.isclose(float(got), math.log(1 + math.exp(1.25 - 1 / 1.2)), rel_tol=1e-6)
    # equal counts (a base phase): plain CE
    z = torch.randn(5, 3)
    y = torch.tensor([0, 1, 2, 0, 1])
    assert torch.allclose(logit_adjusted_ce(z, y, torch.full((3,), 7.0), beta=0.96),
                          torch.nn.functional.cross_entropy(z, y))
    # the "la-ce" classification component is this loss with its option beta
    la = build(component_class("classification", "la-ce"), {"beta": 0.5}, None)
    z, y, counts = torch.randn(4, 2), torch.tensor([0, 1, 1, 0]), torch.tensor([1.0, 2.0])
    assert torch.equal(la.loss(z, y, counts), logit_adjusted_ce(z, y, counts, beta=0.5))


def test_balanced_kd_by_hand():
    # teacher [0, 0] -> p = [.5, .5]; weights [1.2, .8] -> p' = [.6, .4]; student [0, 0], T = 1:
    # KL(p' || q) = .6 log(.6/.5) + .4 log(.4/.5)
    w = torch.tensor([1.2, 0.8])
    got = balanced_kd(torch.zeros(1, 2), torch.zeros(1, 2), w, T=1.0)
    assert math.isclose(float(got), 0.6 * math.log(1.2) + 0.4 * math.log(0.8), rel_tol=1e-5)
    # zero when the student's softmax is the reweighted teacher
    assert float(balanced_kd(torch.log(torch.tensor([[0.6, 0.4]])), torch.zeros(1, 2), w, T=1.0)) < 1e-6
    # with equal weights it is the plain KL, > 0 for a different student
    assert float(balanced_kd(torch.tensor([[2.0, 0.0]]), torch.zeros(1, 2), torch.ones(2), T=2.0)) > 0


# ---------------------------------------------------------------- the expandable net
def _net() -> ExpandableNet:
    net = build_net("convnet", "linear", 1, expandable=True)
    net.add_classes(2)
    return net


def test_feature_dimension_and_parameter_count_grow_by_one_extractor():
    net = _net()
    assert isinstance(net, ExpandableNet) and net.backbone.out_dim == 128
    assert count_parameters(net) == CONVNET + 2 * 128 + 2
    w0 = net.head.weight.detach().clone()
    for t in (2, 3):
        net.expand()
        net.add_classes(2)
        k = 2 * t
        assert net.backbone.out_dim == 128 * t and net.head.weight.shape == (k, 128 * t)
        assert count_parameters(net) == t * CONVNET + k * 128 * t + k
        assert count_parameters(net, trainable=True) == CONVNET + k * 128 * t + k   # old extractors frozen
    assert torch.equal(net.head.weight[:2, :128], w0)       # the old classes' weights on the old features
    out = net(torch.randn(3, 1, 8, 8))
    assert out.logits.shape == (3, 6) and out.embedding.shape == (3, 384)
    assert [m.shape[1] for m in out.maps] == [96, 192, 384]    # stage maps concatenated over extractors
    assert torch.allclose(out.maps[-1].mean((2, 3)), out.embedding, atol=1e-5)


def test_frozen_extractors_get_no_gradient_and_keep_their_statistics():
    torch.manual_seed(0)
    net = _net()
    net.expand()
    net.add_classes(2)
    old = net.backbone.extractors[0]
    before = {k: v.clone() for k, v in old.state_dict().items()}
    net.train()
    assert not old.training and net.backbone.extractors[1].training   # BN of the frozen one in eval mode
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(net(torch.randn(8, 1, 8, 8)).logits, torch.randint(0, 4, (8,)))
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in old.parameters())
        assert all(p.grad is not None for p in net.backbone.extractors[1].parameters())
        opt.step()
    after = old.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)        # weights and running statistics


def test_cached_old_embedding_gives_the_full_forward():
    net = _net()
    teacher = net.frozen_copy()
    net.expand()
    net.add_classes(2)
    net.eval()
    x = torch.randn(4, 1, 8, 8)
    full = net(x)
    part = net(x, teacher(x).embedding)
    assert torch.allclose(full.logits, part.logits, atol=1e-5)
    assert torch.allclose(full.embedding, part.embedding, atol=1e-6)


def test_state_dict_of_a_later_phase_loads_into_a_fresh_net():
    net = _net()
    net.expand()
    net.add_classes(2)
    state = net.state_dict()
    fresh = _net()
    fresh.load_state_dict(state)
    assert len(fresh.backbone.extractors) == 2 and int(fresh.backbone.num_frozen) == 1
    assert not any(p.requires_grad for p in fresh.backbone.extractors[0].parameters())
    x = torch.randn(2, 1, 8, 8)
    net.eval(), fresh.eval()
    assert torch.equal(net(x).logits, fresh(x).logits)


# ---------------------------------------------------------------- end to end on digits
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from conftest import quick_config
    tmp = tmp_path_factory.mktemp("expand")
    return {m: cilearn.run(quick_config(tmp, method=m, out=str(tmp / m), train__epochs=ep), echo=False).metrics
            for m, ep in (("der", 6), ("foster", 10))}


def test_der_end_to_end(runs):
    m = runs["der"]
    params = [r["params"] for r in m["phases"]]
    # one more extractor per phase; head: seen x (phases x 128) + bias
    assert params == [(i + 1) * CONVNET + (2 * i + 2) * 128 * (i + 1) + 2 * i + 2 for i in range(5)]
    assert m["avg_incremental_acc"] > 90 and m["last_acc"] > 85
    assert min(r["acc_new"] for r in m["phases"]) > 80        # new classes learnt every phase
    assert m["phases"][-1]["acc_old"] > 80                    # and the old ones kept (frozen extractors)
    assert m["phases"][-1]["finetune_seconds"] > 0            # classifier retraining ran
    assert {"cls", "aux"} <= set(m["phases"][-1]["loss"])


def test_foster_end_to_end(runs):
    m = runs["foster"]
    params = [r["params"] for r in m["phases"]]
    # each phase > 0 reports the boosted network (the compressed student of the previous phase + one new
    # extractor, head over 2 x 128 features); the student replaced it after each phase's evaluation, so
    # there are never more than two extractors
    assert params == [CONVNET + 2 * 128 + 2] + [2 * CONVNET + (2 * i + 2) * 256 + 2 * i + 2 for i in range(1, 5)]
    assert m["avg_incremental_acc"] > 90 and m["last_acc"] > 80
    assert m["phases"][-1]["acc_new"] > 50 and m["phases"][-1]["acc_old"] > 80
    # the compressed student's accuracy (what the network was evaluated as before issue 32), phases > 0
    student = [r["student_acc"] for r in m["phases"]]
    assert student[0] is None and all(a is not None for a in student[1:])
    assert m["avg_incremental_acc_student"] > 90 and student[-1] > 80
    assert {"cls", "kd", "aux", "bkd"} <= set(m["phases"][-1]["loss"])    # boosting + compression ran
    assert m["accuracy_matrix_nme"] is not None


def _interrupt_stage(monkeypatch, stage: str):
    """SIGTERM as the stage named ``stage`` starts: one step, then the in-stage checkpoint."""
    import cilearn.services as base          # the module whose RunServices.fit calls fit
    real = base.fit

    def fit(*a, **kw):
        if kw.get("desc") == stage and kw.get("ckpt") is not None and kw["ckpt"].resume_fit is None:
            kw["ckpt"].stop_signal = signal.SIGTERM
        return real(*a, **kw)
    monkeypatch.setattr(base, "fit", fit)
    return lambda: monkeypatch.setattr(base, "fit", real)


@pytest.mark.parametrize("method,stage", [("foster", "phase 2 compression"), ("der", "phase 2"),
                                          ("der", "phase 1 balanced-ft")])
def test_resume_inside_a_stage_gives_the_same_matrix(method, stage, quick, tmp_path, monkeypatch):
    from cilearn.checkpoint import Interrupted
    cfg = dict(method=method, scenario={"base": 4, "increment": 3}, data={"dataset": "digits", "train_per_class": 40},
               train={"epochs": 2, "progress": False, **({"finetune_epochs": 2} if method == "der" else {})})
    ref = cilearn.run(quick(**cfg, out=str(tmp_path / "a")), echo=False).accuracy_matrix
    restore = _interrupt_stage(monkeypatch, stage)
    with pytest.raises(Interrupted, match=stage):
        cilearn.run(quick(**cfg, out=str(tmp_path / "b")), echo=False)
    restore()
    assert cilearn.resume(tmp_path / "b", echo=False).accuracy_matrix == ref


@pytest.mark.parametrize("method", ["der", "foster"])
def test_bsce_composes(method, quick, monkeypatch):
    """``--loss bsce`` replaces the classification loss (DER's CE, FOSTER's logit-adjusted CE)."""
    cls = component_class("classification", "bsce")
    calls = []
    real = cls.loss
    monkeypatch.setattr(cls, "loss", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    m = cilearn.run(quick(method=method, loss={"cls": "bsce"}, scenario={"base": 4, "increment": 3},
                          data={"dataset": "digits", "train_per_class": 40},
                          train={"epochs": 4, "batch_size": 32, "progress": False,
                                 **({"finetune_epochs": 1} if method == "der" else {})}), echo=False).metrics
    assert calls and len(m["accuracy_matrix"]) == 3 and m["phases"][-1]["acc_new_among_new"] > 50


def test_bad_betas_are_config_errors(quick):
    with pytest.raises(ConfigError, match="loss.la-beta"):
        cilearn.run(quick(method="foster", loss={"la_beta": 1.0}), echo=False)
    # the short names set the feature-compression stage's options, which name the component and what they expect
    with pytest.raises(ConfigError, match=r"components\.feature-compression: .*beta in \[0, 1\).*got None, None, -0\.1,"):
        cilearn.run(quick(method="foster", loss={"bkd_beta": -0.1}), echo=False)
    with pytest.raises(ConfigError, match=r"components\.feature-compression: epochs >= 0.*got -1,"):
        cilearn.run(quick(method="foster", train={"compression_epochs": -1}), echo=False)
