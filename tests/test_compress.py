"""CIM's exemplar compression (cilearn.memory.codec, cim, compressors): boxes from a hand-made CAM, exact box
pixels, the cost accounting by hand, the budget as a property over random boxes and budgets, the
outer gradient through the inner step (finite differences), and end-to-end runs of every
compressor on iCaRL and FOSTER."""
import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import cilearn
from cilearn.components import build, component_class
from cilearn.errors import ConfigError
from cilearn.memory import Budget, Memory
from cilearn.memory.cim import CIMModel, cim_outer_loss
from cilearn.memory.codec import (BOX_BYTES, Codes, blur, boxes_from_cam, cam, code_bytes, decode, downsample, encode,
                                  fit_prefix, paper_cost, random_box_artifacts, snap)
from cilearn.memory.compressors import CIMOptions, Compressor, CompressorOptions
from cilearn.models import build_net, part
from cilearn.train import Batch


def herding():
    """The herding selection component (the memory's selection rule)."""
    return build(component_class("selection", "herding"), {}, None)


# ---------------------------------------------------------------- boxes and CAMs by hand
def test_box_of_a_hand_made_cam():
    c = torch.zeros(1, 6, 7)
    c[0, 1, 2] = 1.0
    c[0, 3, 4] = 0.7          # above tau 0.6: inside the mask
    c[0, 2, 5] = 0.59         # just below: outside
    c[0, 5, 0] = 0.3
    assert boxes_from_cam(c, 0.6).tolist() == [[1, 2, 4, 5]]        # rows 1..3, cols 2..4 (ends exclusive)
    assert boxes_from_cam(c, 0.25).tolist() == [[1, 0, 6, 6]]       # now (5, 0) and (2, 5) are in: cols 0..5
    c2 = torch.ones(1, 4, 4)                                          # constant map: the whole image
    assert boxes_from_cam(c2, 0.6).tolist() == [[0, 0, 4, 4]]


def test_cam_is_the_class_vector_dot_the_maps_min_max_normalised():
    maps = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 1.0], [0.0, 2.0]]]])    # [1, D=2, 2, 2]
    v = torch.tensor([[1.0, -1.0]])
    raw = torch.tensor([[1.0, 1.0], [3.0, 2.0]])                                    # 1*m0 - 1*m1
    want = (raw - 1.0) / 2.0
    assert torch.allclose(cam(maps, v, (2, 2))[0], want)
    assert torch.equal(cam(torch.ones(1, 2, 2, 2), v, (2, 2)), torch.ones(1, 2, 2))   # constant -> ones


def test_snap_widens_boxes_to_the_grid():
    b = torch.tensor([[1, 3, 5, 6], [0, 0, 0, 0], [2, 2, 7, 7]])
    assert snap(b, 2, 7, 8).tolist() == [[0, 2, 6, 6], [0, 0, 0, 0], [2, 2, 7, 8]]   # ends clipped to H=7, W=8


# ---------------------------------------------------------------- encoding
def _images(n=3, C=2, H=8, W=8, seed=0):
    return torch.randint(0, 256, (n, C, H, W), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_nearest_resampling_by_hand():
    """Official (PIL nearest) resampling: each 2 x 2 cell samples its centre pixel (1, 1), and up
    sampling repeats it over the cell; a partial last cell samples its last pixel."""
    x = torch.arange(25.0).view(1, 1, 5, 5)
    low = downsample(x, 2)
    assert low[0, 0].tolist() == [[6.0, 8.0, 9.0], [16.0, 18.0, 19.0], [21.0, 23.0, 24.0]]
    b = blur(x, 2)
    assert b[0, 0, :2, :2].tolist() == [[6.0, 6.0], [6.0, 6.0]] and b[0, 0, 4, 4] == 24.0
    assert blur(x, 2, "area")[0, 0, 0, 0] != 6.0                       # the area + bilinear variant differs


@pytest.mark.parametrize("mode", ["nearest", "area"])
def test_compression_keeps_the_box_exactly_and_downsamples_the_rest(mode):
    x = _images()
    boxes = torch.tensor([[2, 2, 6, 6], [0, 0, 0, 0], [1, 3, 7, 8]])      # the last is snapped to (0, 2, 8, 8)
    codes = encode(x, boxes, 2, mode=mode)
    out = decode(codes)
    assert out.dtype == torch.uint8 and out.shape == x.shape and codes.mode == mode
    if mode == "nearest":                                                 # every other pixel, repeated 2 x 2
        want = x[:, :, 1::2, 1::2].repeat_interleave(2, 2).repeat_interleave(2, 3)
    else:
        want = F.interpolate(torch.round(downsample(x, 2, "area")), size=(8, 8), mode="bilinear", align_corners=False)
        want = want.round().clamp(0, 255).to(torch.uint8)
    for i, (y0, x0, y1, x1) in enumerate(codes.boxes.tolist()):
        inside = torch.zeros(8, 8, dtype=torch.bool)
        inside[y0:y1, x0:x1] = True
        assert torch.equal(out[i][:, inside], x[i][:, inside])            # box pixels exact
        assert torch.equal(out[i][:, ~inside], want[i][:, ~inside])       # the rest: down 2x2, up again
    assert codes.boxes.tolist() == [[2, 2, 6, 6], [0, 0, 0, 0], [0, 2, 8, 8]]
    again = Codes.from_state(codes.state(), "cpu")                        # the mode travels with the codes
    assert again.mode == mode and torch.equal(decode(again), out)


def test_codes_of_float_pixels_keep_their_dtype_and_head_truncates():
    x = _images().float() + 0.25
    codes = encode(x, torch.tensor([[0, 0, 4, 4]] * 3), 2)
    assert codes.sharp.dtype == torch.float32
    out = decode(codes)
    assert torch.equal(out[:, :, :4, :4], x[:, :, :4, :4])
    two = codes.head(2)
    assert len(two) == 2 and torch.equal(decode(two), out[:2])


# ---------------------------------------------------------------- cost accounting by hand
def test_cost_accounting_by_hand():
    # 1 x 8 x 8 image, eta 4 (2 x 2 cells): a 4 x 4 box = 16 sharp pixels; 16 cells - 4 under the box
    # = 12 coarse cells; + 8 bytes of coordinates = 36 bytes. Paper: a = 1/4, a + (1 - a)/4 = 0.4375
    # images = 28 bytes, the code without its coordinates.
    boxes = torch.tensor([[2, 2, 6, 6], [0, 0, 0, 0], [0, 0, 8, 8], [0, 0, 2, 8]])
    assert code_bytes(boxes, (1, 8, 8), 2).tolist() == [36, 16 + 8, 64 + 8, 16 + 12 + 8]
    assert code_bytes(boxes[:2], (3, 8, 8), 2, with_boxes=False).tolist() == [3 * 28, 3 * 16]
    assert torch.allclose(paper_cost(boxes, 8, 8, 4) * 64, torch.tensor([28.0, 16.0, 64.0, 28.0]))
    # what is stored is what is counted: the code's tensors hold exactly these bytes
    x = _images(4, C=1)
    codes = encode(x, boxes, 2)
    stored = codes.sharp.numel() + codes.coarse.numel() + BOX_BYTES * len(codes)
    assert codes.nbytes == stored == 36 + 24 + 72 + 36
    assert fit_prefix(codes.sizes(), 60) == 2 and fit_prefix(codes.sizes(), 59) == 1


class RandomBoxes(Compressor):
    """Random boxes (any size, any place), for the budget property."""

    def __init__(self, seed):
        super().__init__(CompressorOptions(eta=4), None)
        self.g = torch.Generator().manual_seed(seed)

    def boxes(self, net, normalize, x, c):
        n, _, H, W = x.shape
        y0 = torch.randint(0, H, (n,), generator=self.g)
        x0 = torch.randint(0, W, (n,), generator=self.g)
        return torch.stack([y0, x0, y0 + torch.randint(0, H + 1, (n,), generator=self.g),
                            x0 + torch.randint(0, W + 1, (n,), generator=self.g)], 1).clamp(max=H)


@pytest.mark.parametrize("seed", range(12))
def test_budget_in_units_and_bytes_is_never_exceeded(seed):
    g = torch.Generator().manual_seed(seed)
    C, H = int(torch.randint(1, 4, (1,), generator=g)), int(torch.randint(4, 13, (1,), generator=g))
    unit = C * H * H
    per_class = bool(torch.randint(0, 2, (1,), generator=g))
    budget = Budget(per_class=int(torch.randint(1, 5, (1,), generator=g))) if per_class else \
        Budget(total=int(torch.randint(8, 40, (1,), generator=g)))
    mem = Memory(budget, herding(), compressor=RandomBoxes(seed))
    seen = 0
    for phase in range(4):
        new = range(seen, seen + 2)
        seen += 2
        y = torch.arange(seen - 2, seen).repeat_interleave(30)
        x = torch.randint(0, 256, (len(y), C, H, H), generator=g, dtype=torch.uint8)
        mem.update(x, y, new, torch.randn(len(y), 5, generator=g), seen)
        share = budget.share(seen)
        for c in range(seen):
            assert mem.class_bytes(c) <= share * unit                          # per class, in bytes
            assert mem.codes[c].nbytes == mem.class_bytes(c)
            assert len(mem.exemplars[c]) == len(mem.codes[c])
            assert torch.equal(mem.exemplars[c], decode(mem.codes[c]))
            if c in new or budget.per_class is not None:    # a boxed class may lose one to a later shrink
                assert len(mem.exemplars[c]) >= min(share, 30)                  # never fewer than whole images
        assert mem.nbytes <= seen * share * unit                               # in total
        if budget.total is not None:
            assert mem.nbytes <= budget.total * unit
    # herding order decides what is kept: a class's stored boxes are a prefix of what it had
    before = {c: v.boxes.clone() for c, v in mem.codes.items()}
    mem.shrink(max(budget.share(seen) - 1, 0))
    for c, v in mem.codes.items():
        assert torch.equal(v.boxes, before[c][: len(v)])


# ---------------------------------------------------------------- the CIM model's bilevel gradient
def _rational_by_hand(x, p, q):
    num = sum(a * x ** k for k, a in enumerate(p))
    den = 1 + sum(abs(b * x ** (k + 1)) for k, b in enumerate(q))
    return num / den


def test_rational_activation_by_hand():
    """Version A, degrees 5 / 4: ``P(x) / (1 + sum |b_k x^k|)``, initially close to ReLU on [-3, 3];
    value and gradient (in x and in a coefficient) against the formula by hand."""
    from cilearn.memory.cim import RATIONAL_RELU_P, RATIONAL_RELU_Q, Rational
    r = Rational().double()
    assert torch.allclose(r.p, torch.tensor(RATIONAL_RELU_P, dtype=torch.float64), rtol=1e-7)   # the package's fit
    assert torch.allclose(r.q, torch.tensor(RATIONAL_RELU_Q, dtype=torch.float64), rtol=1e-7)
    P, Q = r.p.tolist(), r.q.tolist()
    xs = [-2.0, -0.5, 0.0, 0.7, 1.0, 2.5]
    x = torch.tensor(xs, dtype=torch.float64, requires_grad=True)
    y = r(x)
    for xi, yi in zip(xs, y.tolist()):
        assert yi == pytest.approx(_rational_by_hand(xi, P, Q), rel=1e-12)
        assert abs(yi - max(xi, 0.0)) < 0.06                              # close to ReLU
    gx, gp = torch.autograd.grad(y.sum(), [x, r.p])
    eps = 1e-6
    for i, xi in enumerate(xs):
        fd = (_rational_by_hand(xi + eps, P, Q)
              - _rational_by_hand(xi - eps, P, Q)) / (2 * eps)
        assert gx[i].item() == pytest.approx(fd, rel=1e-5, abs=1e-9)   # (x = 0: the |b_1 x| kink, O(eps))
    den = [1 + sum(abs(b * v ** (k + 1)) for k, b in enumerate(Q)) for v in xs]
    assert gp[2].item() == pytest.approx(sum(v ** 2 / d for v, d in zip(xs, den)), rel=1e-9)   # d f / d a_2 = x^2 / Q


def test_rational_activation_large_inputs_and_gradients_across_branches():
    """Beyond |x| = 1 the rational is evaluated divided by x^5: the same values as the formula (by
    hand, in Python floats), finite in float32 where x^5 overflows (6e8: a young extractor's
    activations), and gradients in x and in both coefficient sets right on both sides of |x| = 1
    and at 0 (gradcheck, float64)."""
    from cilearn.memory.cim import Rational
    r = Rational().double()
    P, Q = r.p.tolist(), r.q.tolist()
    xs = [-1e9, -50.0, -1.0000001, 1.0, 1.5, 3e3, 1e12]
    y = r(torch.tensor(xs, dtype=torch.float64))
    for xi, yi in zip(xs, y.tolist()):
        assert yi == pytest.approx(_rational_by_hand(xi, P, Q), rel=1e-10)
    big = Rational()(torch.tensor([6e8, -6e8]))                        # float32: x^5 = 7.8e43 overflows
    assert torch.isfinite(big).all()
    assert big[0].item() == pytest.approx(P[5] / abs(Q[3]) * 6e8, rel=1e-6)   # ~ (a_5 / |b_4|) x
    x = torch.tensor([-7.0, -1.2, -1.0, -0.4, 0.0, 0.3, 1.0, 1.01, 4.0], dtype=torch.float64, requires_grad=True)
    p, q = r.p.detach().clone().requires_grad_(True), r.q.detach().clone().requires_grad_(True)

    assert torch.autograd.gradcheck(lambda x, p, q: torch.func.functional_call(r, {"p": p, "q": q}, (x,)), (x, p, q))
    # a tensor larger than a piece (CHUNK elements) goes through in pieces: the same values and gradients
    r32 = Rational()
    big = (torch.randn(3, Rational.CHUNK // 2 + 7) * 3).requires_grad_(True)
    whole = r32._values(big)
    pieces = r32(big)
    assert big.numel() > Rational.CHUNK and torch.equal(pieces, whole)
    (g_pieces,) = torch.autograd.grad(pieces.square().sum(), big)
    (g_whole,) = torch.autograd.grad(whole.square().sum(), big)
    assert torch.equal(g_pieces, g_whole)


def test_mask_model_shares_the_cil_convolutions_and_owns_its_activations():
    """phi is the CIL network with a rational in each backbone ReLU slot (as the official code's
    two activations): the CIL forward is unchanged (ReLU), the CIM forward (``active()``) runs the
    rationals through the same convolution tensors; phi's own parameters are only the rationals',
    which the training loop leaves to phi's optimizer; an expandable backbone's new extractors get
    them too."""
    from cilearn.memory.cim import Rational
    from cilearn.train import FitSettings, fit
    from cilearn.data.augment import Augmenter
    torch.manual_seed(0)
    net = build_net("resnet32", "linear", 1).eval()
    net.add_classes(2)
    n_relu = sum(isinstance(m, torch.nn.ReLU) for m in net.backbone.modules())
    convs = [m.weight for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    probe = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        relu_out = net(probe).logits
    cim = CIMModel().ensure(net)
    assert len(cim.acts) == n_relu == 1 + 2 * 15                     # the stem and both of each of 15 blocks
    assert not any(isinstance(m, torch.nn.ReLU) for m in net.backbone.modules())
    assert [m.weight for m in net.modules() if isinstance(m, torch.nn.Conv2d)] == convs   # the same tensors
    with torch.no_grad():
        assert torch.equal(net(probe).logits, relu_out)             # the CIL forward: still the ReLUs
        with cim.active():
            cim_out = net(probe).logits                             # the CIM forward: the rationals
        assert not torch.allclose(cim_out, relu_out, atol=1e-4)
        with torch.no_grad():
            cim.acts[0].p[1] += 0.5                                 # phi moves the CIM forward only
        assert torch.equal(net(probe).logits, relu_out)
        with cim.active():
            assert not torch.allclose(net(probe).logits, cim_out)
            cim.acts[0].p[1] -= 0.5
    net.train()
    own = {id(p) for p in cim.parameters()}
    assert len(own) == 2 * n_relu and own <= {id(p) for p in net.parameters()}
    # one step of the training loop moves the convolutions, not phi
    before = [a.p.detach().clone() for a in cim.acts]
    conv0 = convs[0].detach().clone()
    x = torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8)
    y = torch.tensor([0, 1] * 4)
    aug = Augmenter("none", 0, (0.5,), (0.5,), channels_last=False)

    def loss(batch):
        v = F.cross_entropy(net(batch.x).logits, batch.y)
        return v, {}
    fit(net, x, y, loss, FitSettings(epochs=1, lr=0.1, batch_size=8, progress=False), aug, torch.Generator())
    assert not torch.equal(convs[0], conv0) and all(torch.equal(a.p, b) for a, b in zip(cim.acts, before))
    ex = build_net("resnet32", "linear", 1, expandable=True)
    ex.add_classes(2)
    CIMModel().ensure(ex)
    ex.expand()
    assert sum(isinstance(m, Rational) for m in ex.backbone.modules()) == 2 * n_relu   # the new extractor's too


def test_outer_gradient_reaches_the_cim_parameters_through_the_inner_step():
    torch.manual_seed(0)
    net = build_net("convnet", "linear", 1).double().eval()
    net.add_classes(3)
    cim = CIMModel().ensure(net)
    net.double()
    from cilearn.memory.cim import phi_names
    keys = phi_names(net)
    trainable = {k: p.detach().clone().requires_grad_(True) for k, p in net.named_parameters() if k not in keys}
    fixed = {k: p for k, p in net.named_parameters() if k in keys}    # phi itself (not stepped by the inner step)
    fixed.update({k: b.detach() for k, b in net.named_buffers()})
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1])
    ex = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    ey = torch.tensor([2, 0, 1])
    vx = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    vy = torch.tensor([0, 1, 2, 0, 1])
    xs, ys = torch.cat([ex, x]), torch.cat([ey, y])     # one batch of exemplars and new images, all compressed

    def objective(with_reg=True):
        return cim_outer_loss(net, cim, trainable, fixed, xs, ys, vx, vy, 2, 0.5,
                              0.1 if with_reg else 0.0, 0.0)[0]

    coef = cim.acts[-1].p                    # the last rational's numerator: it shapes the last-stage maps
    loss = objective(with_reg=False)          # validation CE only: reaches phi through the inner step alone
    (g,) = torch.autograd.grad(loss, [coef])
    assert g.abs().sum() > 0 and torch.isfinite(g).all()
    eps = 1e-6

    def shifted(i, d):           # the objective at coef + d e_i (it needs autograd: its inner step)
        with torch.no_grad():
            coef[i] += d
        v = objective(False).item()
        with torch.no_grad():
            coef[i] -= d
        return v

    for i in torch.topk(g.abs(), 3).indices.tolist():
        up, down = shifted(i, eps), shifted(i, -eps)
        assert math.isclose((up - down) / (2 * eps), g[i].item(), rel_tol=1e-4, abs_tol=1e-9)
    # the regulariser: the mean of the squared normalised CAM at feature resolution (official MSE(CAM, 0))
    _, terms = cim_outer_loss(net, cim, trainable, fixed, xs, ys, vx, vy, 2, 0.5, 1.0, 0.0)
    with torch.no_grad(), cim.active():                                       # the CIM forward: rationals
        maps = net(xs).maps[-1]                                               # [7, D, 2, 2]
        v = net.head.weight[ys]
        m = torch.einsum("bd,bdhw->bhw", v, maps)
        lo, hi = m.flatten(1).min(1).values, m.flatten(1).max(1).values
        want = (((m - lo[:, None, None]) / (hi - lo)[:, None, None]) ** 2).mean()
    assert terms["reg"] == pytest.approx(want.item(), rel=1e-9)
    # the memory regulariser reaches phi directly (no inner step involved)
    g_reg = torch.autograd.grad(objective(with_reg=True) - objective(with_reg=False), coef)[0]
    assert g_reg.abs().sum() > 0


def test_inner_step_on_the_methods_full_loss_and_the_extractor_only():
    """The official inner step: the phase's full training loss (here a stand-in with a second term
    and a look at ``batch.view``) with the extractor's parameters replaced, the classifier not
    among the stepped ones; same value as the loss on a copy of the net holding those parameters,
    gradients to the given leaves only, the net itself untouched."""

    from cilearn.memory.cim import cil_split, method_inner_loss
    torch.manual_seed(0)
    net = build_net("convnet", "linear", 1).eval()
    net.add_classes(3)
    views = []

    def loss_of(model):
        def loss(batch):
            views.append(batch.view)
            out = model(batch.x)
            return F.cross_entropy(out.logits, batch.y) + 0.5 * out.embedding.pow(2).mean(), {}
        return loss

    trainable, fixed = cil_split(net, "backbone.")
    assert trainable and all(k.startswith("backbone.") for k in trainable)
    assert {k for k, _ in net.head.named_parameters(prefix="head")} <= set(fixed)      # the classifier left alone
    assert set(cil_split(net)[0]) == {k for k, p in net.named_parameters()}            # "all": every parameter
    moved = {k: (v + 0.05 * torch.randn_like(v)).detach().requires_grad_(True) for k, v in trainable.items()}
    x, y = torch.randn(5, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1])
    own = {k: v.clone() for k, v in net.state_dict().items()}
    got = method_inner_loss(net, loss_of(net))(moved, x, y)
    twin = copy.deepcopy(net)
    twin.load_state_dict({**net.state_dict(), **{k: v.detach() for k, v in moved.items()}})
    want = loss_of(twin)(Batch(x, y, torch.arange(5), None))[0]
    assert got.item() == pytest.approx(want.item(), rel=1e-6) and views[0] is None
    grads = torch.autograd.grad(got, list(moved.values()))
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    assert all(torch.equal(v, own[k]) for k, v in net.state_dict().items())              # the net untouched
    # in the bilevel objective the outer gradient still reaches phi through this inner step
    cim = CIMModel().ensure(net)
    loss, _ = cim_outer_loss(net, cim, moved, fixed, x[:3], y[:3], x, y, 2, 0.5, 0.0, 0.0,
                             inner_loss=method_inner_loss(net, loss_of(net)))
    (g,) = torch.autograd.grad(loss, [cim.acts[-1].p])
    assert g.abs().sum() > 0 and torch.isfinite(g).all()


# ---------------------------------------------------------------- artifact augmentation
def test_artifacts_compress_chosen_new_rows_around_a_box():
    x = torch.randn(6, 1, 8, 8)
    rows = torch.tensor([True, True, True, False, True, False])
    out, changed = random_box_artifacts(x, 1.0, 2, torch.Generator().manual_seed(1), rows)
    assert changed.tolist() == rows.tolist()
    b = blur(x, 2)
    for i in range(6):
        same = out[i] == x[i]
        if not changed[i]:
            assert same.all()
        else:
            assert same.sum() >= 4                         # a box of at least 2 x 2 pixels kept
            assert torch.allclose(out[i][~same], b[i][~same])   # and the rest is the blurred image
    out0, changed0 = random_box_artifacts(x, 0.0, 2, torch.Generator().manual_seed(1), rows)
    assert not changed0.any() and torch.equal(out0, x)


# ---------------------------------------------------------------- end to end
class Runs:
    """The end-to-end runs, each made when a test first asks for it (one per method and compressor,
    shared by the module's tests): (metrics, run directory). CIM gets 3 phase-end steps
    (``memory.compression.iterations``, an option of the cim compressor only) for its statistics."""

    def __init__(self, tmp):
        self.tmp, self.done = tmp, {}

    def __getitem__(self, key):
        if key not in self.done:
            from conftest import quick_config
            method, comp = key
            cfg = quick_config(self.tmp, method=method, out=str(self.tmp / f"{method}-{comp}"), train__epochs=4,
                               train__keep_checkpoint=True,
                               memory={"per_class": 2, "compressor": comp,
                                       **({"compression": {"iterations": 3}} if comp == "cim" else {})},
                               report={"save_exemplars": 6})
            res = cilearn.run(cfg, echo=False)
            self.done[key] = (res.metrics, Path(cfg.out))
        return self.done[key]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return Runs(tmp_path_factory.mktemp("cim"))


@pytest.mark.parametrize("method", ["icarl", "foster"])
@pytest.mark.parametrize("comp", ["full", "cam-threshold", "cim"])
def test_compressors_end_to_end(runs, method, comp):
    m, out = runs[method, comp]
    base, _ = runs["icarl", "none"]
    mem = m["memory"]
    assert mem["compressor"] == comp and mem["unit_bytes"] == 64 and mem["share_units"] == 2
    assert all(b <= 2 * 64 for b in mem["class_bytes"])                   # the budget, per class, in bytes
    assert all(u <= 2 for u in mem["class_units"])
    assert base["memory"]["class_images"] == [2] * 10
    # never fewer exemplars than whole images in the same bytes: where boxes would keep no more (digits'
    # 8 x 8 images leave CAM boxes little room), the class stores whole images
    assert min(mem["class_images"]) >= 2
    if comp == "full":
        assert mem["class_images"] == [8] * 10          # 2 images of 64 bytes = 8 codes of 16
    assert m["phases"][-1]["memory_images"] == sum(mem["class_images"])
    assert m["phases"][-1]["memory_bytes"] == sum(mem["class_bytes"]) <= 10 * 2 * 64
    acc = torch.tensor(m["accuracy_matrix"][-1])
    # 2 exemplars per class and 4 epochs: the CNN forgets (the uncompressed base too: ~45); NME keeps more
    assert torch.isfinite(acc).all() and m["phases"][0]["acc"] > 80 and m["avg_incremental_acc"] > 30
    assert m["avg_incremental_acc_nme"] > 40
    for i in range(5):
        assert (out / f"compressed-phase{i}.png").stat().st_size > 5000
    if comp == "cim":
        st = m["phases"][-1]["compressor"]
        assert st["cim_mask_first"] > 0 and math.isfinite(st["cim_loss_last"])


def test_checkpoint_holds_the_codes_and_they_load(runs):
    _, out = runs["icarl", "cim"]
    from cilearn.checkpoint import load_checkpoint
    ckpt = load_checkpoint(out / "checkpoint-phase.pt")
    st = ckpt["memory"]
    assert set(st) == {"codes"}                    # the memory holds the codes; the compressor's state is its component's
    assert "cim" in ckpt["method"]["components"]
    mem = Memory(Budget(per_class=2), compressor=build(component_class("compressor", "cim"), {}, None))
    mem.load_state(st, torch.device("cpu"))
    assert sum(len(v) for v in mem.codes.values()) == len(mem) == runs["icarl", "cim"][0]["memory"]["total_images"]
    assert mem.nbytes == runs["icarl", "cim"][0]["memory"]["total_bytes"]
    net_state = load_checkpoint(out / "checkpoint-phase.pt")["net"]
    assert sum(k.endswith(".p") for k in net_state) == 3          # phi: the net's rationals (convnet: one per stage)


@pytest.mark.parametrize("method", ["icarl", "foster"])
def test_saved_model_of_a_cim_run_has_no_rationals_and_gives_the_last_phase(runs, method):
    """The final model leaves CIM's rationals out (a ReLU in their slot is the same function) and,
    rebuilt (FOSTER: the boosted two-extractor net its last phase reported), gives the run's last phase."""
    from safetensors.torch import load_file

    from cilearn.api import evaluate
    m, out = runs[method, "cim"]
    assert not any(k.endswith((".p", ".q")) for k in load_file(out / "model.safetensors"))
    r = evaluate(out, device="cpu")
    assert (r["acc"], r["acc_nme"], r["acc_task"]) == (m["last_acc"], m["last_acc_nme"], m["last_acc_task"])


def test_recipes_default_to_cim(quick, monkeypatch):
    from cilearn.prepare import prepare
    for name in ("foster-cim", "der-cim"):
        cfg, _, cls = prepare(quick(method=name))
        assert cfg.memory.compressor == "cim"
    cfg, _, _ = prepare(quick(method="foster"))
    assert cfg.memory.compressor == "none"


@pytest.mark.parametrize("over,msg", [
    ({"method": "lwf", "memory": {"compressor": "cim"}}, "keeps none"),
    ({"memory": {"compressor": "jpeg"}}, "--compressor: unknown compressor component 'jpeg'"),
    ({"memory": {"compressor": "full", "compression": {"eta": 3}}}, "eta must be a square"),
    ({"memory": {"compressor": "cim", "compression": {"tau": 0}}}, "tau must be in"),
])
def test_bad_compression_options_are_config_errors(quick, tmp_path, over, msg):
    with pytest.raises(ConfigError, match=msg):
        cilearn.run(quick(**over), echo=False)
    assert not (tmp_path / "run").exists()                    # nothing written


def test_class_vectors_of_each_head_by_hand():
    from cilearn.memory.codec import class_vectors
    lin = part("head", "linear").create(2)
    lin.add_classes(2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[3.0, 4.0], [1.0, 0.0]]))
    assert torch.equal(class_vectors(lin), lin.weight)                       # linear: its rows
    cos = part("head", "cosine").create(2)
    cos.add_classes(2)
    with torch.no_grad():
        cos.weight.copy_(torch.tensor([[3.0, 4.0], [0.0, -2.0]]))
    assert torch.allclose(class_vectors(cos), torch.tensor([[0.6, 0.8], [0.0, -1.0]]))   # normalised rows
    lsc = part("head", "lsc", proxies=2).create(2)
    lsc.add_classes(1)
    with torch.no_grad():
        lsc.weight.copy_(torch.tensor([[3.0, 4.0], [0.0, 2.0]]))
    assert torch.allclose(class_vectors(lsc), torch.tensor([[0.3, 0.9]]))   # mean of normalised proxies


@pytest.mark.parametrize("method", ["lucir", "podnet", "der"])   # the cosine, LSC and expandable nets
def test_every_exemplar_method_takes_a_compressor(method, quick):
    """Cosine (LUCIR), LSC (PODNet) and expandable (DER) nets give CAM boxes too (the linear head:
    the icarl / foster runs above; replay and wa share it); 2 phases."""
    m = cilearn.run(quick(method=method, train__epochs=2, scenario={"base": 0, "increment": 5},
                          memory={"per_class": 3, "compressor": "cam-threshold"}), echo=False).metrics
    mem = m["memory"]
    assert mem["compressor"] == "cam-threshold" and min(mem["class_images"]) >= 3
    assert all(b <= 3 * 64 for b in mem["class_bytes"])
    assert all(math.isfinite(a) for row in m["accuracy_matrix"] for a in row)   # 2 epochs: not an accuracy test


def test_a_class_shrunk_to_no_exemplar_shrinks_again():
    # a box over the whole image costs the image + 8 bytes: more than one unit, so share 1 keeps none
    mem = Memory(Budget(per_class=1), compressor=RandomBoxes(0))
    x = _images(2, C=1)
    mem.codes[0] = encode(x, torch.tensor([[0, 0, 8, 8]] * 2), 2)
    mem.exemplars[0] = decode(mem.codes[0])
    mem.shrink(1)
    assert len(mem.exemplars[0]) == 0 and mem.class_bytes(0) == 0
    mem.shrink(1)                                     # the unit comes from the codes, not from an exemplar
    assert len(mem.codes[0]) == 0


def test_cim_meta_iterations_after_every_epoch(quick, monkeypatch):
    """The mask model trains alongside the CIL model: max(1, int(0.5 x new classes)) bilevel steps
    after every training epoch of every phase (official num_meta_iters_per_cls), recorded per phase."""
    import cilearn.memory.cim as cim_module        # the module whose meta_steps calls cim_outer_loss
    real, calls = cim_module.cim_outer_loss, []

    def watched(net, cim, *args, **kw):         # every step differentiates phi (the trainable extractor's
        trained = {id(p) for p in cim.parameters()}             # rationals), not a frozen extractor's
        calls.append(bool(trained) and all(p.requires_grad == (id(p) in trained)
                                           for a in cim.acts for p in a.parameters()))
        return real(net, cim, *args, **kw)
    monkeypatch.setattr(cim_module, "cim_outer_loss", watched)
    m = cilearn.run(quick(method="foster-cim", train={"epochs": 2, "progress": False, "precision": "fp32"},
                          scenario={"base": 2, "increment": 4}), echo=False).metrics
    assert [r["cim_meta_steps"] for r in m["phases"]] == [2 * 1, 2 * 2, 2 * 2]       # 2, 4, 4 new classes
    assert len(calls) == 10 and all(calls)
    assert all(r["cim_meta_seconds"] > 0 for r in m["phases"])


def test_phi_step_skips_a_step_that_is_not_finite():
    """Both CIM step loops (the epoch-end meta-iterations and the phase-end ones) update phi only
    on a finite loss with finite gradients, the norm clipped."""
    from cilearn.memory.cim import phi_step
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = torch.optim.SGD([w], lr=0.5)
    assert not phi_step((w * float("inf")).sum(), [w], opt, 1.0) and w.tolist() == [1.0, 2.0]
    assert not phi_step((w * w).sum() * float("nan"), [w], opt, 1.0) and w.tolist() == [1.0, 2.0]
    assert phi_step((3 * w).sum(), [w], opt, 1.0)              # gradient (3, 3), clipped to norm 1
    assert w.tolist() == pytest.approx([1.0 - 0.5 / math.sqrt(2), 2.0 - 0.5 / math.sqrt(2)])


def test_batch_statistics_normalises_by_the_batch_and_keeps_the_running_statistics():
    """``bn batch`` for the CIM step: training-mode BatchNorm on the batch's own statistics, the
    running statistics and the module modes as they were; a frozen extractor stays in eval mode."""
    from cilearn.models.net import batch_statistics
    torch.manual_seed(0)
    net = build_net("resnet32", "linear", 1, expandable=True)
    net.add_classes(2)
    net.expand()                                           # extractor 0 frozen (eval mode), 1 trains
    net.add_classes(2)
    net.eval()
    x = torch.randn(6, 1, 8, 8) * 3 + 1
    state = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        twin = copy.deepcopy(net).train()
        want = twin(x).logits                              # training mode (updates the twin's statistics)
        with batch_statistics(net):
            assert net.training and not net.backbone.extractors[0].training
            got = net(x).logits
        running = net(x).logits
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, running, atol=1e-3)
    assert not net.training and all(not m.training for m in net.modules())
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())     # nothing updated
    assert all(m.track_running_stats for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_cim_meta_step_on_batch_statistics_end_to_end(quick, monkeypatch):
    """``--components.cim.bn batch``: the steps run with the net in training mode on batch
    statistics (the CIM forward included), and leave the CIL model's running statistics alone;
    the earlier ``components.cim-meta.bn`` is a short name of the same option; a bad value is a
    config error naming the option."""
    from cilearn.methods.recipe import plan
    import cilearn.memory.cim as cim_module
    real, seen = cim_module.cim_outer_loss, []

    def watched(net, cim, *args, **kw):
        bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d) and m.training]
        before = [m.running_mean.clone() for m in bns]
        out = real(net, cim, *args, **kw)
        seen.append((net.training, bool(bns) and not any(m.track_running_stats for m in bns),
                     all(torch.equal(m.running_mean, b) for m, b in zip(bns, before))))
        return out
    monkeypatch.setattr(cim_module, "cim_outer_loss", watched)
    legacy = quick(method="foster-cim", components={"cim-meta": {"bn": "batch"}})
    assert plan(legacy, 8).options["cim"]["bn"] == "batch" and plan(quick(method="foster-cim"), 8).options["cim"]["bn"] == "running"
    cfg = quick(method="foster-cim", train={"epochs": 1, "progress": False, "precision": "fp32"},
                scenario={"base": 2, "increment": 4}, components={"cim": {"bn": "batch"}})
    m = cilearn.run(cfg, echo=False).metrics
    assert seen and all(s == (True, True, True) for s in seen)
    assert [r["cim_meta_steps"] for r in m["phases"]] == [1, 2, 2]
    with pytest.raises(ConfigError, match="bn running or batch"):
        CIMOptions(bn="none")


@pytest.mark.parametrize("select_on", ["compressed", "original"])
def test_herding_runs_on_the_compressed_images_features(select_on):
    """Official: herding orders a class by the features of its compressed images (the boxes kept,
    the rest downsampled); ``select_on original``: by the given features of the originals."""
    from cilearn.memory.codec import compressed_features

    class CornerBoxes(Compressor):
        name = "corner"

        def boxes(self, net, normalize, x, c):
            return torch.tensor([[0, 0, 4, 4]] * len(x))

    torch.manual_seed(0)
    net = build_net("convnet", "linear", 1).eval()
    net.add_classes(2)
    norm = lambda x: (x.float() / 255.0 - 0.5) / 0.25          # noqa: E731
    comp = CornerBoxes(CompressorOptions(eta=4, select_on=select_on), None)
    mem = Memory(Budget(per_class=2), herding(), compressor=comp)
    got = []
    real = mem.select
    mem.select = lambda f, m, gen=None: (got.append(f), real(f, m, gen))[1]
    x = _images(n=10, C=1, H=8, W=8)
    y = torch.tensor([0] * 5 + [1] * 5)
    given = torch.randn(10, 3)
    mem.update(x, y, range(0, 2), given, 2, net=net, normalize=norm)
    want = compressed_features(net, norm, decode(encode(x[:5], torch.tensor([[0, 0, 4, 4]] * 5), 2)))
    if select_on == "compressed":
        assert torch.allclose(got[0], want) and not torch.allclose(got[0], compressed_features(net, norm, x[:5]))
    else:
        assert torch.equal(got[0], given[:5])


def test_own_box_artifacts_by_hand():
    from cilearn.memory.codec import own_box_artifacts
    x = torch.arange(32.0).view(2, 1, 4, 4)
    boxes = torch.tensor([[0, 0, 2, 2], [1, 1, 4, 4]])
    out = own_box_artifacts(x, boxes, torch.tensor([True, False]), 2)
    b = blur(x, 2)
    assert torch.equal(out[1], x[1])                                     # not chosen: unchanged
    inside = torch.zeros(4, 4, dtype=torch.bool)
    inside[0:2, 0:2] = True
    assert torch.equal(out[0, 0][inside], x[0, 0][inside]) and torch.equal(out[0, 0][~inside], b[0, 0][~inside])


def test_artifacts_use_each_images_own_box_with_the_ramped_probability(quick):
    """Official artifact augmentation (the compressor's training side): probability ``artifact_prob x
    (epochs done // artifact_refresh)`` (0 before the first refresh, no draw from the generator
    then), each chosen new-class image compressed around its own box from the compressor,
    recomputed at each refresh."""
    from cilearn.components import PhaseContext, Step
    from cilearn.data.augment import Augmenter
    from cilearn.data.scenario import Phase
    from cilearn.services import RunServices

    class IndexBoxes(Compressor):                 # image i of class c: the box (0, 0, 2 + i % 3, 4)
        name = "index"

        def boxes(self, net, normalize, x, c):
            h = 2 + torch.arange(len(x)) % 3
            return torch.stack([torch.zeros_like(h), torch.zeros_like(h), h, torch.full_like(h, 4)], 1)

    aug = Augmenter("none", 0, (0.5,), (0.5,), channels_last=False)
    services = RunServices(quick(), None, None, aug, torch.device("cpu"), torch.Generator().manual_seed(0), None)
    art = IndexBoxes(CompressorOptions(eta=4, artifact_prob=0.5, artifact_refresh=2), services)
    assert art.first_phase() == 0                                        # every phase, phase 0 included
    x = torch.randint(0, 256, (6, 1, 4, 4), dtype=torch.uint8)          # the stored images
    y = torch.tensor([0, 0, 0, 1, 1, 1])
    phase = Phase(0, 0, 2)
    ctx = PhaseContext(phase, None, None, x, y, torch.ones(2), None)
    art.phase_start(ctx)
    batch = Batch(aug.test(x), y, torch.arange(6), 0)
    step = Step(batch, ctx)
    state = services.gen.get_state()
    art.before_step(step)
    assert step.batch is batch and torch.equal(services.gen.get_state(), state)   # 0 before the first refresh
    art.epoch_end(ctx, 0)
    assert art.probability() == 0.0
    art.epoch_end(ctx, 1)                                                 # 2 epochs done: refresh, 0.5
    assert art.probability() == 0.5 and art.boxes_.tolist()[:3] == [[0, 0, 2, 4], [0, 0, 3, 4], [0, 0, 4, 4]]
    art.epochs_done = 4
    assert art.probability() == 1.0                                       # 0.5 x (4 // 2), at most 1
    step = Step(batch, ctx)
    art.before_step(step)
    out = step.batch
    b = aug.test(blur(x, 2).round().byte())
    for i in range(6):                                                    # all chosen (p = 1): own box kept
        h = 2 + (i % 3)
        assert torch.equal(out.x[i, :, :h], batch.x[i, :, :h]) and torch.equal(out.x[i, :, h:], b[i, :, h:])
    assert out.view is None
    # the earlier form: a random box at a fixed probability, phases > 0 only (phase 0: the batch as given)
    rb = IndexBoxes(CompressorOptions(eta=4, artifacts="random-box", artifact_prob=0.1), services)
    assert rb.probability() == 0.1
    rb.phase_start(ctx)
    step = Step(batch, ctx)
    state = services.gen.get_state()
    rb.before_step(step)
    assert step.batch is batch and torch.equal(services.gen.get_state(), state)
    # the old component options are short names of the compressor's
    from cilearn.methods.recipe import plan
    got = plan(quick(method="foster-cim", components={"artifacts": {"mode": "random-box", "prob": 0.3, "refresh": 5}}), 8)
    assert {k: got.options["cim"][k] for k in ("artifacts", "artifact_prob", "artifact_refresh")} == \
        {"artifacts": "random-box", "artifact_prob": 0.3, "artifact_refresh": 5}
