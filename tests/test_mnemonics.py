"""Mnemonics exemplar optimizers (cilearn.memory.mnemonics): the bilevel gradient against finite
differences, what each step may change, the stored format, config errors, end-to-end runs."""
import json

import pytest
import torch

import cilearn
from cilearn.cli import main
from cilearn.memory import Budget, Memory
import dataclasses

from cilearn.components import build, component_class
from cilearn.memory.mnemonics import (bilevel_loss, class_means, head_params, single_level_loss, split_halves, step_sets,
                                      unrolled_head)
from cilearn.models import build_net


def tiny_net(classes=3, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    net = build_net("convnet", "linear", 1)
    net.add_classes(classes)
    return net.to(dtype).eval()


def settings(**over):
    d = dict(epochs=1, iterations=3, steps=4, inner_epochs=1, inner_lr=0.05, lr=0.05, batch_size=16, adjust_old=True,
             step="adam")
    d.update(over)
    return d


def optimizer(kind, options):
    """The exemplar-optimizer component ``kind`` with the ``options`` its form declares (the
    single-level form has no inner loop: no steps, inner_epochs, inner_lr, adjust_old)."""
    cls = component_class("exemplar-optimizer", kind)
    declared = {f.name for f in dataclasses.fields(cls.Options)}
    return build(cls, {k: v for k, v in options.items() if k in declared}, None)


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


def test_step_sets_start_at_different_exemplars_and_cover_all():
    y = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 1, 1])          # 5 exemplars per class
    sets = step_sets(y, 2)                                    # 2 sets: positions 0, 2, 4 and 1, 3
    assert [s.tolist() for s in sets] == [[0, 2, 4, 5, 7, 9], [1, 3, 6, 8]]
    sets = step_sets(y, 20)                                   # more sets than exemplars: one per position
    assert len(sets) == 5 and [s.tolist() for s in sets][1] == [1, 6]
    assert sorted(torch.cat(sets).tolist()) == list(range(10))


def test_bilevel_gradient_matches_finite_differences_through_the_inner_loop():
    """Two inner steps on the head (two step-sets, one inner epoch): d loss / d exemplars and
    d loss / d learning rates from autograd against central differences (float64); the gradient
    flows through both steps and through the backbone's embedding of the exemplars."""
    net = tiny_net(dtype=torch.float64)
    for p in net.parameters():
        p.requires_grad_(False)                               # the model is fixed; the head is adapted from a copy
    params = head_params(net.head)
    g = torch.Generator().manual_seed(1)
    ex = torch.randn(6, 1, 8, 8, generator=g, dtype=torch.float64, requires_grad=True)
    ex_y = torch.tensor([0, 0, 1, 1, 2, 2])
    sets = step_sets(ex_y, 2)
    with torch.no_grad():
        v_emb = net(torch.randn(6, 1, 8, 8, generator=g, dtype=torch.float64)).embedding
    vy = torch.tensor([0, 1, 2, 2, 1, 0])
    lrs = torch.tensor([0.5, 0.8], dtype=torch.float64, requires_grad=True)

    def f(e, r):
        return bilevel_loss(net, params, e, ex_y, v_emb, vy, sets, 1, r)

    gx, gl = torch.autograd.grad(f(ex, lrs), [ex, lrs])
    assert gx.abs().max() > 1e-8 and gl.abs().min() > 1e-8   # reaches the pixels and both learning rates
    eps = 1e-6
    for _ in range(3):
        v = torch.randn(ex.shape, generator=g, dtype=torch.float64)
        e = ex.detach()
        fd = ((f(e + eps * v, lrs) - f(e - eps * v, lrs)) / (2 * eps)).detach()
        assert torch.isclose((gx * v).sum(), fd, rtol=1e-4, atol=1e-10), (float((gx * v).sum()), float(fd))
    d = torch.tensor([0.0, 1.0], dtype=torch.float64)
    fd = ((f(ex, lrs + eps * d) - f(ex, lrs - eps * d)) / (2 * eps)).detach()
    assert torch.isclose(gl[1], fd, rtol=1e-4, atol=1e-10)
    # no inner step: the head is the model's, the validation loss does not depend on the exemplars
    assert unrolled_head(net.head, params, net(ex).embedding, ex_y, sets, 0, lrs) is params


def test_single_level_loss_by_hand():
    """Cosine to the class means of all seen classes: old means given, new means from the
    exemplars; CE over all of them."""
    class Emb(torch.nn.Module):                               # embedding = the image's first two values
        def forward(self, x):
            return type("O", (), {"embedding": x.flatten(1)[:, :2]})()
    net = Emb()
    old_means = torch.tensor([[1.0, 0.0]])                    # class 0
    z = torch.tensor([[0.0, 2.0], [0.0, 4.0]]).view(2, 1, 1, 2)   # class 1's exemplars: mean direction (0, 1)
    x = torch.tensor([[3.0, 4.0]]).view(1, 1, 1, 2)          # cos to class 0: 0.6, to class 1: 0.8
    loss = single_level_loss(net, z, torch.tensor([1, 1]), old_means, x, torch.tensor([1]))
    import math
    assert loss.item() == pytest.approx(-math.log(math.exp(0.8) / (math.exp(0.6) + math.exp(0.8))), rel=1e-6)
    m = class_means(torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 3.0]]), torch.tensor([0, 1, 1]), 2)
    assert torch.allclose(m, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))


def test_split_halves_partition_alternate_positions():
    y = torch.tensor([0, 0, 0, 0, 0, 1, 1, 2])
    a, b = split_halves(y)
    assert a.tolist() == [0, 2, 4, 5, 7] and b.tolist() == [1, 3, 6]
    assert sorted(a.tolist() + b.tolist()) == list(range(len(y)))


def test_mnemonics_changes_new_exemplars_stored_as_rounded_images():
    net = tiny_net(4)
    mem, x, y = filled_memory(net, range(2, 4), old=range(0, 2))
    herding = {c: v.clone() for c, v in mem.exemplars.items()}
    opt = optimizer("mnemonics", settings(lr=0.05))
    before = opt(mem, net, normalize, range(2, 4), x, y, torch.Generator().manual_seed(0))
    assert set(before) == set(herding) and all(torch.equal(before[c], herding[c]) for c in herding)
    assert set(mem.exemplars) == {0, 1, 2, 3}                                    # labels kept
    assert all(mem.exemplars[c].shape == herding[c].shape for c in herding)      # count kept
    for c in (2, 3):
        e = mem.exemplars[c]
        assert e.dtype == torch.uint8                                            # stored as images
        assert (e.float() - herding[c].float()).abs().mean() > 0.5                # moved
    assert mem.nbytes == sum(v.numel() for v in herding.values())               # the bytes of herding's
    s = opt.stats
    assert s["new_objective_after"] < s["new_objective_before"]
    assert s["exemplar_pixel_change"] > 0.5 and s["seconds"] > 0
    assert abs(s["exemplar_stored_pixel_change"] - s["exemplar_pixel_change"]) < 0.5   # rounding moves a pixel < 0.5
    assert all(p.requires_grad for p in net.parameters())                       # the fixed model is given back


def test_store_rounds_not_truncates():
    from cilearn.memory.mnemonics import PixelSpace
    mem = Memory(Budget(per_class=2))
    space = PixelSpace(lambda px: px / 255.0, 1, torch.device("cpu"))      # pixels -> [0, 1]
    moved = torch.tensor([0.4, 0.6, 254.5, 254.6, 3.5, 7.49]).view(3, 1, 1, 2)
    start = torch.tensor([0.0, 1.0, 254.0, 255.0, 4.0, 7.0]).view(3, 1, 1, 2)
    opt = optimizer("mnemonics", settings())
    opt.store(mem, space, moved / 255.0, start, torch.tensor([0, 0, 1]))
    assert mem.exemplars[0].flatten().tolist() == [0, 1, 254, 255] and mem.exemplars[1].flatten().tolist() == [4, 7]
    # the movement before rounding, grey levels: |0.4-0|, |0.6-1|, |254.5-254|, |254.6-255|; |3.5-4|, |7.49-7|
    torch.testing.assert_close(opt.moved[0], torch.tensor([0.4, 0.4, 0.5, 0.4]), atol=1e-4, rtol=0)
    torch.testing.assert_close(opt.moved[1], torch.tensor([0.5, 0.49]), atol=1e-4, rtol=0)


def test_release_step_sizes_barely_move_the_exemplars():
    """At the first release's step (Adam, lr 1e-6) the exemplars move a fraction of a grey level
    (``exemplar_pixel_change`` in (0, 0.5)), which rounding to uint8 removes: the stored memory is
    herding's (``exemplar_stored_pixel_change`` 0)."""
    net = tiny_net(4)
    mem, x, y = filled_memory(net, range(2, 4), old=range(0, 2))
    herding = {c: v.clone() for c, v in mem.exemplars.items()}
    opt = optimizer("mnemonics", settings(lr=1e-6, iterations=None, epochs=2))
    opt(mem, net, normalize, range(2, 4), x, y, torch.Generator().manual_seed(0))
    assert all(torch.equal(mem.exemplars[c], herding[c]) for c in herding)
    assert opt.stats["exemplar_stored_pixel_change"] == 0.0
    assert 0.0 < opt.stats["exemplar_pixel_change"] < 0.5
    assert 0.0 < opt.stats["new_pixel_change"] and 0.0 < opt.stats["old_pixel_change"]


def test_zero_step_records_no_movement():
    """A step too small to change a float32 pixel: the pixels do not move, and the float round trip
    reports exactly 0, not its error. (lr must be > 0 in the options; Adam's step is about lr, and
    1e-30 added to a normalised pixel, |z| >= 2/255 here, leaves it as it is.)"""
    net = tiny_net(4)
    mem, x, y = filled_memory(net, range(2, 4), old=range(0, 2))
    for kind in ("mnemonics", "mnemonics-single"):
        opt = optimizer(kind, settings(lr=1e-30, iterations=2))
        opt(mem, net, normalize, range(2, 4), x, y, torch.Generator().manual_seed(0))
        assert opt.stats["exemplar_pixel_change"] == 0.0 == opt.stats["exemplar_stored_pixel_change"], kind


def test_split_halves_step_touches_only_old_class_exemplars():
    net = tiny_net(4)
    runs = {}
    for adjust in (False, True):
        mem, x, y = filled_memory(net, range(2, 4), old=range(0, 2))
        herding = {c: v.clone() for c, v in mem.exemplars.items()}
        optimizer("mnemonics", settings(adjust_old=adjust))(
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
    opt = optimizer("mnemonics-single", settings(iterations=None, epochs=2, step="adam"))
    opt(mem, net, normalize, range(2, 4), x, y, torch.Generator().manual_seed(0))
    for c in (0, 1):
        assert torch.equal(mem.exemplars[c], herding[c])
    for c in (2, 3):
        assert (mem.exemplars[c].float() - herding[c].float()).abs().mean() > 0.5
    assert opt.stats["new_objective_after"] < opt.stats["new_objective_before"]
    assert all(p.requires_grad for p in net.parameters())        # the frozen model is given back


@pytest.mark.parametrize("args, expect", [
    (["--method", "lwf", "--memory.optimizer", "mnemonics"], "--memory.optimizer mnemonics"),
    (["--method", "icarl", "--memory.optimizer", "mnemonix"],
     "--memory.optimizer: unknown exemplar-optimizer component 'mnemonix'; expected one of: mnemonics, mnemonics-single"),
    (["--method", "icarl-mnemonics", "--memory.mnemonics.inner-lr", "0"],
     "--memory.mnemonics: steps >= 1, inner-epochs >= 0 and inner-lr > 0 are expected, got 20, 5, 0"),
    (["--method", "icarl-mnemonics", "--memory.mnemonics.step", "rmsprop"], "--memory.mnemonics.step"),
])
def test_bad_optimizer_configs_are_one_line_errors(args, expect, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", *args, "--out", str(out), "--quiet", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expect in err, err
    assert not out.exists()


def test_icarl_mnemonics_end_to_end_with_tsne(quick):
    res = cilearn.run(quick(method="icarl-mnemonics", memory__per_class=6,
                            memory__mnemonics={"iterations": 4, "lr": 0.01}, report__save_tsne=True), echo=False)
    m = res.metrics
    # with 6 exemplars per class and 6 epochs iCaRL's CNN head forgets the old classes (herding
    # too: 45.0 average); its NME keeps them (herding 91.7)
    assert m["avg_incremental_acc_nme"] > 85.0 and m["accuracy_matrix"][0][0] > 90.0
    assert m["memory"]["total_images"] == 60 and m["memory"]["total_bytes"] == 60 * 64   # uint8 images
    stats = [r["exemplar_optimizer"] for r in m["phases"]]
    assert all(s["new_pixel_change"] > 0 for s in stats) and all("old_pixel_change" in s for s in stats[1:])
    assert all(r["exemplar_pixel_change"] > 0 and r["exemplar_optimizer_seconds"] > 0 for r in m["phases"])
    assert sum(s["new_objective_after"] for s in stats) < sum(s["new_objective_before"] for s in stats)
    for i in range(5):
        png = res.out_dir / f"tsne-phase{i}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((res.out_dir / "metrics.json").read_text())["memory"]["per_class"] == 6


def test_cli_optimizer_flag_on_another_method_single_level(tmp_path):
    out = tmp_path / "run"
    assert main(["run", "--method", "replay", "--memory-per-class", "5", "--memory.optimizer", "mnemonics-single",
                 "--memory.mnemonics.lr", "50", "--memory.mnemonics.epochs", "3", "--epochs", "4", "--out", str(out), "--quiet",
                 "--no-progress"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert (out / "config.yaml").read_text().count("optimizer: mnemonics-single") == 1
    assert all(r["exemplar_optimizer"]["new_pixel_change"] > 0 for r in m["phases"])
    assert all("old_pixel_change" not in r["exemplar_optimizer"] for r in m["phases"])   # new classes only
    assert m["memory"]["total_bytes"] == 50 * 64


def test_benchmark_table_reads_optimizer_seconds_and_nme():
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
    import mnemonics_benchmark as mb

    m = {"avg_incremental_acc": 50.0, "avg_incremental_acc_nme": 60.0, "last_acc": 40.0, "last_acc_nme": 55.0,
         "wall_seconds": 100.0, "memory": {"total_bytes": 4000},
         "phases": [{"train_seconds": 10.0, "exemplar_optimizer": {"seconds": 2.0}, "exemplar_optimizer_seconds": 2.0,
                     "exemplar_pixel_change": 0.004, "exemplar_stored_pixel_change": 0.0},
                    {"train_seconds": 20.0, "exemplar_optimizer": {"seconds": 4.0}, "exemplar_optimizer_seconds": 4.0,
                     "exemplar_pixel_change": 0.002, "exemplar_stored_pixel_change": 0.0},
                    {"train_seconds": 5.0}]}                                  # a phase without the optimizer
    s = mb.summary(m)
    assert s["opt_s"] == 6.0 and s["train_s"] == 35.0 and s["avg_incremental_acc_nme"] == 60.0
    assert s["opt_s_phase"] == 3.0 and s["moved"] == pytest.approx(0.003) and s["stored"] == 0.0
    t = mb.table([("icarl", [s, {**s, "avg_incremental_acc": 52.0}])]).splitlines()
    assert t[0].startswith("| exemplars | avg inc. acc (CNN) | avg inc. acc (NME)") and "| icarl | 51.00 ± 1.41 | 60.00 ± 0.00" in t[2]
    assert "| 3.00 ± 0.00 | 0.003 | 0 |" in t[2]
    plain = mb.summary({**m, "phases": [{"train_seconds": 5.0}]})
    assert "| 0.00 ± 0.00 | - | - | - |" in mb.table([("icarl", [plain, plain])]).splitlines()[2]
    labels = [label for label, _, _ in mb.variants("lucir", ("herding", "single"))]
    assert labels == ["lucir", "lucir --memory.optimizer mnemonics-single"]


def test_optimised_memory_costs_the_bytes_of_herding(quick):
    """Stored as rounded uint8 images: icarl with the bilevel optimizer holds exactly the bytes of
    icarl at the same budget, although its exemplars moved."""
    plain = cilearn.run(quick(method="icarl", memory__total=40, train__epochs=2), echo=False).metrics
    opt = cilearn.run(quick(method="icarl", out=None, train__epochs=2,
                            memory={"total": 40, "optimizer": "mnemonics",
                                    "mnemonics": {"iterations": 2, "lr": 0.05, "inner_epochs": 1}}), echo=False).metrics
    assert opt["memory"]["total_bytes"] == plain["memory"]["total_bytes"] == 40 * 64
    assert [r["memory_bytes"] for r in opt["phases"]] == [r["memory_bytes"] for r in plain["phases"]]
    assert all(r["exemplar_pixel_change"] > 0 for r in opt["phases"])
    assert all("exemplar_pixel_change" not in r for r in plain["phases"])


def test_digits_defaults_move_pixels_a_fraction_of_a_grey_level(tmp_path):
    """The issue's bar at the defaults (``cilearn run --method icarl-mnemonics`` on digits, the
    releases' step sizes): in every phase the optimizer moves the exemplars' float pixels by more
    than 0 and at most 2 grey levels on average; what survives the rounding to uint8 is recorded
    apart (it is 0 here: a pixel starts on an integer and moves far less than 0.5)."""
    out = tmp_path / "run"
    assert main(["run", "--method", "icarl-mnemonics", "--precision", "fp32", "--out", str(out), "--quiet",
                 "--no-progress"]) == 0
    rows = json.loads((out / "metrics.json").read_text())["phases"]
    assert len(rows) == 5
    assert all(0.0 < r["exemplar_pixel_change"] <= 2.0 for r in rows), [r["exemplar_pixel_change"] for r in rows]
    assert all(r["exemplar_stored_pixel_change"] == 0.0 for r in rows)
    assert all(r["exemplar_optimizer"]["new_stored_pixel_change"] == 0.0 for r in rows)
