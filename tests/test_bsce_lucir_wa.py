"""Balanced Softmax CE, LUCIR, WA and the class-balanced fine-tuning stage: the pure pieces
against numbers computed by hand, the method hooks on a tiny network, and end-to-end runs."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import cilearn
from cilearn.api import load_model
from cilearn.calibration import BalancedFinetune, clip_nonnegative, weight_align
from cilearn.checkpoint import load_checkpoint
from cilearn.classification import BalancedSoftmaxCE
from cilearn.cli import main
from cilearn.components import Components, PhaseContext, Step, build, component_class
from cilearn.config import RunConfig, from_dict
from cilearn.data.augment import Augmenter
from cilearn.data.scenario import Phase
from cilearn.imprint import imprint_weights
from cilearn.learner import Learner
from cilearn.losses import balanced_softmax_ce, cross_entropy, less_forget, lucir_lambda, margin_ranking
from cilearn.memory import Budget, Memory
from cilearn.methods import METHODS
from cilearn.methods.recipe import plan
from cilearn.model_io import architecture, build_from
from cilearn.models import part
from cilearn.models.heads import CosineHead
from cilearn.services import RunServices, SplitData
from cilearn.train import Batch


# ---------------------------------------------------------------- BSCE
def test_bsce_by_hand():
    z = torch.tensor([[1.0, 0.0, 0.0]])
    y = torch.tensor([0])
    n = torch.tensor([1.0, 2.0, 4.0])
    # -log(n_0 e^1 / (n_0 e^1 + n_1 e^0 + n_2 e^0)) = -log(e / (e + 6)) = log(1 + 6/e) = 1.16543
    assert balanced_softmax_ce(z, y, n).item() == pytest.approx(1.16543, abs=1e-4)
    assert balanced_softmax_ce(z, y, n).item() == pytest.approx(math.log(1 + 6 / math.e), abs=1e-6)
    # the same as CE on the logits shifted by log n
    assert balanced_softmax_ce(z, y, n).item() == pytest.approx(cross_entropy(z + n.log(), y).item(), abs=1e-6)
    # the classification component --loss bsce binds the same function
    bsce = build(component_class("classification", "bsce"), {}, None)
    assert isinstance(bsce, BalancedSoftmaxCE) and torch.equal(bsce.loss(z, y, n), balanced_softmax_ce(z, y, n))


def test_bsce_equals_ce_with_equal_counts():
    torch.manual_seed(0)
    z, y = torch.randn(8, 5), torch.randint(0, 5, (8,))
    for c in (1.0, 20.0, 500.0, 1000.0):   # bit-identical, not equal up to rounding, gradient too
        zb, zc = z.clone().requires_grad_(), z.clone().requires_grad_()
        lb, lc = balanced_softmax_ce(zb, y, torch.full((5,), c)), cross_entropy(zc, y)
        (lb + lc).backward()
        assert torch.equal(lb, lc) and torch.equal(zb.grad, zc.grad)


def test_bsce_zero_count_is_finite_and_gets_no_probability():
    z = torch.zeros(2, 3, requires_grad=True)
    y = torch.tensor([1, 2])
    n = torch.tensor([0.0, 10.0, 10.0])
    loss = balanced_softmax_ce(z, y, n)
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(z.grad).all()
    # training distribution: p_0 = 1e-4 / (1e-4 + 20) = 5e-6 with equal logits
    p = F.softmax(z.detach() + n.clamp_min(1e-4).log(), dim=1)
    assert p[0, 0].item() == pytest.approx(5e-6, rel=1e-3)
    assert abs(z.grad[:, 0]).max().item() < 1e-5            # ~no push on the absent class
    # without the prior the same class would take a third of the mass
    assert loss.item() == pytest.approx(math.log(2), abs=1e-4)   # CE over the two present classes
    # a sample whose own class has no count: large but finite
    big = balanced_softmax_ce(torch.zeros(1, 2), torch.tensor([0]), torch.tensor([0.0, 10.0]))
    assert big.item() == pytest.approx(math.log(1 + 10 / 1e-4), rel=1e-4) and math.isfinite(big.item())


def _learner(quick, method, per_class=4, **over) -> Learner:
    """The engine's side of a run of ``method`` on a tiny network (the recipe's backbone and head on
    8x8 one-channel images), with the recipe's components and their effective options (``plan``),
    no checkpoints; the memory (the run's selection rule) when the recipe keeps exemplars."""
    torch.manual_seed(0)
    cfg = quick(method=method, **over)
    p = plan(cfg, 8)
    net = build_from(architecture(p, 1))
    aug = Augmenter("none", 0, (0.5,), (0.5,), channels_last=False)
    services = RunServices(cfg, net, None, aug, torch.device("cpu"), torch.Generator().manual_seed(0), None)
    parts = p.build(services)
    if p.memory:
        services.memory = Memory(Budget(per_class=per_class), next(c for c in parts if c.kind == "selection"))
    return Learner(services, Components(parts))


def _named(learner: Learner) -> dict:
    return {c.name: c for c in learner.components.parts}


def _step(learner: Learner, x: torch.Tensor, y: torch.Tensor) -> tuple[Step, object]:
    """A main-stage step of the phase begun on uint8 ``x``, labels ``y`` (test view), and the
    student's output on it."""
    batch = Batch(learner.s.augmenter.test(x), y, torch.arange(len(y)), None)
    step = Step(batch, learner.ctx)
    return step, learner.net(batch.x)


def test_bsce_counts_are_the_phase_training_set(quick):
    """n_j = new-class images + each old class's exemplars, from the actual training set."""
    learner = _learner(quick, "icarl-bsce", per_class=3)
    learner.net.add_classes(2)
    mem = learner.s.memory
    mem.exemplars = {0: torch.zeros(3, 1, 8, 8, dtype=torch.uint8), 1: torch.zeros(2, 1, 8, 8, dtype=torch.uint8)}
    cls, = learner.components.of_kind("classification")
    assert isinstance(cls, BalancedSoftmaxCE) and learner.cls_loss == cls.loss
    x, y = torch.randint(0, 255, (13, 1, 8, 8), dtype=torch.uint8), torch.tensor([2] * 5 + [3] * 3)
    data = SplitData(x[:8], y, x[:1], y[:1])
    xt, yt = learner.training_set(Phase(1, 2, 4), data)
    learner.begin(Phase(1, 2, 4), xt, yt)
    assert learner.ctx.counts.tolist() == [3.0, 2.0, 5.0, 3.0]
    # the step's classification term is BSCE with those counts
    learner.net.eval()
    step, out = _step(learner, xt, yt)
    terms = {n: v for n, _, v in learner.components.terms(step, out)}
    want = balanced_softmax_ce(out.logits, yt, torch.tensor([3.0, 2.0, 5.0, 3.0]))
    assert terms["cls"].item() == pytest.approx(want.item(), rel=1e-6)


# ---------------------------------------------------------------- LUCIR pieces
def test_less_forget_by_hand():
    emb = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    old = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    # cos = 1 and 1/sqrt(2): mean(1 - cos) = (0 + 0.292893) / 2
    assert less_forget(emb, old).item() == pytest.approx(0.146447, abs=1e-5)
    assert less_forget(old, old).item() == pytest.approx(0.0, abs=1e-6)


def test_lucir_adaptive_lambda():
    assert lucir_lambda(5.0, 50, 10) == pytest.approx(11.18034, abs=1e-4)    # 5 sqrt(5)
    assert lucir_lambda(5.0, 90, 10) == pytest.approx(15.0)                  # 5 sqrt(9)
    assert lucir_lambda(10.0, 50, 50) == pytest.approx(10.0)


def test_margin_ranking_by_hand():
    # classes 0, 1 old; 2, 3 new
    s = torch.tensor([[0.9, 0.1, 0.5, 0.8],     # y=0: hinges 0.5-0.9+0.8 = 0.4, 0.5-0.9+0.5 = 0.1
                      [0.0, 0.0, 0.9, 0.9],     # y=3: a new-class sample, ignored
                      [0.0, 0.2, -0.5, 0.3]])   # y=1: 0.5-0.2+0.3 = 0.6, 0.5-0.2-0.5 < 0 -> 0
    y = torch.tensor([0, 3, 1])
    assert margin_ranking(s, y, num_old=2, k=2, margin=0.5).item() == pytest.approx(0.275, abs=1e-6)
    assert margin_ranking(s, y, num_old=2, k=1, margin=0.5).item() == pytest.approx(0.5, abs=1e-6)
    assert margin_ranking(s, y, num_old=2, k=5, margin=0.5).item() == pytest.approx(0.275, abs=1e-6)  # k capped
    assert margin_ranking(s[1:2], y[1:2], num_old=2).item() == 0.0          # no old-class sample
    assert margin_ranking(s, y, num_old=0).item() == 0.0                     # first phase


def test_imprint_weights_by_hand():
    emb = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, -3.0]])
    y = torch.tensor([2, 2, 3])
    old_w = torch.tensor([[1.0, 0.0], [0.0, 3.0]])        # mean norm 2
    w = imprint_weights(emb, y, range(2, 4), old_w)
    # class 2: normalised embeddings [1,0], [0,1] -> mean [.5,.5] -> [.7071, .7071] x 2
    # (the mean of the raw embeddings, [1, .5], would give another direction)
    assert torch.allclose(w, torch.tensor([[math.sqrt(2), math.sqrt(2)], [0.0, -2.0]]), atol=1e-5)


def test_cosine_head_logits_and_growth():
    h = part("head", "cosine").create(2)
    assert isinstance(h, CosineHead) and h.sigma.item() == 1.0 and h.num_classes == 0
    h.add_classes(2)
    with torch.no_grad():
        h.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        h.sigma.fill_(3.0)
    emb = torch.tensor([[3.0, 4.0]])
    assert torch.allclose(h.cosine(emb), torch.tensor([[0.6, 0.8]]))
    assert torch.allclose(h(emb), torch.tensor([[1.8, 2.4]]))              # sigma * cos
    old = h.weight.detach().clone()
    h.add_classes(3)
    assert h.weight.shape == (5, 2) and torch.equal(h.weight[:2], old) and h.sigma.item() == 3.0
    assert isinstance(h.weight, torch.nn.Parameter) and h.weight.requires_grad
    h(emb).sum().backward()
    assert h.sigma.grad is not None                                         # sigma is learnt


def test_lucir_before_phase_imprints_and_freezes(quick):
    learner = _learner(quick, "lucir")
    net = learner.net
    assert isinstance(net.head, CosineHead)
    net.add_classes(2)
    x = torch.randint(0, 255, (12, 1, 8, 8), dtype=torch.uint8)
    y = torch.tensor([0, 1] + [2] * 5 + [3] * 5)
    old = net.head.weight.detach().clone()
    learner.begin(Phase(1, 2, 4), x, y)             # grows the head by the phase's 2 classes, then phase_start
    w = net.head.weight.detach()
    assert w.shape[0] == 4
    emb = learner.s.embed(net, x)
    expect = imprint_weights(emb[2:], y[2:], range(2, 4), old)
    for i, c in enumerate((2, 3)):   # the normalised mean of normalised embeddings, at the old mean norm
        d = F.normalize(F.normalize(emb[y == c], dim=1).mean(0), dim=0)
        assert torch.allclose(w[c], d * old.norm(dim=1).mean(), atol=1e-5)
    assert torch.allclose(w[2:], expect, atol=1e-6) and torch.equal(w[:2], old)
    parts = _named(learner)
    assert [c.name for c in learner.components.parts if c.kind in ("term", "head-init", "constraint", "calibration")] \
        == ["less-forget", "margin-ranking", "imprint", "freeze-old-rows", "balanced-finetune"]
    step, out = _step(learner, x, y)
    assert parts["less-forget"].terms(step, out)["less_forget"][0] == pytest.approx(5.0 * 1.0)   # sqrt(2 old / 2 new)
    # old rows are projected back before every step (frozen during the main stage)
    with torch.no_grad():
        net.head.weight.add_(1.0)
    learner.components.constrain(learner.ctx)
    assert torch.equal(net.head.weight[:2].detach(), old)
    assert not torch.equal(net.head.weight[2:].detach(), expect)


# ---------------------------------------------------------------- WA
def test_weight_align_by_hand():
    w = torch.tensor([[3.0, 4.0], [0.0, 1.0], [6.0, 8.0], [0.0, 2.0]])
    old = w[:2].clone()
    # old norms 5, 1 (mean 3); new norms 10, 2 (mean 6): gamma = 0.5
    assert weight_align(w, 2) == pytest.approx(0.5)
    assert torch.equal(w[:2], old)
    assert torch.allclose(w[2:], torch.tensor([[3.0, 4.0], [0.0, 1.0]]))
    assert w[:2].norm(dim=1).mean().item() == pytest.approx(w[2:].norm(dim=1).mean().item())
    torch.manual_seed(0)
    r = torch.rand(7, 5) * torch.tensor([[1.0]] * 4 + [[9.0]] * 3)
    weight_align(r, 4)
    assert r[:4].norm(dim=1).mean().item() == pytest.approx(r[4:].norm(dim=1).mean().item(), rel=1e-5)


def test_weight_clip():
    w = torch.tensor([[-1.0, 2.0], [0.5, -0.1]])
    clip_nonnegative(w)
    assert torch.equal(w, torch.tensor([[0.0, 2.0], [0.5, 0.0]]))


def test_wa_recipe_weights_and_end_to_end(quick):
    res = cilearn.run(quick(method="wa"), echo=False)
    m = res.metrics
    assert m["avg_incremental_acc_nme"] is not None and m["phases"][-1]["acc_new"] > 50
    assert all(r["finetune_seconds"] == 0 for r in m["phases"])
    w = load_model(res.out_dir, "cpu").net.head.weight.detach()       # the final model (model.safetensors)
    assert (w >= 0).all()                                             # clipped after the last step
    # aligned after the last phase (8 old classes, 2 new); the training after it is over
    assert w[:8].norm(dim=1).mean().item() == pytest.approx(w[8:].norm(dim=1).mean().item(), rel=1e-4)


def _wa_step_weights(quick, **over) -> tuple[dict[str, float], list[str]]:
    """The loss terms' weights of a WA step in phase 3 (6 old classes, 2 new) and the run's
    constraint and calibration components."""
    learner = _learner(quick, "wa", **over)
    learner.net.add_classes(6)
    x, y = torch.randint(0, 255, (4, 1, 8, 8), dtype=torch.uint8), torch.tensor([6, 7, 0, 1])
    learner.begin(Phase(3, 6, 8), x, y)
    step, out = _step(learner, x, y)
    weights = {n: w for n, w, _ in learner.components.terms(step, out)}
    return weights, [c.name for c in learner.components.parts if c.kind in ("constraint", "calibration")]


def test_wa_lambda_is_old_over_seen(quick):
    weights, names = _wa_step_weights(quick)
    assert names == ["weight-clip", "weight-align"]
    assert weights == {"cls": pytest.approx(0.25), "kd": pytest.approx(0.75)}     # (1 - l) CE + l KD, l = 6 / 8


def test_wa_kd_weight_given_gives_ce_plus_kd(quick):
    """docs/methods/calibration.md: each weight is its own option: ``--loss.kd-weight L`` sets the
    KD's (the classification's stays ``1 - |old| / |seen|``), ``--loss.cls-weight 1 --loss.kd-weight L``
    gives ``CE + L KD`` instead of the balance."""
    weights, names = _wa_step_weights(quick, loss={"kd_weight": 2.0},
                                      train={"epochs": 6, "progress": False, "weight_clip": False})
    assert names == ["weight-align"]
    assert weights == {"cls": pytest.approx(0.25), "kd": 2.0}
    weights, _ = _wa_step_weights(quick, loss={"kd_weight": 2.0, "cls_weight": 1.0},
                                  train={"epochs": 6, "progress": False, "weight_clip": False})
    assert weights == {"cls": 1.0, "kd": 2.0}


# ---------------------------------------------------------------- balanced fine-tuning
def test_balanced_finetune_is_balanced_and_trains_the_head_only(quick):
    learner = _learner(quick, "lucir", per_class=4)
    net, mem = learner.net, learner.s.memory
    net.add_classes(4)
    mem.exemplars = {c: torch.randint(0, 255, (4, 1, 8, 8), dtype=torch.uint8) for c in range(2)}
    x = torch.randint(0, 255, (30, 1, 8, 8), dtype=torch.uint8)
    y = torch.tensor([0] * 4 + [1] * 4 + [2] * 12 + [3] * 10)
    phase = Phase(1, 2, 4)
    ft_part = _named(learner)["balanced-finetune"]
    assert isinstance(ft_part, BalancedFinetune) and ft_part.options.epochs == 20 and ft_part.options.head_only
    data = PhaseContext(phase, net, None, x, y, torch.bincount(y).float(), mem, cls_loss=learner.cls_loss)
    sub = ft_part.select(phase, net, data)
    assert sub["per_class"] == 4
    assert torch.bincount(y[sub["new_idx"]], minlength=4).tolist() == [0, 0, 4, 4]
    assert len(set(sub["new_idx"].tolist())) == 8
    assert data.new_embeddings.shape[0] == 22                       # the new images' embeddings, for the memory
    backbone = {k: v.clone() for k, v in net.backbone.state_dict().items()}   # params and BN statistics
    head = net.head.weight.detach().clone()
    ft = ft_part.after_training(data)
    assert ft.images == 16 * 20 and ft.seconds > 0
    for k, v in net.backbone.state_dict().items():
        assert torch.equal(v, backbone[k]), k
    assert not torch.equal(net.head.weight.detach(), head)
    assert net.backbone.training                                     # restored after the stage


def test_balanced_finetune_selection_follows_the_memory_rule(quick):
    """Herding on the current embeddings picks what the memory will store."""
    learner = _learner(quick, "replay", per_class=3)
    net, mem = learner.net, learner.s.memory
    net.add_classes(4)
    mem.exemplars = {c: torch.randint(0, 255, (5, 1, 8, 8), dtype=torch.uint8) for c in range(2)}
    x = torch.randint(0, 255, (16, 1, 8, 8), dtype=torch.uint8)
    y = torch.tensor([2] * 8 + [3] * 8)
    ft_part = build(BalancedFinetune, {}, learner.s)
    phase = Phase(1, 2, 4)
    sub = ft_part.select(phase, net, PhaseContext(phase, net, None, x, y, torch.bincount(y).float(), mem,
                                                  cls_loss=learner.cls_loss))
    assert sub["per_class"] == 3
    feats = learner.s.embed(net, x)
    mem.update(x, y, range(2, 4), feats, 4)
    for c in (2, 3):
        assert torch.equal(x[sub["new_idx"][y[sub["new_idx"]] == c]], mem.exemplars[c])


# ---------------------------------------------------------------- end to end
@pytest.mark.parametrize("method", ["lucir", "wa", "lwf", "lwm", "finetune", "replay"])
def test_loss_bsce_composes(method, quick):
    res = cilearn.run(quick(method=method, loss={"cls": "bsce"}), echo=False)
    m = res.metrics
    assert [len(r) for r in m["accuracy_matrix"]] == [1, 2, 3, 4, 5]
    assert all(math.isfinite(v) for r in m["phases"] for v in r["loss"].values())
    assert m["accuracy_matrix"][0][0] > 80.0


def test_lucir_end_to_end_terms_and_finetune_seconds(quick):
    m = cilearn.run(quick(method="lucir"), echo=False).metrics
    assert m["avg_incremental_acc_nme"] is not None and m["phases"][-1]["acc_new"] > 50
    assert m["phases"][0]["finetune_seconds"] == 0 and set(m["phases"][0]["loss"]) == {"cls"}
    for r in m["phases"][1:]:
        assert r["finetune_seconds"] > 0
        assert {"cls", "less_forget", "margin"} <= set(r["loss"])
        assert r["loss"]["less_forget"] >= 0 and r["loss"]["margin"] >= 0


def test_lucir_bsce_drops_margin_and_trains_old_rows(quick):
    m = cilearn.run(quick(method="lucir-bsce"), echo=False).metrics
    for r in m["phases"][1:]:
        assert set(r["loss"]) == {"cls", "less_forget"} and r["finetune_seconds"] == 0
    # --loss.margin-weight puts the ranking term back
    m = cilearn.run(quick(method="lucir-bsce", loss={"margin_weight": 1.0}, out=None), echo=False).metrics
    assert all("margin" in r["loss"] for r in m["phases"][1:])


def test_no_balanced_finetune_flag_and_bsce_recipes(tmp_path, capsys):
    def run(name, *flags):
        out = tmp_path / name
        assert main(["run", *flags, "--epochs", "3", "--out", str(out), "--no-progress", "--quiet"]) == 0
        return json.loads((out / "metrics.json").read_text())
    for m in (run("a", "--method", "lucir", "--no-balanced-finetune"), run("b", "--method", "lucir-bsce"),
              run("c", "--method", "icarl-bsce")):
        assert all(r["finetune_seconds"] == 0 for r in m["phases"])
    m = run("d", "--method", "lucir-bsce", "--balanced-finetune")
    assert all(r["finetune_seconds"] > 0 for r in m["phases"][1:])
    m = run("e", "--method", "icarl", "--balanced-finetune", "--train.finetune-epochs", "2")
    assert all(r["finetune_seconds"] > 0 for r in m["phases"][1:])
    csv = (tmp_path / "e" / "metrics.csv").read_text().splitlines()
    assert "finetune_seconds" in csv[0].split(",")
    # the stage needs exemplars: refused before anything is written
    code = main(["run", "--method", "lwf", "--balanced-finetune", "--out", str(tmp_path / "f")])
    assert code == 2 and "--calibration balanced-finetune needs exemplars" in capsys.readouterr().err
    assert not (tmp_path / "f").exists()
    code = main(["run", "--balanced-finetune", "--no-balanced-finetune", "--out", str(tmp_path / "g")])
    assert code == 2


def _options(method: str, dataset: str = "cifar100", image_size: int = 32) -> dict:
    """The run's effective component options (``plan``) of ``method`` on ``dataset`` (ResNet-32)."""
    cfg = from_dict(RunConfig, {"method": method, "data": {"dataset": dataset}, "model": {"backbone": "resnet32"}})
    return plan(cfg, image_size).options


def test_recipes_defaults():
    lucir, lb, ib = METHODS.get("lucir"), METHODS.get("lucir-bsce"), METHODS.get("icarl-bsce")
    assert lucir.head == "cosine" and lucir.calibration == ("balanced-finetune",) and lucir.exemplars
    assert lucir.classification == "ce" and lb.classification == "bsce" and lb.calibration == () and lb.head == "cosine"
    assert lb.options["margin-ranking"] == {"weight": 0.0} and _options("lucir-bsce")["margin-ranking"]["weight"] == 0.0
    assert lucir.terms == lb.terms == ("less-forget", "margin-ranking") and "margin-ranking" not in lucir.options
    assert _options("lucir")["margin-ranking"]["weight"] == 1.0
    assert lucir.head_init == lb.head_init == ("imprint",)
    assert lucir.constraints == ("freeze-old-rows",) and lb.constraints == ()
    assert lucir.image_folder_options["less-forget"] == {"weight": 10.0}
    assert _options("lucir", "imagefolder", 224)["less-forget"]["weight"] == 10.0
    assert _options("lucir")["less-forget"]["weight"] == 5.0
    assert _options("lucir")["resnet32"]["last_relu"] is False and _options("lucir-bsce")["resnet32"]["last_relu"] is False
    assert _options("icarl")["resnet32"]["last_relu"] is True
    assert ib.classification == "bsce" and ib.calibration == () and ib.terms == ("kd",)
    wa = METHODS.get("wa")
    assert wa.calibration == ("weight-align",) and wa.constraints == ("weight-clip",) and wa.exemplars


def test_interrupted_inside_finetuning_resumes_exactly(tmp_path, quick, monkeypatch):
    """A stop inside the fine-tuning stage checkpoints there; the resumed run skips the main
    stage, fine-tunes on the same selection (herding on the embeddings of the main stage's model;
    here the whole network is fine-tuned, so only the checkpointed selection gives it back) and
    reproduces the run."""
    import signal

    from cilearn.checkpoint import EPOCH_FILE, Interrupted
    over = dict(method="lucir",
                train={"epochs": 4, "progress": False, "finetune_epochs": 3, "finetune_head_only": False})
    ref = cilearn.run(quick(out=str(tmp_path / "a"), **over), echo=False).accuracy_matrix
    real = BalancedFinetune.after_training

    def stop_in_phase_2(self, ctx):
        if ctx.phase.index == 2:
            self.services.ckpt.stop_signal = signal.SIGTERM   # stop after the stage's first step
        return real(self, ctx)
    monkeypatch.setattr(BalancedFinetune, "after_training", stop_in_phase_2)
    b = tmp_path / "b"
    with pytest.raises(Interrupted, match="phase 2 balanced-ft"):
        cilearn.run(quick(out=str(b), **over), echo=False)
    monkeypatch.setattr(BalancedFinetune, "after_training", real)
    st = load_checkpoint(b / EPOCH_FILE)
    assert st["phase"] == 2 and st["fit"]["desc"] == "phase 2 balanced-ft"
    assert st["method"]["components"]["balanced-finetune"]["subset"]["phase"] == 2
    assert cilearn.resume(b, echo=False).accuracy_matrix == ref


def test_memory_update_reuses_the_selection_embeddings_exactly(quick, monkeypatch):
    """With head-only fine-tuning the memory update reuses the embeddings the balanced selection
    took (one embedding pass of the new images instead of two), with the same result."""
    calls = []
    orig = RunServices.embed
    monkeypatch.setattr(RunServices, "embed", lambda self, net, x: calls.append(len(x)) or orig(self, net, x))
    a = cilearn.run(quick(method="lucir", out=None), echo=False).metrics
    reused = list(calls)
    calls.clear()
    orig_update = Learner.update_memory

    def update_memory(self, data):
        self.ctx.new_embeddings = None          # force the second embedding pass
        orig_update(self, data)
    monkeypatch.setattr(Learner, "update_memory", update_memory)
    b = cilearn.run(quick(method="lucir", out=None), echo=False).metrics
    assert a["accuracy_matrix"] == b["accuracy_matrix"] and a["memory"] == b["memory"]
    assert len(calls) == len(reused) + 4     # phases 1-4 embedded their new images once more
