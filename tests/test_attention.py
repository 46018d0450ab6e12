"""Grad-CAM and LwM's attention distillation (cilearn.attention) on tiny tensors and nets."""
import copy

import pytest
import torch
import torch.nn as nn

from cilearn.attention import (attention_distillation, gradcam, lwm_attention_loss,
                               teacher_gradcam)
from cilearn.models import build_net

NUM_OLD, NUM_NEW = 4, 2


def student_teacher(seed: int = 0, noise: float = 0.1):
    """A convnet teacher with 4 old classes and a student = teacher + 2 new classes, with
    perturbed backbone weights so that the two maps differ."""
    torch.manual_seed(seed)
    net = build_net("convnet", "linear", 1)
    net.add_classes(NUM_OLD)
    teacher = net.frozen_copy()
    net.add_classes(NUM_NEW)
    with torch.no_grad():
        for p in net.backbone.parameters():
            p.add_(noise * torch.randn_like(p))
    return net, teacher


class TinyNet(nn.Module):
    """conv -> BN2d -> ReLU = maps [B, 3, 4, 4]; spatial mean -> head. ``head_bn`` puts a
    BatchNorm1d between the maps and the logits; ``hidden`` a non-linear head."""

    def __init__(self, head_bn: bool = False, hidden: bool = False):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3)
        layers = [nn.BatchNorm1d(3)] if head_bn else []
        layers += [nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)] if hidden else [nn.Linear(3, 3)]
        self.head = nn.Sequential(*layers)

    def forward(self, x):
        maps = torch.relu(self.bn(self.conv(x)))
        return maps, self.head(maps.mean((2, 3)))


# ------------------------------------------------------------------------------ Grad-CAM


def test_gradcam_by_hand():
    # A^0 = [[1, 2], [3, 4]], A^1 = [[4, 0], [1, 2]]; logits = W mean_hw(A) + c, H W = 4, so
    # d z_b / d A^k = W[b, k] / 4 everywhere and alpha_k = W[b, k] / 4.
    a = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[4.0, 0.0], [1.0, 2.0]]])
    maps = torch.stack([a, a]).requires_grad_(True)                    # [2, 2, 2, 2]
    w = torch.tensor([[1.0, -2.0], [0.5, 1.0]])
    logits = maps.mean((2, 3)) @ w.T + torch.tensor([0.3, -0.7])
    cam = gradcam(maps, logits, torch.tensor([0, 1]), create_graph=False)
    # class 0: alpha = (0.25, -0.5): 0.25 A^0 - 0.5 A^1 = [[-1.75, 0.5], [0.25, 0]] -> ReLU
    # class 1: alpha = (0.125, 0.25): 0.125 A^0 + 0.25 A^1 = [[1.125, 0.25], [0.625, 1.0]]
    expect = torch.tensor([[[0.0, 0.5], [0.25, 0.0]], [[1.125, 0.25], [0.625, 1.0]]])
    assert cam.shape == (2, 2, 2) and cam.dtype == torch.float32
    assert torch.allclose(cam, expect, atol=1e-6)


def test_gradcam_needs_maps_in_a_graph():
    with pytest.raises(ValueError, match="require grad"):
        gradcam(torch.ones(1, 2, 2, 2), torch.ones(1, 3, requires_grad=True), torch.tensor([0]), False)


def per_score_cams(maps, logits, cls):
    """Grad-CAM one score at a time from the same forward; also the largest gradient that a
    sample's score sends to the other samples' maps."""
    cams, cross = [], 0.0
    for i in range(len(cls)):
        (g,) = torch.autograd.grad(logits[i, cls[i]], maps, retain_graph=True)
        alpha = g[i].mean((1, 2))
        cams.append(torch.relu((alpha[:, None, None] * maps[i]).sum(0)))
        others = torch.cat([g[:i], g[i + 1:]])
        cross = max(cross, others.abs().max().item())
    return torch.stack(cams).detach(), cross


def test_batched_gradcam_is_exact_with_bn_in_train_mode_before_the_maps():
    # BN inside the backbone (train mode, batch statistics) sits *before* the maps: the summed
    # scores give each sample exactly its own gradient (cross-sample gradients are exactly 0).
    net, _ = student_teacher()
    net.train()
    x = torch.randn(5, 1, 8, 8)
    out = net(x)
    cls = torch.tensor([0, 3, 5, 1, 2])
    batched = gradcam(out.maps[-1], out.logits, cls, create_graph=False)
    single, cross = per_score_cams(out.maps[-1], out.logits, cls)
    assert cross == 0.0
    assert batched.abs().sum() > 0 and torch.allclose(batched, single, rtol=1e-5, atol=1e-7)


def test_batched_gradcam_equals_one_image_at_a_time_in_eval_mode():
    net, _ = student_teacher()
    net.eval()
    x = torch.randn(4, 1, 8, 8)
    cls = torch.tensor([5, 0, 2, 4])
    out = net(x)
    batched = gradcam(out.maps[-1], out.logits, cls, create_graph=False)
    alone = []
    for i in range(4):
        o = net(x[i:i + 1])
        alone.append(gradcam(o.maps[-1], o.logits, cls[i:i + 1], create_graph=False))
    assert torch.allclose(batched, torch.cat(alone), rtol=1e-4, atol=1e-6)


def calibrated(net, n: int = 512):
    """Set the BN running statistics to the mean/var of n images of the test distribution, then
    freeze them (momentum 0: later train-mode forwards leave them alone)."""
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None                # cumulative average: one batch -> its exact statistics
    net.train()
    with torch.no_grad():
        net(torch.randn(n, 1, 8, 8))
    for m in bns:
        m.momentum = 0.0
    return net


def test_bn_in_train_mode_changes_the_maps_through_the_batch():
    # Train mode normalises with the batch's statistics: the map of an image differs from its
    # eval-mode map (computed one image at a time with running statistics matching the data)
    # by a few percent, and changes when the *other* images of the batch change.
    net, teacher = student_teacher()
    calibrated(net)
    x = torch.randn(16, 1, 8, 8)
    cls = torch.arange(16) % (NUM_OLD + NUM_NEW)
    net.train()
    out = net(x)
    train_cam = gradcam(out.maps[-1], out.logits, cls, create_graph=False).detach()
    x2 = x.clone()
    x2[1:] = torch.randn(15, 1, 8, 8) * 3
    out2 = net(x2)
    train_cam2 = gradcam(out2.maps[-1], out2.logits, cls, create_graph=False).detach()
    net.eval()
    eval_cam = torch.cat([gradcam(o.maps[-1], o.logits, cls[i:i + 1], create_graph=False).detach()
                          for i in range(16) for o in [net(x[i:i + 1])]])
    rel = lambda a, b: ((a - b).abs().sum() / b.abs().sum()).item()  # noqa: E731
    assert 0.01 < rel(train_cam, eval_cam) < 0.3      # measured 0.03-0.05 over seeds
    assert 0.02 < attention_distillation(train_cam, eval_cam) < 0.5   # measured 0.07-0.09
    assert rel(train_cam2[:1], train_cam[:1]) > 0.05  # image 0 unchanged, its map is not
    # consequence for LwM: a student equal to its teacher, run in train mode, has L_AD > 0
    # (a floor from the batch statistics); in eval mode it has 0
    calibrated(teacher)
    teacher.eval()
    student = copy.deepcopy(teacher)
    for p in student.parameters():
        p.requires_grad_(True)
    floor, _ = lwm_attention_loss(student.train()(x), teacher, x, NUM_OLD)
    zero, _ = lwm_attention_loss(student.eval()(x), teacher, x, NUM_OLD)
    assert floor.item() > 0.02 and zero.item() == pytest.approx(0.0, abs=1e-5)


def test_bn_between_maps_and_logits_couples_the_batched_gradcam():
    # The coupling exists only when a batch-coupled layer sits between the maps and the logits:
    # then the summed scores add cross-sample terms (through the BN batch statistics) in train
    # mode, and none in eval mode.
    torch.manual_seed(0)
    net = TinyNet(head_bn=True)
    x, cls = torch.randn(4, 1, 4, 4), torch.tensor([0, 1, 2, 0])
    net.train()
    maps, logits = net(x)
    batched = gradcam(maps, logits, cls, create_graph=False)
    single, cross = per_score_cams(maps, logits, cls)
    assert cross > 1e-3 and not torch.allclose(batched, single, atol=1e-4)
    net.eval()
    maps, logits = net(x)
    single, cross = per_score_cams(maps, logits, cls)
    assert cross == 0.0
    assert torch.allclose(gradcam(maps, logits, cls, create_graph=False), single, atol=1e-6)


# ------------------------------------------------------------------------------ L_AD


def test_lad_zero_for_equal_maps_scale_invariant_and_finite_on_zero_maps():
    torch.manual_seed(0)
    a, b = torch.rand(3, 4, 4), torch.rand(3, 4, 4)
    assert attention_distillation(a, a.clone()).item() == 0.0
    d = attention_distillation(a, b).item()
    assert d > 0.1
    assert attention_distillation(3.7 * a, b).item() == pytest.approx(d, rel=1e-5)
    assert attention_distillation(a, 0.02 * b).item() == pytest.approx(d, rel=1e-5)
    # by hand: Q_s = (3, 4)/5, Q_t = (1, 0): |0.6 - 1| + |0.8 - 0| = 1.2
    s, t = torch.tensor([[[3.0, 4.0]]]), torch.tensor([[[2.0, 0.0]]])
    assert attention_distillation(s, t).item() == pytest.approx(1.2, abs=1e-6)
    # all-zero student map: the loss is ||Q_t / ||Q_t|| ||_1 of the teacher, gradient finite
    z = torch.zeros(3, 4, 4, requires_grad=True)
    loss = attention_distillation(z, b)
    loss.backward()
    expect = (b.flatten(1) / b.flatten(1).norm(dim=1, keepdim=True)).sum(1).mean()
    assert loss.item() == pytest.approx(expect.item(), rel=1e-5)
    assert torch.isfinite(z.grad).all()
    assert torch.isfinite(attention_distillation(torch.zeros(2, 3, 3), torch.zeros(2, 3, 3)))


def test_lad_zero_when_student_equals_teacher():
    torch.manual_seed(0)
    net = build_net("convnet", "linear", 1)
    net.add_classes(NUM_OLD)
    teacher = net.frozen_copy()
    net.eval()                          # same BN statistics as the teacher
    x = torch.randn(4, 1, 8, 8)
    loss, b = lwm_attention_loss(net(x), teacher, x, NUM_OLD)
    assert loss.item() == pytest.approx(0.0, abs=1e-5)


# ------------------------------------------------------------------------------ LwM term


def test_lad_trains_the_student_and_leaves_the_teacher_alone():
    net, teacher = student_teacher()
    net.train()
    t_state = copy.deepcopy(teacher.state_dict())
    x = torch.randn(6, 1, 8, 8)
    loss, b = lwm_attention_loss(net(x), teacher, x, NUM_OLD)
    assert loss.item() > 0.01 and loss.dtype == torch.float32
    loss.backward()
    bb = [p.grad.abs().sum().item() for p in net.backbone.parameters() if p.grad is not None]
    assert len(bb) == len(list(net.backbone.parameters())) and min(bb) > 0
    # the Grad-CAM weights are W[b] / (H W): the head's rows of the classes b (and only those)
    # receive gradient through the second-order path
    row = net.head.weight.grad.abs().sum(1)
    used = torch.zeros(NUM_OLD + NUM_NEW, dtype=torch.bool)
    used[b] = True
    assert (row[used] > 0).all() and (row[~used] == 0).all()
    # the teacher: no gradient, no change (parameters and BN buffers), still in eval mode
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, t_state[k]) for k, v in teacher.state_dict().items())
    assert not teacher.training


def test_teacher_left_in_train_mode_runs_in_eval_and_is_restored():
    net, teacher = student_teacher()
    teacher.train()
    t_state = copy.deepcopy(teacher.state_dict())
    x = torch.randn(4, 1, 8, 8)
    cam, b, logits = teacher_gradcam(teacher, x, NUM_OLD)
    assert teacher.training
    assert all(torch.equal(v, t_state[k]) for k, v in teacher.state_dict().items())
    teacher.eval()
    cam_eval, b_eval, _ = teacher_gradcam(teacher, x, NUM_OLD)
    assert torch.equal(b, b_eval) and torch.allclose(cam, cam_eval)
    assert not cam.requires_grad and cam.shape == (4, 4, 4)


def test_create_graph_adds_the_gradient_path():
    # Linear head on the spatial mean (IncrementalNet): alpha = W[b] / (H W) does not depend on
    # the maps, so the gradient path reaches the head only: with create_graph=False the head gets
    # no gradient from L_AD at all, with True it does; the backbone's gradient is the same.
    net, teacher = student_teacher()
    net.train()
    x = torch.randn(6, 1, 8, 8)
    out = net(x)
    params = list(net.parameters())
    g = {}
    for cg in (True, False):
        loss, _ = lwm_attention_loss(out, teacher, x, NUM_OLD, create_graph=cg)
        g[cg] = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    backbone = {id(p) for p in net.backbone.parameters()}
    for i, p in enumerate(params):
        if p is net.head.weight:
            assert g[False][i] is None or g[False][i].abs().sum() == 0
            assert g[True][i].abs().sum() > 0
        elif id(p) in backbone:
            assert g[True][i].abs().sum() > 0
            assert torch.allclose(g[True][i], g[False][i], rtol=1e-4, atol=1e-7)
    # Non-linear head: alpha depends on the maps, so the gradient path reaches the backbone
    # and the conv's gradient differs between True and False.
    torch.manual_seed(1)
    tiny = TinyNet(hidden=True).train()
    ref = copy.deepcopy(tiny).eval()
    with torch.no_grad():
        tiny.conv.weight.add_(0.2 * torch.randn_like(tiny.conv.weight))
    x = torch.randn(4, 1, 4, 4)
    with torch.no_grad():
        rmaps, rlogits = ref(x)
    cls = rlogits.argmax(1)
    rm = rmaps.requires_grad_(True)
    cam_t = gradcam(rm, ref.head(rm.mean((2, 3))), cls, create_graph=False).detach()
    maps, logits = tiny(x)
    gc = {cg: torch.autograd.grad(attention_distillation(gradcam(maps, logits, cls, cg), cam_t),
                                  tiny.conv.weight, retain_graph=True)[0] for cg in (True, False)}
    assert gc[True].abs().sum() > 0
    assert (gc[True] - gc[False]).abs().max() > 1e-3 * gc[True].abs().max()


def test_b_is_the_teachers_top_old_class_even_when_the_student_prefers_a_new_one():
    net, teacher = student_teacher()
    with torch.no_grad():
        net.head.bias[NUM_OLD:] += 100.0
        net.head.bias[NUM_OLD + 1] += 10.0         # the student's top class: new class 5
        teacher.head.bias.copy_(torch.tensor([0.0, 0.5, 0.0, 0.2]))
    net.train()
    x = torch.randn(6, 1, 8, 8)
    out = net(x)
    assert (out.logits.argmax(1) == NUM_OLD + 1).all()
    loss, b = lwm_attention_loss(out, teacher, x, NUM_OLD)
    with torch.no_grad():
        t = teacher(x)
    assert torch.equal(b, t.logits[:, :NUM_OLD].argmax(1)) and (b < NUM_OLD).all()
    # the same b for both maps: by hand, Grad-CAM of the linear head = ReLU(sum_k W[b, k] A^k) / HW
    hw = t.maps[-1].shape[2] * t.maps[-1].shape[3]
    cam_t = torch.relu((teacher.head.weight[b][:, :, None, None] * t.maps[-1]).sum(1)) / hw
    cam_s = gradcam(out.maps[-1], out.logits, b, create_graph=False)
    assert loss.item() == pytest.approx(attention_distillation(cam_s, cam_t).item(), rel=1e-5)
    cam_new = gradcam(out.maps[-1], out.logits, out.logits.argmax(1), create_graph=False)
    assert abs(attention_distillation(cam_new, cam_t).item() - loss.item()) > 1e-3


def test_lwm_loss_under_autocast_is_float32_and_close_to_fp32():
    net, teacher = student_teacher()
    net.train()
    x = torch.randn(4, 1, 8, 8)
    ref, b_ref = lwm_attention_loss(net(x), teacher, x, NUM_OLD)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x)
        loss, b = lwm_attention_loss(out, teacher, x, NUM_OLD)
    assert out.maps[-1].dtype == torch.bfloat16 and loss.dtype == torch.float32
    loss.backward()
    assert torch.isfinite(net.backbone.stages[0][0].weight.grad).all()
    assert loss.item() == pytest.approx(ref.item(), abs=0.05)


# ------------------------------------------------------------------------------ figure


@pytest.mark.parametrize("channels", [1, 3])
def test_overlay_grid_writes_a_png_of_n_rows_by_3_columns(tmp_path, channels):
    from cilearn.report import overlay_grid
    torch.manual_seed(0)
    imgs = torch.randint(0, 256, (2, channels, 8, 8), dtype=torch.uint8)
    path = overlay_grid(imgs, torch.rand(2, 4, 4), torch.zeros(2, 4, 4), tmp_path / "sub" / "g.png",
                        titles=["y=1 b=0", "y=5 b=2"])
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    from PIL import Image
    with Image.open(path) as im:
        assert im.size == (600, 400)       # 3 panels x 2 rows of 2 in at 100 dpi
