"""LwM wired into the engine: the recipe, --distill attention on other methods, the cached
teacher maps, --save-attention, and LwM with exemplars."""
import json

import pytest
import torch

import cilearn
from cilearn.cli import main
from cilearn.components import Components, PhaseContext, Step, build, component_class
from cilearn.data.augment import Augmenter
from cilearn.data.scenario import Phase
from cilearn.learner import Learner
from cilearn.methods import METHODS
from cilearn.methods.recipe import plan
from cilearn.model_io import architecture, build_from
from cilearn.models import build_net
from cilearn.services import OldOutput, RunServices, SplitData
from cilearn.terms import AttentionDistill
from cilearn.train import Batch


def test_lwm_recipe_is_lwf_plus_attention():
    lwm, lwf = METHODS.get("lwm"), METHODS.get("lwf")
    assert lwf.terms == ("kd",) and lwm.terms == ("kd", "attention") and not lwm.exemplars
    assert lwm.classification == lwf.classification == "ce-local"     # LwF's L_new: CE over the new classes


def test_lwm_end_to_end_exemplar_free_with_attention_png(quick, tmp_path):
    res = cilearn.run(quick(method="lwm", report={"save_attention": 4}), echo=False)
    m = res.metrics
    assert m["memory"]["total_images"] == 0 and m["avg_incremental_acc_nme"] is None
    assert all("attention" in r["loss"] for r in m["phases"][1:]) and "attention" not in m["phases"][0]["loss"]
    assert all(r["loss"]["attention"] >= 0 for r in m["phases"][1:])
    for i in range(1, 5):
        png = res.out_dir / f"attention-phase{i}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (res.out_dir / "attention-phase0.png").exists()   # no teacher in the first phase
    # the KD-target diagnostic: null without a teacher, a share of images and a normalised entropy after
    assert m["phases"][0]["kd_target_entropy"] is None and m["phases"][0]["kd_target_top_share"] is None
    for r in m["phases"][1:]:
        assert 0.0 < r["kd_target_entropy"] <= 1.0 and 1 / (r["classes_seen"] - 2) <= r["kd_target_top_share"] <= 1.0


def test_lwm_with_exemplars(quick):
    m = cilearn.run(quick(method="lwm", memory={"total": 60}), echo=False).metrics
    assert 0 < m["memory"]["total_images"] <= 60 and m["avg_incremental_acc_nme"] is not None
    # with exemplars the first task is still recognised after the last phase (NME on exemplar
    # means; after 6 epochs the CNN head is still biased to the newest classes)
    assert m["accuracy_matrix_nme"][-1][0] > 50.0


def test_distill_attention_composes_with_icarl(tmp_path, capsys):
    out = tmp_path / "r"
    code = main(["run", "--method", "icarl", "--distill", "attention", "--loss.attention-weight", "2",
                 "--epochs", "2", "--out", str(out), "--no-progress", "--quiet"])
    assert code == 0
    m = json.loads((out / "metrics.json").read_text())
    assert "attention" in m["phases"][1]["loss"] and "kd" in m["phases"][1]["loss"]
    code = main(["run", "--distill", "nope", "--out", str(tmp_path / "x")])
    assert code == 2 and "unknown term component 'nope'" in capsys.readouterr().err


def test_cached_teacher_maps_equal_per_batch_maps(quick):
    """With flip augmentation the teacher's maps are cached per image and view; they must be
    what the teacher computes on the augmented batch."""
    torch.manual_seed(0)
    cfg = quick(method="lwm")
    p = plan(cfg, 8)
    aug = Augmenter("flip", 0, (0.5,), (0.5,), channels_last=False)
    services = RunServices(cfg, build_from(architecture(p, 1)), None, aug, torch.device("cpu"), torch.Generator(), None)
    learner = Learner(services, Components(p.build(services)))     # the recipe's components, as a run has them
    learner.net.add_classes(3)
    x = torch.randint(0, 255, (24, 1, 8, 8), dtype=torch.uint8)
    y = torch.randint(3, 5, (24,))
    xt, yt = learner.training_set(Phase(1, 3, 5), SplitData(x, y, x[:0], y[:0]))   # the phase's components start
    learner.begin(Phase(1, 3, 5), xt, yt)
    term, = [c for c in learner.components.active if c.name == "attention"]
    assert isinstance(term, AttentionDistill) and term.cam.shape == (2, 24, 4, 4)
    xb, view = aug.train(x, torch.Generator().manual_seed(0))
    step = Step(Batch(xb, y, torch.arange(24), view), learner.ctx)
    cam_c, b_c = term.teacher_maps(step)
    term.cam = None                                          # force the per-batch path
    cam_b, b_b = term.teacher_maps(step)
    assert torch.equal(b_c, b_b) and torch.allclose(cam_c, cam_b, atol=1e-5)
    assert int(b_c.max()) < 3                                # b is an old class


def test_joint_with_memory_is_refused(tmp_path, capsys):
    code = main(["run", "--method", "joint", "--memory", "100", "--out", str(tmp_path / "r")])
    assert code == 2 and "memory budget does not apply" in capsys.readouterr().err


def test_lwf_mc_objective_by_hand_and_anchors_old_logits(quick):
    """LwF-MC's BCE: targets one-hot for the new classes, teacher sigmoids for the old ones;
    hand value on one sample. Unlike softmax KD it is not invariant to shifting the old logits."""
    import math

    from cilearn.losses import kd_kl
    p = plan(quick(method="lwf-mc"), 8)
    assert p.names("classification") == ["bce"] and p.names("term") == []   # one loss: classification and distillation
    cls = build(component_class("classification", "bce"), p.options["bce"], None)
    t_logits = torch.tensor([[0.0, 2.0]])
    phase = Phase(1, 2, 3)
    ctx = PhaseContext(phase, None, None, torch.zeros(1, 1, 2, 2), torch.tensor([2]), torch.ones(3), None,
                       old_outputs=lambda batch: OldOutput(t_logits, torch.zeros(1, 4), None))
    out = type("O", (), {"logits": torch.tensor([[0.0, 1.0, 3.0]])})()
    batch = Batch(torch.zeros(1, 1, 2, 2), torch.tensor([2]), torch.tensor([0]), None)

    def objective(out):
        terms = cls.terms(Step(batch, ctx), out)
        return sum(w * v for w, v in terms.values()), terms
    loss, terms = objective(out)
    sig = lambda z: 1 / (1 + math.exp(-z))   # noqa: E731
    bce = lambda z, t: -(t * math.log(sig(z)) + (1 - t) * math.log(1 - sig(z)))   # noqa: E731
    want = bce(0.0, 0.5) + bce(1.0, sig(2.0)) + bce(3.0, 1.0)
    assert loss.item() == pytest.approx(want, rel=1e-5) and set(terms) == {"bce"}
    shifted = type("O", (), {"logits": out.logits - torch.tensor([[5.0, 5.0, 0.0]])})()
    assert objective(shifted)[0].item() > loss.item() + 1.0
    assert kd_kl(shifted.logits[:, :2], t_logits, 2.0).item() == pytest.approx(kd_kl(out.logits[:, :2], t_logits, 2.0).item(),
                                                                            abs=1e-6)


def test_lwf_mc_with_attention_end_to_end(quick):
    """LwM's attention term on the LwF-MC base: both terms act, no exemplars, and the old classes
    keep a non-zero CNN accuracy (LwF with the all-class softmax, ``--loss ce``, drops them to
    exactly 0 on this protocol)."""
    m = cilearn.run(quick(method="lwf-mc", loss={"distill": ["attention"]}), echo=False).metrics
    assert m["memory"]["total_images"] == 0
    assert all({"bce", "attention"} <= set(r["loss"]) for r in m["phases"][1:])
    assert m["phases"][1]["acc_old"] > 20.0


def test_lwf_local_ce_keeps_old_classes_that_all_class_ce_loses(quick):
    """LwF's CE over the new classes only (``ce-local``, the default) against the softmax over all
    seen classes (``--loss ce``), exemplar-free: the latter pushes the old logits down on the new
    images, so far fewer old-class test images are recognised after each phase."""
    def old_acc(**over):
        m = cilearn.run(quick(method="lwf", **over), echo=False).metrics
        return sum(r["acc_old"] for r in m["phases"][1:]) / 4
    local, full = old_acc(), old_acc(loss={"cls": "ce"}, out=None)
    assert local > full + 20.0, (local, full)


def _attention_term(quick, student_bn):
    """The attention term at the start of phase 1 (3 old classes, 2 new): the student, the term
    (phase started: the old model's maps cached) and a step on 16 images of class 3."""
    torch.manual_seed(0)
    net = build_net("convnet", "linear", 1)
    net.add_classes(3)
    aug = Augmenter("none", 0, (0.5,), (0.5,), channels_last=False)
    services = RunServices(quick(method="lwm"), net, None, aug, torch.device("cpu"), torch.Generator(), None)
    x = torch.randint(0, 255, (16, 1, 8, 8), dtype=torch.uint8)
    with torch.no_grad():                    # running statistics of the data (not the init's 0 / 1)
        for _ in range(20):
            net(aug.test(x))
    teacher = net.frozen_copy()
    term = build(component_class("term", "attention"), {"student_bn": student_bn}, services)
    net.add_classes(2)                       # the model grows before the phase starts
    y = torch.full((16,), 3)
    ctx = PhaseContext(Phase(1, 3, 5), net, teacher, x, y, torch.bincount(y, minlength=5).float(), None)
    term.phase_start(ctx)
    net.train()
    return net, term, Step(Batch(aug.test(x), y, torch.arange(16), None), ctx)


@pytest.mark.parametrize("student_bn", ["eval", "train"])
def test_attention_loss_at_student_equal_to_teacher(quick, student_bn):
    """L_AD with the student equal to the old model (a phase's first step): exactly 0 when both
    maps are taken in eval mode; with the student's map from the train-mode forward (BN batch
    statistics) it is not, which is the artefact the default removes."""
    net, term, step = _attention_term(quick, student_bn)
    term.before_step(step)                              # the step's start
    out = net(step.batch.x)                             # the training forward (train mode, moves the BN statistics)
    (w, loss), = term.terms(step, out).values()
    if student_bn == "eval":
        assert loss.item() == 0.0
    else:
        assert loss.item() > 0.01
    assert net.training                                 # the eval-mode forward left the student in train mode
    assert term.diagnostics() == {"attention_loss_first_step": loss.item()}
    assert term.diagnostics() == {"attention_loss_first_step": None}   # read once per phase


def test_eval_mode_attention_loss_trains_the_student(quick):
    """The eval-mode student map keeps its graph: L_AD of a perturbed student sends a gradient to
    the backbone's convolutions (not only the head), and leaves the BN running statistics alone."""
    net, term, step = _attention_term(quick, "eval")
    with torch.no_grad():
        for p in net.backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))
    stats = [b.clone() for n, b in net.named_buffers() if "running" in n]
    term.before_step(step)
    out = net(step.batch.x)
    after_train_forward = [b.clone() for n, b in net.named_buffers() if "running" in n]
    (w, loss), = term.terms(step, out).values()
    assert loss.item() > 0.01
    loss.backward()
    grads = [p.grad for p in net.backbone.parameters() if p.dim() == 4]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    now = [b for n, b in net.named_buffers() if "running" in n]
    assert all(torch.equal(a, b) for a, b in zip(after_train_forward, now))   # the eval forward updated none
    assert not all(torch.equal(a, b) for a, b in zip(stats, after_train_forward))


def test_lwm_records_the_first_step_attention_loss(quick):
    m = cilearn.run(quick(method="lwm", train={"epochs": 2, "progress": False, "precision": "fp32"}),
                    echo=False).metrics
    firsts = [r["attention_loss_first_step"] for r in m["phases"]]
    assert firsts[0] is None and all(v is not None and v < 1e-4 for v in firsts[1:]), firsts
    m2 = cilearn.run(quick(method="lwm", out=None, components={"attention": {"student_bn": "train"}},
                          train={"epochs": 2, "progress": False, "precision": "fp32"}), echo=False).metrics
    assert all(r["attention_loss_first_step"] > 0.05 for r in m2["phases"][1:])
