"""DF-GR (data-free generative replay) and DT-ID (dual-teacher distillation): the generator's
losses by hand, its training against the old model alone, the dual-teacher term by hand, the
new-class teacher's data, and the recipes end to end."""
import inspect
import json
import math
import re

import pytest
import torch

import cilearn
from cilearn.cli import main
from cilearn.data.augment import Augmenter
from cilearn.components import Components, PhaseContext, Step
from cilearn.data.scenario import Phase
from cilearn.learner import Learner
from cilearn.methods.recipe import plan
from cilearn.model_io import architecture, build_from
from cilearn.services import OldOutput, RunServices
from cilearn.terms import DualTeacherDistill
from cilearn.models import build_net
from cilearn.models.net import NetOutput
from cilearn.replay.dfgr import (GeneratorSettings, _BNStats, batch_mean_entropy, bn_statistics_loss,
                                 sample_entropy, train_generator)
from cilearn.train import Batch


@pytest.mark.parametrize("kind", ["kl", "l2"])
def test_bn_statistics_loss_zero_iff_equal(kind):
    m, v = torch.tensor([0.5, -1.0]), torch.tensor([2.0, 0.3])
    assert float(bn_statistics_loss(m, v, m.clone(), v.clone(), kind)) == pytest.approx(0.0, abs=1e-7)
    assert float(bn_statistics_loss(m + 0.1, v, m, v, kind)) > 0
    assert float(bn_statistics_loss(m, v * 2, m, v, kind)) > 0


def test_bn_statistics_kl_by_hand():
    # one channel: batch N(1, 1), running N(0, 4): KL = ln(2/1) + (1 + 1) / (2 * 4) - 1/2
    got = bn_statistics_loss(torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([4.0]),
                             "kl", eps=0.0)
    assert float(got) == pytest.approx(math.log(2) + 2 / 8 - 0.5, rel=1e-6)
    l2 = bn_statistics_loss(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0]), torch.zeros(2),
                            torch.tensor([4.0, 1.0]), "l2")
    assert float(l2) == pytest.approx(1.0 + 3.0)


def test_entropy_terms_by_hand():
    # p = (3/4, 1/4) and (1/4, 3/4): logits (ln 3, 0) and (0, ln 3)
    ln3 = math.log(3)
    logits = torch.tensor([[ln3, 0.0], [0.0, ln3]])
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert float(sample_entropy(logits)) == pytest.approx(h, rel=1e-6)
    assert float(batch_mean_entropy(logits)) == pytest.approx(math.log(2), rel=1e-6)   # mean p = (1/2, 1/2)
    same = torch.tensor([[ln3, 0.0], [ln3, 0.0]])
    assert float(batch_mean_entropy(same)) == pytest.approx(h, rel=1e-6)


def _old_model(seed=0):
    """A convnet whose BN running statistics come from data of mean ~0.3, std ~2 (not the
    (0, 1) of a fresh layer), frozen like a teacher."""
    torch.manual_seed(seed)
    net = build_net("convnet", "linear", 1)
    net.add_classes(3)
    net.train()
    with torch.no_grad():
        for _ in range(20):
            net(torch.randn(64, 1, 8, 8) * 2 + 0.3)
    return net.frozen_copy()


def _bn_loss_of(gen_model, old, aug, n=256):
    hooks = _BNStats(old)
    with torch.no_grad():
        old(aug.normalize(gen_model(torch.randn(n, gen_model.z_dim, generator=torch.Generator().manual_seed(5)))))
    v = float(hooks.loss("kl"))
    hooks.remove()
    return v


def test_generator_training_improves_bn_matching_from_the_model_alone():
    old = _old_model()
    aug = Augmenter("none", 0, (0.5,), (0.5,), channels_last=False)
    lines = []
    s = GeneratorSettings(steps=60, batch_size=64, progress=False, log=lines.append, desc="phase 1 generator")
    g0, _ = train_generator(old, aug.normalize, (1, 8, 8), GeneratorSettings(steps=0, progress=False),
                            torch.Generator().manual_seed(1), torch.device("cpu"))
    g, summary = train_generator(old, aug.normalize, (1, 8, 8), s, torch.Generator().manual_seed(1),
                                 torch.device("cpu"))
    before, after = _bn_loss_of(g0, old, aug), _bn_loss_of(g, old, aug)
    assert after < 0.5 * before, (before, after)
    assert summary["bn_end"] < summary["bn_start"] and summary["seconds"] > 0
    assert len(lines) == 1 and re.fullmatch(r"  phase 1 generator: 60 steps in \d+\.\d s, last step's loss -?\d+\.\d{4}",
                                            lines[0]), lines   # the run's log gets one line (cilearn.progress)
    assert all(not p.requires_grad for p in old.parameters()) and not old.training   # teacher untouched
    x = g(torch.randn(8, s.z_dim))
    assert x.shape == (8, 1, 8, 8) and float(x.min()) >= 0 and float(x.max()) <= 255


def test_generator_training_function_takes_no_data():
    """The generator's training function receives the old model and settings: no data set, no
    images. Its parameters are exactly these, and in a run it is called with nothing else."""
    assert list(inspect.signature(train_generator).parameters) == ["old_model", "normalize", "image_shape", "s",
                                                                  "gen", "device"]


def test_generator_gets_only_the_old_model_in_a_run(quick, monkeypatch):
    import cilearn.data.datasets as ds
    import cilearn.replay as rp
    calls = []
    real = rp.train_generator

    def spy(old_model, normalize, image_shape, s, gen, device):
        calls.append((old_model, normalize, image_shape))
        loaded = ds.load_dataset
        ds.load_dataset = lambda *a, **k: pytest.fail("the generator's training read a data set")
        try:
            return real(old_model, normalize, image_shape, s, gen, device)
        finally:
            ds.load_dataset = loaded

    monkeypatch.setattr(rp, "train_generator", spy)
    res = cilearn.run(quick(method="dfgr", out=None, train__epochs=2, replay__steps=5,
                            scenario={"base": 0, "increment": 5}), echo=False)
    assert len(calls) == 1 and len(res.metrics["phases"]) == 2
    old_model, normalize, shape = calls[0]
    assert old_model.num_classes == 5 and not old_model.training     # the frozen model of phase 0
    assert shape == (1, 8, 8) and normalize.__self__.__class__ is Augmenter   # only normalisation constants


def _learner(quick, method, augment="flip", **over) -> Learner:
    """The engine's side of a run of ``method`` (the recipe's components with their effective
    options, ``plan``) on a digits convnet that has learnt 2 classes, no checkpoints."""
    torch.manual_seed(0)
    cfg = quick(method=method, out=None, **over)
    p = plan(cfg, 8)
    net = build_from(architecture(p, 1))
    net.add_classes(2)
    aug = Augmenter(augment, 0, (0.5,), (0.5,), channels_last=False)
    services = RunServices(cfg, net, None, aug, torch.device("cpu"), torch.Generator(), None)
    return Learner(services, Components(p.build(services)))


def _dtid_learner(quick, init="copy", **components):
    return _learner(quick, "dfgr-dtid", replay__steps=3, loss={"dual_teacher_init": init, "dual_teacher_epochs": 2},
                    **({"components": components} if components else {}))


def _dual_teacher(learner: Learner) -> DualTeacherDistill:
    return next(t for t in learner.components.parts if isinstance(t, DualTeacherDistill))


def _phase_step(batch: Batch, phase: Phase, old_logits: torch.Tensor | None = None) -> Step:
    """A main-stage step of ``batch`` in ``phase`` (the old model's logits ``old_logits`` on it)."""
    old = (lambda b: OldOutput(old_logits, None, None)) if old_logits is not None else None
    ctx = PhaseContext(phase, None, None, batch.x, batch.y, torch.ones(phase.seen), None, old_outputs=old)
    return Step(batch, ctx)


def test_dual_teacher_term_by_hand(quick):
    term = _dual_teacher(_dtid_learner(quick))
    assert term.options.temperature == 2.0 and term.options.epochs == 2 and term.options.rule == "blockwise"
    # the new teacher's logits [B, 4]; its new-class block (ids 2, 3) is (2, 0) and (0, 0)
    t_logits = torch.tensor([[7.0, -3.0, 2.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    term.cache = lambda batch: OldOutput(t_logits[batch.idx], None, None)
    logits = torch.tensor([[5.0, -1.0, 0.0, 2.0], [0.0, 0.0, 1.0, 1.0]])
    out = NetOutput(logits, torch.zeros(2, 3), [])
    batch = Batch(torch.zeros(2, 1, 8, 8), torch.tensor([2, 3]), torch.tensor([0, 1]), torch.tensor([0, 0]))
    step = _phase_step(batch, Phase(1, 2, 4))           # the phase's new-class block: ids 2, 3

    def kl(t, s):   # KL(softmax(t / 2) || softmax(s / 2)) over a 2-logit block
        p = [math.exp(v / 2) for v in t]
        q = [math.exp(v / 2) for v in s]
        p, q = [v / sum(p) for v in p], [v / sum(q) for v in q]
        return sum(a * math.log(a / b) for a, b in zip(p, q))

    expected = (kl([2.0, 0.0], [0.0, 2.0]) + kl([0.0, 0.0], [1.0, 1.0])) / 2   # old block (5, -1) unused
    w, value = term.terms(step, out)["dual-teacher"]
    assert w == 1.0 and float(value) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("init", ["copy", "scratch"])
def test_new_class_teacher_trains_on_new_images_only(quick, monkeypatch, init):
    import cilearn.terms as tr              # the module whose new-class teacher stage calls fit
    seen = []
    real_fit = tr.fit

    def spy(model, x, y, *a, **k):
        first_conv = next(p for n, p in model.named_parameters() if n.startswith("backbone"))
        seen.append((model, y.clone(), first_conv.detach().clone()))
        return real_fit(model, x, y, *a, **k)

    monkeypatch.setattr(tr, "fit", spy)
    learner = _dtid_learner(quick, init)
    net, aug = learner.net, learner.s.augmenter
    x = torch.randint(0, 255, (30, 1, 8, 8), dtype=torch.uint8)
    y = torch.cat([torch.randint(0, 2, (10,)), torch.randint(2, 4, (20,))])   # 10 exemplars of old classes
    old_rows = net.head.weight.detach().clone()
    old_conv = next(p for n, p in net.named_parameters() if n.startswith("backbone")).detach().clone()
    learner.begin(Phase(1, 2, 4), x, y)             # old model, grown net, the components' phase start
    term = _dual_teacher(learner)
    (model, ys, start_conv), = seen
    assert model is not net and model is not learner.ctx.old_model
    assert len(ys) == 20 and bool((ys >= 2).all())                 # new classes only: no exemplar
    assert term.cache.cached[0][:, :, 2:4].shape == (2, 30, 2)     # its new-block logits, per view
    with torch.no_grad():                                          # ... which are the trained new teacher's
        for v in range(2):
            assert torch.allclose(term.cache.cached[0][v], model(aug.view(x, v)).logits, atol=1e-5)
    assert all(not p.requires_grad for p in model.parameters())
    assert torch.equal(net.head.weight[:2], old_rows)              # the student is not touched
    # copy: the new teacher starts from the old model; scratch: from a fresh initialisation
    assert torch.equal(start_conv, old_conv) == (init == "copy")


@pytest.mark.parametrize("method", ["dfgr", "dfgr-dtid"])
def test_dfgr_recipes_end_to_end_with_samples_png(method, quick):
    res = cilearn.run(quick(method=method, replay__steps=10, report={"save_samples": 3}), echo=False)
    m = res.metrics
    assert m["memory"]["total_images"] == 0
    for r in m["phases"][1:]:
        assert r["generator_seconds"] > 0 and r["generator_bn_end"] < r["generator_bn_start"]
        assert "replay_kd" in r["loss"] and r["loss"]["replay_kd"] >= 0
        assert ("dual-teacher" in r["loss"]) == (method == "dfgr-dtid")
        assert (r.get("new_teacher_seconds") is not None) == (method == "dfgr-dtid")
    assert m["phases"][0]["generator_seconds"] is None
    assert m["phases"][-1]["acc_new_among_new"] > 70
    for i in range(1, 5):
        assert (res.out_dir / f"samples-phase{i}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("base,own", [("icarl", "kd"), ("lucir", "less_forget"), ("podnet", "pod_spatial")])
def test_replay_and_dual_teacher_compose_with_exemplar_methods_from_cli(base, own, tmp_path):
    out = tmp_path / "r"
    code = main(["run", "--method", base, "--replay", "dfgr", "--distill", "dual-teacher", "--epochs", "1",
                 "--replay.steps", "3", "--out", str(out), "--no-progress", "--quiet"])
    assert code == 0
    m = json.loads((out / "metrics.json").read_text())
    loss = m["phases"][1]["loss"]
    assert {own, "replay_kd", "dual-teacher"} <= set(loss), loss
    assert m["memory"]["total_images"] > 0 and m["phases"][1]["generator_seconds"] > 0


@pytest.mark.parametrize("args,msg", [
    (["--replay", "gan"], "--replay: unknown replay component 'gan'"),
    (["--replay.bn-loss", "l1"], "--replay.bn-loss"),
    (["--loss.dual-teacher-init", "random"], "--loss.dual-teacher-init"),
    (["--replay.steps", "0"], "--replay.steps"),
    (["--replay.forward", "both"], "--replay.forward must be joint or separate"),
    (["--replay.update-bn", "false"], "--replay.update-bn false applies to --replay.forward separate"),
    (["--distill", "dual-teacher", "--components.dual-teacher.rule", "mean"],
     ("components.dual-teacher: init must be copy or scratch, rule blockwise or joint, temperature > 0; "
      "got 'copy', 'mean'")),
    (["--components.dual-teacher.rule", "joint"], "components.dual-teacher: 'dual-teacher' is not a component of this run"),
])
def test_bad_replay_options_one_line_exit_2(args, msg, tmp_path, capsys):
    out = tmp_path / "x"
    code = main(["run", "--method", "dfgr", *args, "--out", str(out), "--no-progress", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and msg in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_bn_running_stats_frozen_keeps_running_stats_and_counter():
    import copy

    from cilearn.replay import bn_running_stats_frozen
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.Flatten(), torch.nn.Linear(48, 2))
    net.train()
    net(torch.randn(4, 1, 6, 6))                     # one real batch: stats move, counter 1
    bn = net[1]
    before = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    x = torch.randn(8, 1, 6, 6) * 5 + 3
    ref = copy.deepcopy(net)(x)                      # an ordinary train-mode forward (batch statistics)
    with bn_running_stats_frozen(net):
        out = net(x)
    assert torch.allclose(out, ref)                  # same normalisation inside
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    assert int(bn.num_batches_tracked) == before[2] and bn.momentum == 0.1
    net(x)                                           # outside: a real batch moves them again
    assert not torch.equal(bn.running_mean, before[0]) and int(bn.num_batches_tracked) == before[2] + 1


@pytest.mark.parametrize("forward", ["joint", "separate"])
def test_synthetic_samples_share_the_real_batch_forward(quick, forward):
    """--replay.forward joint (default): one student forward over the real batch and the synthetic
    samples, so BatchNorm's batch statistics (and the one running-statistics update) include them;
    the method's own loss sees the real rows only. separate: two forwards, two updates."""
    import copy
    learner = _learner(quick, "dfgr", augment="none",
                       replay={"steps": 1, "samples_per_batch": 3, "forward": forward})
    net, services = learner.net, learner.s
    y = torch.tensor([2, 3, 2, 3, 2])
    learner.begin(Phase(1, 2, 4), torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8), y)   # the net grows to 4
    comp = next(c for c in learner.components.active if c.kind == "replay")
    fake = torch.linspace(0, 255, 64).view(1, 1, 8, 8)
    comp.generator = lambda z: fake.expand(len(z), 1, 8, 8) * (1 + z[:, :1, None, None].abs())   # [n, 1, 8, 8] pixels
    bn = next(m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    sizes = []
    hook = bn.register_forward_hook(lambda mod, inp, out: sizes.append(inp[0].shape[0]))
    x = torch.rand(5, 1, 8, 8)
    batch = Batch(x, y, torch.arange(5), None)
    ref, real_only = copy.deepcopy(net), copy.deepcopy(net)
    gen_state = services.gen.get_state()
    loss, terms = learner.loss(batch)
    hook.remove()
    assert {"cls", "replay_kd"} <= set(terms) and torch.isfinite(loss)
    services.gen.set_state(gen_state)                      # the same samples again, for the reference
    xs = comp.sample(3)
    if forward == "joint":
        assert sizes == [8]                                # 5 real + 3 synthetic in one BatchNorm batch
        ref(torch.cat([x, xs]))
    else:
        assert sizes == [5, 3]
        ref(x)
        ref(xs)
    ref_bn = next(m for m in ref.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert torch.allclose(bn.running_mean, ref_bn.running_mean, atol=1e-6)
    assert int(bn.num_batches_tracked) == (1 if forward == "joint" else 2)
    real_only(x)                                           # what the real batch alone would have given
    ro_bn = next(m for m in real_only.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert not torch.allclose(bn.running_mean, ro_bn.running_mean, atol=1e-4)


def test_dual_teacher_joint_rule_by_hand(quick):
    """The joint rule: one softmax over all seen classes; the old block from the old teacher, the
    new block from the new teacher shifted by T (LSE(old_t / T) - LSE(new_t[:old] / T))."""
    from cilearn.losses import dual_teacher_joint_target
    T = 2.0
    old_t = torch.tensor([[2.0, 0.0]])                       # the old teacher, 2 old classes
    new_t = torch.tensor([[0.0, 0.0, 4.0, 2.0]])             # the new teacher, old block 0, 0; new block 4, 2
    target = dual_teacher_joint_target(old_t, new_t, 2, T)
    c = T * (math.log(math.exp(1.0) + 1.0) - math.log(2.0))  # LSE(1, 0) - LSE(0, 0)
    assert target.tolist()[0] == pytest.approx([2.0, 0.0, 4.0 + c, 2.0 + c], rel=1e-6)
    p = torch.softmax(target / T, 1)[0]
    q_new = torch.softmax(new_t / T, 1)[0]                   # the new teacher's own distribution
    # its odds of new against old and its split within the new block are kept; the old split is the old teacher's
    assert (p[2:].sum() / p[:2].sum()).item() == pytest.approx((q_new[2:].sum() / q_new[:2].sum()).item(), rel=1e-5)
    assert (p[2] / p[3]).item() == pytest.approx(math.exp(1.0), rel=1e-5)
    assert (p[0] / p[1]).item() == pytest.approx(math.exp(1.0), rel=1e-5)

    term = _dual_teacher(_dtid_learner(quick, **{"dual-teacher": {"rule": "joint"}}))
    assert term.options.rule == "joint" and term.options.temperature == T
    term.cache = lambda batch: OldOutput(new_t, None, None)
    s = torch.tensor([[1.0, 0.0, 0.5, 0.5]])
    out = NetOutput(s, torch.zeros(1, 3), [])
    batch = Batch(torch.zeros(1, 1, 8, 8), torch.tensor([2]), torch.tensor([0]), None)
    w, value = term.terms(_phase_step(batch, Phase(1, 2, 4), old_t), out)["dual-teacher"]
    q = torch.softmax(s / T, 1)[0]
    want = sum(float(a) * math.log(float(a) / float(b)) for a, b in zip(p, q))
    assert float(value) == pytest.approx(want, rel=1e-5)
    assert DualTeacherDistill(type(term.options)(rule="joint"), None).needs_old_outputs
    assert not DualTeacherDistill(type(term.options)(), None).needs_old_outputs
