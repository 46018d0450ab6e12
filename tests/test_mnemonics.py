"""Mnemonics exemplar optimizers (cilearn.memory.mnemonics): the bilevel gradient against finite
differences, what each step may change, the stored format, config errors, end-to-end runs."""
import json

import pytest
import torch

import cilearn
from cilearn.cli import main
from cilearn.memory import Budget, Memory
from cilearn.memory.mnemonics import (MEMORY_OPTIMIZERS, MnemonicsSettings, bilevel_loss, model_state,
                                      split_halves, unrolled_finetune)
from cilearn.models import build_net


def tiny_net(classes=3, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    net = build_net("convnet", "linear", 1)
    net.add_classes(classes)
    return net.to(dtype).eval()


def settings(**over):
    d = dict(iterations=3, inner_steps=1, inner_lr=0.05, lr=0.05, batch_size=16, adjust_old=True,
             quantize=False, step="adam")
    d.update(over)
    return MnemonicsSettings(**d)


def normalize(x):
    return (x.float() / 255.0 - 0.5) / 0.25


def filled_memory(net, classes, old=range(0), per_class=4, seed=0):
    """A memory holding herding-selected exemplars of ``old`` and ``classes`` from random images;
    returns it with the new classes' images ``(x uint8, y)``."""
    g = torch.Generator().manual_seed(seed)
    mem = Memory(Budget(per_class=per_class))
    for cls in (old, classes):
        if len(cls) == 0:
            continue
        y = torch.arange(cls.start, cls.stop).repeat_interleave(12)
        x = torch.randint(0, 256, (len(y), 1, 8, 8), generator=g, dtype=torch.uint8)
        with torch.no_grad():
            feats = net(normalize(x)).embedding
        mem.update(x, y, cls, feats, cls.stop)
    return mem, x, y


def test_bilevel_gradient_matches_finite_differences_through_two_inner_steps():
    """K = 2 unrolled steps: d loss / d exemplars from autograd against central differences
    along random directions (float64), so the gradient flows through both inner steps."""
    net = tiny_net(dtype=torch.float64)
    params, buffers = model_state(net)
    g = torch.Generator().manual_seed(1)
    ex = torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64, requires_grad=True)
    ex_y = torch.tensor([0, 1, 2, 0])
    vx = torch.randn(6, 1, 8, 8, generator=g, dtype=torch.float64)
    vy = torch.tensor([0, 1, 2, 2, 1, 0])

    def f(e, k=2):
        return bilevel_loss(net, params, buffers, e, ex_y, vx, vy, steps=k, lr=0.5)

    (grad,) = torch.autograd.grad(f(ex), ex)
    assert grad.abs().max() > 1e-6                              # reaches the pixels
    eps = 1e-6
    for _ in range(3):
        v = torch.randn(ex.shape, generator=g, dtype=torch.float64)
        e = ex.detach()
        fd = ((f(e + eps * v) - f(e - eps * v)) / (2 * eps)).detach()   # (the inner steps need autograd)
        assert torch.isclose((grad * v).sum(), fd, rtol=1e-4, atol=1e-9), (float((grad * v).sum()), float(fd))
    # the second step matters: the one-step gradient is a different vector
    (grad1,) = torch.autograd.grad(f(ex, k=1), ex)
    assert (grad - grad1).abs().max() > 1e-3 * grad.abs().max()
    # without inner steps the validation loss does not depend on the exemplars at all
    assert unrolled_finetune(net, params, buffers, ex, ex_y, 0, 0.5) is params


def test_split_halves_partition_alternate_positions():
    y = torch.tensor([0, 0, 0, 0, 0, 1, 1, 2])
    a, b = split_halves(y)
    assert a.tolist() == [0, 2, 4, 5, 7] and b.tolist() == [1, 3, 6]
    assert sorted(a.tolist() + b.tolist()) == list(range(len(y)))


@pytest.mark.parametrize("quantize", [False, True])
def test_mnemonics_changes_new_exemplars_in_range_same_labels_and_count(quantize):
    net = tiny_net(4)
    mem, x, y = filled_memory(net, range(2, 4), old=range(0, 2))
    herding = {c: v.clone() for c, v in mem.exemplars.items()}
    opt = MEMORY_OPTIMIZERS.get("mnemonics")(settings(quantize=quantize))
    before = opt(mem, net, normalize, range(2, 4), x, y, torch.Generator().manual_seed(0))
    assert set(before) == set(herding) and all(torch.equal(before[c], herding[c]) for c in herding)
    assert set(mem.exemplars) == {0, 1, 2, 3}                                    # labels kept
    assert all(mem.exemplars[c].shape == herding[c].shape for c in herding)      # count kept
    for c in (2, 3):
        e = mem.exemplars[c]
        assert e.dtype == (torch.uint8 if quantize else torch.float32)
        assert float(e.float().min()) >= 0.0 and float(e.float().max()) <= 255.0
        assert (e.float() - herding[c].float()).abs().mean() > 0.5                # moved
    assert mem.nbytes == sum(v.numel() for v in herding.values()) * (1 if quantize else 4)
    s = opt.stats
    assert s["new_objective_after"] < s["new_objective_before"]
    assert s["old_objective_after"] < s["old_objective_before"]


def test_split_halves_step_touches_only_old_class_exemplars():
    net = tiny_net(4)
    runs = {}
    for adjust in (False, True):
        mem, x, y = filled_memory(net, range(2, 4), old=range(0, 2))
        herding = {c: v.clone() for c, v in mem.exemplars.items()}
        MEMORY_OPTIMIZERS.get("mnemonics")(settings(adjust_old=adjust))(
            mem, net, normalize, range(2, 4), x, y, torch.Generator().manual_seed(0))
        runs[adjust] = mem.exemplars
    for c in (0, 1):   # old: unchanged without the adjustment, changed with it
        assert torch.equal(runs[False][c], herding[c])
        assert (runs[True][c].float() - herding[c].float()).abs().mean() > 0.5
    for c in (2, 3):   # new: the same with and without it
        assert torch.equal(runs[False][c], runs[True][c])


def test_single_level_moves_new_exemplars_only():
    net = tiny_net(4)
    mem, x, y = filled_memory(net, range(2, 4), old=range(0, 2))
    herding = {c: v.clone() for c, v in mem.exemplars.items()}
    opt = MEMORY_OPTIMIZERS.get("mnemonics-single")(settings(iterations=None, step="adam"))
    opt(mem, net, normalize, range(2, 4), x, y, torch.Generator().manual_seed(0))
    for c in (0, 1):
        assert torch.equal(mem.exemplars[c], herding[c])
    for c in (2, 3):
        assert (mem.exemplars[c] - herding[c].float()).abs().mean() > 0.5
    assert opt.stats["new_objective_after"] < opt.stats["new_objective_before"]
    assert all(p.requires_grad for p in net.parameters())        # the frozen model is given back


@pytest.mark.parametrize("args, expect", [
    (["--method", "lwf", "--memory.optimizer", "mnemonics"], "--memory.optimizer mnemonics"),
    (["--method", "icarl", "--memory.optimizer", "mnemonix"], "--memory.optimizer must be one of"),
    (["--method", "icarl-mnemonics", "--memory.mnemonics.inner-lr", "0"], "--memory.mnemonics.inner-lr"),
    (["--method", "icarl-mnemonics", "--memory.mnemonics.step", "rmsprop"], "--memory.mnemonics.step"),
])
def test_bad_optimizer_configs_are_one_line_errors(args, expect, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", *args, "--out", str(out), "--quiet", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expect in err, err
    assert not out.exists()


def test_icarl_mnemonics_end_to_end_with_tsne(quick):
    res = cilearn.run(quick(method="icarl-mnemonics", memory__per_class=6, memory__mnemonics={"iterations": 4},
                            report__save_tsne=True), echo=False)
    m = res.metrics
    # with 6 exemplars per class and 6 epochs iCaRL's CNN head forgets the old classes (herding
    # too: 45.0 average); its NME keeps them (herding 91.7)
    assert m["avg_incremental_acc_nme"] > 85.0 and m["accuracy_matrix"][0][0] > 90.0
    assert m["memory"]["total_images"] == 60 and m["memory"]["total_bytes"] == 60 * 64 * 4   # float32 pixels
    stats = [r["exemplar_optimizer"] for r in m["phases"]]
    assert all(s["new_pixel_change"] > 0 for s in stats) and all("old_pixel_change" in s for s in stats[1:])
    assert sum(s["new_objective_after"] for s in stats) < sum(s["new_objective_before"] for s in stats)
    for i in range(5):
        png = res.out_dir / f"tsne-phase{i}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((res.out_dir / "metrics.json").read_text())["memory"]["per_class"] == 6


def test_cli_optimizer_flag_on_another_method_single_level(tmp_path):
    out = tmp_path / "run"
    assert main(["run", "--method", "replay", "--memory-per-class", "5", "--memory.optimizer", "mnemonics-single",
                 "--epochs", "4", "--out", str(out), "--quiet", "--no-progress"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert (out / "config.yaml").read_text().count("optimizer: mnemonics-single") == 1
    assert all(r["exemplar_optimizer"]["new_pixel_change"] > 0 for r in m["phases"])
    assert all(r["exemplar_optimizer"]["old_pixel_change"] == 0 for r in m["phases"][1:])   # new classes only
    assert m["memory"]["total_bytes"] == 50 * 64 * 4


def test_benchmark_table_reads_optimizer_seconds_and_nme():
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
    import mnemonics_benchmark as mb

    m = {"avg_incremental_acc": 50.0, "avg_incremental_acc_nme": 60.0, "last_acc": 40.0, "last_acc_nme": 55.0,
         "wall_seconds": 100.0, "memory": {"total_bytes": 4000},
         "phases": [{"train_seconds": 10.0, "exemplar_optimizer": {"seconds": 2.0}},
                    {"train_seconds": 20.0, "exemplar_optimizer": {}}]}
    s = mb.summary(m)
    assert s["opt_s"] == 2.0 and s["train_s"] == 30.0 and s["avg_incremental_acc_nme"] == 60.0
    t = mb.table([("icarl", [s, {**s, "avg_incremental_acc": 52.0}])]).splitlines()
    assert t[0].startswith("| exemplars | avg inc. acc (CNN) | avg inc. acc (NME)") and "| icarl | 51.00 ± 1.41 | 60.00 ± 0.00" in t[2]
    labels = [label for label, _, _ in mb.variants("lucir", ("herding", "single"))]
    assert labels == ["lucir", "lucir --memory.optimizer mnemonics-single"]
