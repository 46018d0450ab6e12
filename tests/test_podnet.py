"""PODNet: the local-similarity head, NCA, POD-spatial/flat and proxy imprinting against numbers
computed by hand; the method's hooks on a tiny network; end-to-end runs."""
import math

import pytest
import torch

import cilearn
from cilearn.data.augment import Augmenter
from cilearn.data.scenario import Phase
from cilearn.losses import CLS_LOSSES, nca, pod_flat, pod_spatial, pod_vectors
from cilearn.memory import Budget, Memory
from cilearn.methods import METHODS
from cilearn.services import Context
from cilearn.imprint import imprint_proxies, kmeans
from cilearn.models.backbones import BACKBONES
from cilearn.models.heads import HEADS, LSCHead
from cilearn.models import build_net
from cilearn.train import Batch


# ---------------------------------------------------------------- head
def test_lsc_head_by_hand():
    h = HEADS.get("lsc")(2, proxies=2)
    assert isinstance(h, LSCHead) and h.num_classes == 0 and h.sigma.item() == 1.0
    h.add_classes(2)
    assert h.weight.shape == (4, 2) and h.num_classes == 2
    with torch.no_grad():   # class 0: proxies (1, 0) and (0, 1); class 1: (-1, 0) twice
        h.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 3.0], [-2.0, 0.0], [-1.0, 0.0]]))
        h.sigma.fill_(2.0)
    emb = torch.tensor([[5.0, 0.0]])
    # class 0: cosines (1, 0): softmax weights e/(e+1), 1/(e+1) -> s = e/(e+1) = 0.731059
    # class 1: cosines (-1, -1) -> s = -1
    s = h.similarity(emb)
    assert s[0, 0].item() == pytest.approx(math.e / (math.e + 1), abs=1e-6)
    assert s[0, 1].item() == pytest.approx(-1.0, abs=1e-6)
    assert torch.allclose(h(emb), 2.0 * s)
    h.add_classes(1)        # growth keeps the old proxies
    assert h.weight.shape == (6, 2) and torch.equal(h.weight[:4].detach()[0], torch.tensor([1.0, 0.0]))


# ---------------------------------------------------------------- NCA
def test_nca_by_hand():
    z = torch.tensor([[2.0, 1.0, 0.0], [2.0, 1.0, 0.0]])
    y = torch.tensor([0, 2])
    # sample 0: max(0, log(e^1 + e^0) - (2 - 0.5)) = max(0, 1.31326 - 1.5) = 0 (hinge)
    # sample 1: log(e^2 + e^1) - (0 - 0.5) = 2.31326 + 0.5 = 2.81326
    assert nca(z, y, margin=0.5).item() == pytest.approx((0 + 2.813262) / 2, abs=1e-5)
    # no margin: the positive is still out of the denominator
    assert nca(z[1:], y[1:]).item() == pytest.approx(math.log(math.e ** 2 + math.e), abs=1e-5)
    assert CLS_LOSSES.get("nca") is nca


def test_nca_margin_is_scaled_by_eta_without_its_gradient(quick):
    """``Method`` passes margin = eta * delta with eta detached (see losses.nca)."""
    net = build_net("convnet", "lsc", 1)
    net.add_classes(3)
    with torch.no_grad():
        net.head.sigma.fill_(4.0)
    ctx = Context(quick(method="podnet"), net, None, Augmenter("none", 0, (0.5,), (0.5,), False),
                  torch.device("cpu"), torch.Generator(), None)
    m = METHODS.get("podnet")(ctx)
    z = torch.tensor([[3.0, 1.0, 0.0]], requires_grad=True)
    loss = m.cls_fn(z, torch.tensor([0]), None)
    # 4 * 0.6 = 2.4: max(0, log(e + 1) - (3 - 2.4)) = 1.313262 - 0.6
    assert loss.item() == pytest.approx(math.log(math.e + 1) - 0.6, abs=1e-5)
    assert net.head.sigma.grad is None


# ---------------------------------------------------------------- POD
def test_pod_spatial_by_hand():
    a = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])          # [1, 1, 2, 2]
    b = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    # squared: [[1, 4], [9, 16]] -> width-pooled (rows) [5, 25], height-pooled (cols) [10, 20]
    va = pod_vectors([a])[0]
    assert torch.allclose(va, torch.tensor([[5.0, 25.0, 10.0, 20.0]]) / math.sqrt(1150), atol=1e-6)
    # b -> [1, 0, 1, 0] / sqrt 2; |va - vb|^2 = 2 - 2 (5 + 10) / sqrt(1150 * 2)
    expect = math.sqrt(2 - 30 / math.sqrt(2300))
    assert pod_spatial([a], [b]).item() == pytest.approx(expect, abs=1e-5)
    # mean over stages; 0 for equal maps; invariant to scaling a map (normalised)
    assert pod_spatial([a, a], [b, a]).item() == pytest.approx(expect / 2, abs=1e-5)
    assert pod_spatial([3 * a], [a]).item() == pytest.approx(0.0, abs=1e-6)


def test_pod_flat_by_hand():
    e = torch.tensor([[3.0, 4.0], [1.0, 1.0]])
    e_old = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    assert pod_flat(e, e_old).item() == pytest.approx((5.0 + 0.0) / 2)


def test_pod_spatial_trains_the_student_only():
    torch.manual_seed(0)
    net = build_net("convnet", "lsc", 1, last_relu=False)
    teacher = net.frozen_copy()
    with torch.no_grad():
        for p in net.backbone.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(4, 1, 8, 8)
    loss = pod_spatial(net(x).maps, teacher(x).maps)
    loss.backward()
    assert loss.item() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.backbone.stages[0].parameters())
    assert all(p.grad is None for p in teacher.parameters())


# ---------------------------------------------------------------- imprinting, last ReLU
def test_kmeans_and_proxy_imprinting():
    g = torch.Generator().manual_seed(0)
    x = torch.tensor([[1.0, 0.0], [1.1, 0.0], [0.9, 0.0], [0.0, 2.0], [0.0, 2.2]])
    c = kmeans(x, 2, g)
    got = sorted(c.tolist())
    assert got[0] == pytest.approx([0.0, 2.1], abs=1e-6) and got[1] == pytest.approx([1.0, 0.0], abs=1e-6)
    # one class, 2 proxies: the normalised centres of its normalised embeddings at the old mean norm
    old = torch.tensor([[3.0, 4.0], [0.0, 1.0]])                # mean norm 3
    emb = torch.cat([x, -x])                                    # class 5: x, class 6: -x
    y = torch.tensor([5] * 5 + [6] * 5)
    rows = imprint_proxies(emb, y, range(5, 7), old, 2, torch.Generator().manual_seed(0))
    assert rows.shape == (4, 2)
    assert sorted(map(tuple, (rows[:2] / 3).round(decimals=5).tolist())) == [(0.0, 1.0), (1.0, 0.0)]
    assert sorted(map(tuple, (rows[2:] / 3).round(decimals=5).tolist())) == [(-1.0, 0.0), (0.0, -1.0)]


@pytest.mark.parametrize("name", [n for n in BACKBONES.names() if n != "convnet"])
def test_last_relu_flag(name):
    torch.manual_seed(0)
    size = 32 if name != "convnet" else 8
    x = torch.randn(2, 3, size, size)
    with_relu, without = BACKBONES.get(name)(3), BACKBONES.get(name)(3, last_relu=False)
    without.load_state_dict(with_relu.state_dict())
    maps_a, emb_a = with_relu.eval()(x)
    maps_b, emb_b = without.eval()(x)
    assert (maps_a[-1] >= 0).all() and (maps_b[-1] < 0).any()
    assert torch.allclose(maps_a[-1], maps_b[-1].clamp_min(0), atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(maps_a[:-1], maps_b[:-1]))   # earlier stages untouched


def test_convnet_ignores_last_relu():
    """No residual path: without its last ReLU the last stage would be affine (see ConvNet)."""
    x = torch.randn(2, 1, 8, 8)
    a, b = BACKBONES.get("convnet")(1), BACKBONES.get("convnet")(1, last_relu=False)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.eval()(x)[1], b.eval()(x)[1]) and (a(x)[0][-1] >= 0).all()


# ---------------------------------------------------------------- the method's hooks
def _ctx(quick, augment="flip"):
    torch.manual_seed(0)
    net = build_net("convnet", "lsc", 1, last_relu=False, proxies=3)
    aug = Augmenter(augment, 0, (0.5,), (0.5,), channels_last=False)
    return Context(quick(method="podnet"), net, Memory(Budget(per_class=4)), aug, torch.device("cpu"),
                   torch.Generator().manual_seed(0), None)


def test_podnet_before_phase_imprints_freezes_and_weights(quick):
    ctx = _ctx(quick)
    ctx.net.add_classes(2)
    m = METHODS.get("podnet")(ctx)
    x = torch.randint(0, 255, (14, 1, 8, 8), dtype=torch.uint8)
    y = torch.tensor([0, 1] + [2] * 6 + [3] * 6)
    old = ctx.net.head.weight.detach().clone()                   # [2 classes * 3 proxies, D]
    m.before_phase(Phase(1, 2, 4), x, y)
    w = ctx.net.head.weight.detach()
    assert w.shape[0] == 12 and torch.equal(w[:6], old)
    assert torch.allclose(w[6:].norm(dim=1), old.norm(dim=1).mean().expand(6), atol=1e-5)
    pod = next(c for c in m.components.parts if c.name == "pod")          # the pod term component
    assert pod.adapt == pytest.approx(math.sqrt(4 / 2))
    with torch.no_grad():
        ctx.net.head.weight.add_(1.0)
    m.constrain()                                                # old proxies fixed in the main stage
    assert torch.equal(ctx.net.head.weight[:6].detach(), old)
    # the cached teacher descriptors are those of the teacher on the batch (flip views)
    xb, view = ctx.augmenter.train(x, torch.Generator().manual_seed(3))
    batch = Batch(xb, y, torch.arange(len(y)), view)
    t = m.teacher_out(batch)
    with torch.no_grad():
        ref = torch.cat(pod_vectors(m.teacher(xb).maps), dim=1)
    assert torch.allclose(t.extra, ref, atol=1e-5)
    out = ctx.net(xb)
    terms = m.components.terms(batch, out)
    lc = ctx.cfg.loss
    assert terms["pod_spatial"][0] == pytest.approx(3.0 * math.sqrt(2)) and lc.pod_spatial_weight is None   # the default
    assert terms["pod_flat"][0] == pytest.approx(1.0 * math.sqrt(2))
    with torch.no_grad():
        ref_spatial = pod_spatial(out.maps, m.teacher(xb).maps)
    assert terms["pod_spatial"][1].item() == pytest.approx(ref_spatial.item(), abs=1e-5)


def test_podnet_recipes_defaults():
    p, pb = METHODS.get("podnet"), METHODS.get("podnet-bsce")
    assert p.head == "lsc" and p.cls_loss == "nca" and p.calibration == ("balanced-finetune",) and not p.last_relu
    ft = p.component_options("cifar100")["balanced-finetune"]
    assert ft["lr"] == 0.05 and not ft["decay"] and p.uses_memory
    assert p.component_options("imagefolder")["balanced-finetune"]["lr"] == 0.01     # official ImageNet config
    assert p.component_options("cifar100")["pod"] == {"spatial_weight": 3.0, "flat_weight": 1.0}
    assert p.component_options("imagefolder")["pod"] == {"spatial_weight": 8.0, "flat_weight": 10.0}
    assert p.head_components == ("imprint", "freeze-old-rows") and p.terms == ("pod",)
    assert pb.cls_loss == "bsce" and pb.calibration == () and pb.head == "lsc" and pb.head_components == ("imprint",)


# ---------------------------------------------------------------- end to end
@pytest.mark.parametrize("method,loss", [("podnet", None), ("podnet", "bsce"), ("podnet-bsce", None)])
def test_podnet_end_to_end(method, loss, quick):
    over = {"loss": {"cls": loss}} if loss else {}
    m = cilearn.run(quick(method=method, train__epochs=15, **over), echo=False).metrics
    acc = m["accuracy_matrix"]
    assert [len(r) for r in acc] == [1, 2, 3, 4, 5]
    # BSCE without fine-tuning on digits' few steps: new classes of the last phase around 50%
    assert acc[0][0] > 90 and m["phases"][-1]["acc_new"] > (50 if method == "podnet" and not loss else 35)
    assert m["avg_incremental_acc"] > 60 and m["avg_incremental_acc_nme"] > 60
    assert acc[-1][0] > 30                                       # the first task is not forgotten
    for r in m["phases"][1:]:
        assert {"pod_spatial", "pod_flat"} <= set(r["loss"]) and r["loss"]["pod_spatial"] > 0
        assert (r["finetune_seconds"] > 0) == (method == "podnet")
