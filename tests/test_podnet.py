"""PODNet: the local-similarity head, NCA, POD-spatial/flat and proxy imprinting against numbers
computed by hand; the method's hooks on a tiny network; end-to-end runs."""
import dataclasses
import math

import pytest
import torch

import cilearn
from cilearn.components import REGISTRIES, Components, Step, build, component_class
from cilearn.config import RunConfig, from_dict
from cilearn.data.augment import Augmenter
from cilearn.data.scenario import Phase
from cilearn.errors import ConfigError
from cilearn.imprint import imprint_proxies, kmeans
from cilearn.learner import Learner
from cilearn.losses import nca, pod_flat, pod_spatial, pod_vectors
from cilearn.memory import Budget, Memory
from cilearn.methods import METHODS
from cilearn.methods.recipe import plan
from cilearn.model_io import architecture, build_from
from cilearn.models import build_net, part
from cilearn.models.heads import LSCHead
from cilearn.services import RunServices
from cilearn.train import Batch

BACKBONES = REGISTRIES["backbone"]
# the backbones with a last_relu option (the ResNets); convnet has none (see ConvNetFactory)
LAST_RELU = [n for n in BACKBONES.names()
             if "last_relu" in {f.name for f in dataclasses.fields(BACKBONES.get(n).Options)}]


# ---------------------------------------------------------------- head
def test_lsc_head_by_hand():
    h = part("head", "lsc", proxies=2).create(2)
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
    # the classification component --loss nca binds it (a head without a learnt scale: margin as given)
    comp = build(component_class("classification", "nca"), {"margin": 0.5}, None)
    comp.attach(build_net("convnet", "linear", 1))
    assert torch.equal(comp.loss(z, y), nca(z, y, margin=0.5))


def test_nca_margin_is_scaled_by_eta_without_its_gradient(quick):
    """The recipe's nca component passes margin = eta * delta with eta detached (see losses.nca)."""
    net = build_net("convnet", "lsc", 1)
    net.add_classes(3)
    with torch.no_grad():
        net.head.sigma.fill_(4.0)
    p = plan(quick(method="podnet"), 8)
    name, = p.names("classification")
    assert name == "nca" and p.options[name]["margin"] == 0.6
    cls = build(component_class("classification", name), p.options[name], None)
    cls.attach(net)
    z = torch.tensor([[3.0, 1.0, 0.0]], requires_grad=True)
    loss = cls.loss(z, torch.tensor([0]), None)
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
    net = build_net("convnet", "lsc", 1)
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


def test_every_backbone_but_convnet_has_last_relu():
    # timm:NAME: timm's models have their own last layers
    assert LAST_RELU and set(LAST_RELU) == set(BACKBONES.names()) - {"convnet", "timm:NAME"}


@pytest.mark.parametrize("name", LAST_RELU)
def test_last_relu_flag(name):
    torch.manual_seed(0)
    size = 32 if name != "convnet" else 8
    x = torch.randn(2, 3, size, size)
    with_relu, without = part("backbone", name).create(3), part("backbone", name, last_relu=False).create(3)
    without.load_state_dict(with_relu.state_dict())
    maps_a, emb_a = with_relu.eval()(x)
    maps_b, emb_b = without.eval()(x)
    assert (maps_a[-1] >= 0).all() and (maps_b[-1] < 0).any()
    assert torch.allclose(maps_a[-1], maps_b[-1].clamp_min(0), atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(maps_a[:-1], maps_b[:-1]))   # earlier stages untouched


def test_convnet_ignores_last_relu():
    """No residual path: without its last ReLU the last stage would be affine (see ConvNetFactory).
    convnet has no last_relu option, so the recipes' last_relu false does not reach it."""
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(ConfigError, match="components.convnet.last_relu"):
        part("backbone", "convnet", last_relu=False)
    p = plan(from_dict(RunConfig, {"method": "podnet", "data": {"dataset": "digits"}}), 8)
    assert p.recipe.options["backbone"]["last_relu"] is False and p.names("backbone") == ["convnet"]
    assert p.options["convnet"] == {}
    a = build_from(architecture(p, 1)).backbone
    assert (a(x)[0][-1] >= 0).all() and (a.eval()(x)[1] >= 0).all()       # the last ReLU kept


# ---------------------------------------------------------------- the method's hooks
def _learner(quick, augment="flip") -> Learner:
    """PODNet's components (3 proxies per class) on the tiny convnet, with a memory, no checkpoints."""
    torch.manual_seed(0)
    cfg = quick(method="podnet", components={"lsc": {"proxies": 3}})
    p = plan(cfg, 8)
    aug = Augmenter(augment, 0, (0.5,), (0.5,), channels_last=False)
    services = RunServices(cfg, build_from(architecture(p, 1)), None, aug, torch.device("cpu"),
                           torch.Generator().manual_seed(0), None)
    parts = p.build(services)
    services.memory = Memory(Budget(per_class=4), next(c for c in parts if c.kind == "selection"))
    return Learner(services, Components(parts))


def test_podnet_before_phase_imprints_freezes_and_weights(quick):
    learner = _learner(quick)
    net = learner.net
    assert net.head.proxies == 3
    net.add_classes(2)
    x = torch.randint(0, 255, (14, 1, 8, 8), dtype=torch.uint8)
    y = torch.tensor([0, 1] + [2] * 6 + [3] * 6)
    old = net.head.weight.detach().clone()                       # [2 classes * 3 proxies, D]
    learner.begin(Phase(1, 2, 4), x, y)                          # grows the head, imprints, freezes
    ctx = learner.ctx
    w = net.head.weight.detach()
    assert w.shape[0] == 12 and torch.equal(w[:6], old)
    assert torch.allclose(w[6:].norm(dim=1), old.norm(dim=1).mean().expand(6), atol=1e-5)
    pod = next(c for c in learner.components.active if c.name == "pod")      # the pod term component
    assert (pod.options.spatial_weight, pod.options.flat_weight) == (3.0, 1.0)   # the defaults
    with torch.no_grad():
        net.head.weight.add_(1.0)
    learner.components.constrain(ctx)                            # old proxies fixed in the main stage
    assert torch.equal(net.head.weight[:6].detach(), old)
    # the cached teacher descriptors are those of the teacher on the batch (flip views)
    xb, view = learner.s.augmenter.train(x, torch.Generator().manual_seed(3))
    step = Step(Batch(xb, y, torch.arange(len(y)), view), ctx)
    t = step.old
    with torch.no_grad():
        ref = torch.cat(pod_vectors(ctx.old_model(xb).maps), dim=1)
    assert torch.allclose(t.extra, ref, atol=1e-5)
    out = net(xb)
    terms = pod.terms(step, out)
    adapt = math.sqrt(4 / 2)                                     # sqrt(seen / new)
    assert terms["pod_spatial"][0] == pytest.approx(3.0 * adapt)
    assert terms["pod_flat"][0] == pytest.approx(1.0 * adapt)
    with torch.no_grad():
        ref_spatial = pod_spatial(out.maps, ctx.old_model(xb).maps)
    assert terms["pod_spatial"][1].item() == pytest.approx(ref_spatial.item(), abs=1e-5)


def _options(method: str, dataset: str = "cifar100", image_size: int = 32) -> dict:
    """The run's effective component options (``plan``) of ``method`` on ``dataset`` (ResNet-32)."""
    cfg = from_dict(RunConfig, {"method": method, "data": {"dataset": dataset}, "model": {"backbone": "resnet32"}})
    return plan(cfg, image_size).options


def test_podnet_recipes_defaults():
    p, pb = METHODS.get("podnet"), METHODS.get("podnet-bsce")
    cifar, folder = _options("podnet"), _options("podnet", "imagefolder", 224)
    assert p.head == "lsc" and p.classification == "nca" and p.calibration == ("balanced-finetune",)
    assert cifar["resnet32"]["last_relu"] is False and folder["resnet32"]["last_relu"] is False
    ft = cifar["balanced-finetune"]
    assert ft["lr"] == 0.05 and not ft["decay"] and p.exemplars
    assert folder["balanced-finetune"]["lr"] == 0.01     # official ImageNet config
    assert cifar["pod"] == {"spatial_weight": 3.0, "flat_weight": 1.0}
    assert folder["pod"] == {"spatial_weight": 8.0, "flat_weight": 10.0}
    assert cifar["lsc"]["proxies"] == 10
    assert p.head_init == ("imprint",) and p.constraints == ("freeze-old-rows",) and p.terms == ("pod",)
    assert pb.classification == "bsce" and pb.calibration == () and pb.head == "lsc"
    assert pb.head_init == ("imprint",) and pb.constraints == ()


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
