"""The training loop: schedules, divergence, the teacher cache."""
import math

import pytest
import torch

from cilearn.data.augment import Augmenter
from cilearn.models import build_net
from cilearn.train import Batch, DivergenceError, FitSettings, fit, lr_at


def test_cosine_and_step_schedules():
    s = FitSettings(epochs=10, lr=0.1, schedule="cosine")
    assert lr_at(s, 0, 0, 5) == pytest.approx(0.1)
    assert lr_at(s, 5, 0, 5) == pytest.approx(0.05)
    assert lr_at(s, 9, 4, 5) == pytest.approx(0.05 * (1 + math.cos(math.pi * 49 / 50)))
    st = FitSettings(epochs=10, lr=0.1, schedule="step", milestones=(3, 6), gamma=0.1)
    assert [round(lr_at(st, e, 0, 5), 6) for e in (0, 2, 3, 5, 6, 9)] == [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]


def _setup():
    torch.manual_seed(0)
    net = build_net("convnet", "linear", 1)
    net.add_classes(2)
    x = torch.randint(0, 255, (40, 1, 8, 8), dtype=torch.uint8)
    y = (x.float().mean((1, 2, 3)) > 127).long()
    return net, x, y, Augmenter("none", 0, (0.5,), (0.5,))


def test_fit_learns_and_counts_images():
    net, x, y, aug = _setup()
    ce = lambda b: (torch.nn.functional.cross_entropy(net(b.x).logits, b.y), {})  # noqa: E731
    r = fit(net, x, y, ce, FitSettings(epochs=30, lr=0.05, batch_size=8, progress=False), aug,
            torch.Generator().manual_seed(0))
    assert r.images == 30 * 40 and r.images_per_s > 0
    acc = (net.eval()(aug.test(x)).logits.argmax(1) == y).float().mean().item()
    assert acc > 0.9


def test_nan_loss_stops_with_phase_and_epoch():
    net, x, y, aug = _setup()

    def bad(b: Batch):
        out = net(b.x).logits.sum()
        return out * float("nan"), {}
    with pytest.raises(DivergenceError, match="phase 3: .* epoch 1"):
        fit(net, x, y, bad, FitSettings(epochs=2, lr=0.1, progress=False), aug, torch.Generator(), desc="phase 3")


def test_teacher_cache_equals_running_the_teacher(quick):
    """The cached teacher outputs (finite flip views) are those of the teacher on the batch."""
    from cilearn.services import OldOutputs, RunServices
    net, x, y, _ = _setup()
    aug = Augmenter("flip", 0, (0.5,), (0.5,), channels_last=False)
    teacher = net.frozen_copy()
    ctx = RunServices(quick(), net, None, aug, torch.device("cpu"), torch.Generator(), None)
    cache = OldOutputs(teacher, x, ctx)
    xb, view = aug.train(x[:16], torch.Generator().manual_seed(1))
    assert 0 < int(view.sum()) < 16
    logits, emb, extra = cache(Batch(xb, y[:16], torch.arange(16), view))
    assert extra is None
    with torch.no_grad():
        ref = teacher(xb)
    assert torch.allclose(logits, ref.logits, atol=1e-5) and torch.allclose(emb, ref.embedding, atol=1e-5)


def test_compile_option_plumbing():
    import argparse

    from cilearn.cli import add_run_flags, build_config
    p = argparse.ArgumentParser()
    add_run_flags(p)
    for argv, want in ((["--compile"], True), ([], False), (["--train.compile", "true"], True)):
        args, extra = p.parse_known_args(argv)
        args.command = "run"
        assert build_config(args, extra).train.compile is want


def test_compiled_fit_matches_eager_and_is_undone():
    """One tiny torch.compile on the CPU (about 15-30 s): the compiled training steps give the eager
    steps' parameters up to float rounding, and the backbone is eager again after the stage."""
    results = []
    for compiled in (False, True):
        net, x, y, aug = _setup()
        ce = lambda b: (torch.nn.functional.cross_entropy(net(b.x).logits, b.y), {})  # noqa: E731
        fit(net, x, y, ce, FitSettings(epochs=2, lr=0.05, batch_size=8, progress=False, compile=compiled), aug,
            torch.Generator().manual_seed(0))
        assert net.backbone._compiled_call_impl is None
        results.append(torch.cat([p.detach().reshape(-1) for p in net.parameters()]))
    assert torch.allclose(results[0], results[1], rtol=1e-4, atol=1e-5)


def test_compile_failure_is_one_line_config_error(monkeypatch):
    from torch._dynamo.exc import TorchDynamoException

    from cilearn.errors import ConfigError
    net, x, y, aug = _setup()

    def fails(b):
        raise TorchDynamoException("backend failed: no C++ compiler\nfound")
    with pytest.raises(ConfigError, match="^--train.compile: torch.compile failed") as e:
        fit(net, x, y, fails, FitSettings(epochs=1, lr=0.1, progress=False, compile=True), aug, torch.Generator())
    assert "\n" not in str(e.value) and net.backbone._compiled_call_impl is None
    with pytest.raises(ConfigError, match="no backbone"):
        fit(torch.nn.Linear(2, 2), x, y, fails, FitSettings(epochs=1, lr=0.1, compile=True), aug, torch.Generator())


def test_optim_builds_the_named_optimizer_and_steps_as_it():
    """``optim``: SGD with momentum, Adam (weight decay added to the gradient) or AdamW (decoupled);
    one step of each equals PyTorch's own optimiser on a copy of the parameter."""
    from cilearn.train import make_optimizer
    for name, cls in (("sgd", torch.optim.SGD), ("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)):
        w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
        frozen = torch.nn.Parameter(torch.ones(1), requires_grad=False)
        opt = make_optimizer([w, frozen], FitSettings(epochs=1, lr=0.1, optim=name, weight_decay=0.01))
        assert type(opt) is cls and len(opt.param_groups[0]["params"]) == 1          # frozen ones left out
        ref = torch.nn.Parameter(w.detach().clone())
        kw = {"momentum": 0.9} if name == "sgd" else {}
        ref_opt = cls([ref], lr=0.1, weight_decay=0.01, **kw)
        for p, o in ((w, opt), (ref, ref_opt)):
            (p * torch.tensor([3.0, 1.0])).sum().backward()
            o.step()
        assert torch.equal(w, ref)
    # Adam's first step moves every coordinate by about lr whatever its gradient's size; SGD's by lr x gradient
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = make_optimizer([w], FitSettings(epochs=1, lr=0.1, optim="adam", weight_decay=0.0))
    (w * torch.tensor([3.0, 0.5])).sum().backward()
    opt.step()
    assert torch.allclose(w, torch.tensor([0.9, -2.1]), atol=1e-6)


def test_optim_option_runs_and_is_recorded(tmp_path, capsys):
    import yaml
    from cilearn.cli import main
    out = tmp_path / "adam"
    assert main(["run", "--optim", "adam", "--lr", "0.001", "--epochs", "3", "--precision", "fp32", "--out", str(out),
                 "--no-progress"]) == 0
    assert "Adam" in capsys.readouterr().out
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["optim"] == "adam"
    assert main(["run", "--optim", "rmsprop", "--out", str(tmp_path / "bad"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--optim must be one of sgd, adam, adamw" in err and err.count("\n") == 1 and not (tmp_path / "bad").exists()


def test_clip_grad_bounds_each_step():
    """``clip_grad`` c: one SGD step (momentum 0, lr 1, one batch of the whole set) moves the
    parameters by exactly the clipped gradient: norm c when the gradient is larger."""
    net, x, y, aug = _setup()
    ce = lambda b: (1000 * torch.nn.functional.cross_entropy(net(b.x).logits, b.y), {})  # noqa: E731
    before = torch.cat([p.detach().flatten().clone() for p in net.parameters()])
    fit(net, x, y, ce, FitSettings(epochs=1, lr=1.0, batch_size=len(x), momentum=0.0, weight_decay=0.0,
                                   schedule="step", clip_grad=0.5, progress=False), aug, torch.Generator().manual_seed(0))
    after = torch.cat([p.detach().flatten() for p in net.parameters()])
    assert abs((after - before).norm().item() - 0.5) < 1e-4
