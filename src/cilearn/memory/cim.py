"""CIM's mask model and its bilevel step (Luo, Liu, Schiele & Sun, CVPR 2023, Sec. 4; the official
code ``xfflzl/CIM-CIL``): the rational activations phi that turn the CIL network into the CIM
model (``Rational``, ``CIMModel``), its batches (``MetaBatches``: the phase's new images and
exemplars mixed, train-augmented), the bilevel objective of one outer step (``cim_outer_loss``:
one differentiable SGD step of the CIL model on a softly compressed batch, then the updated
model's loss on the next batch of real images plus the memory regulariser and the CIM model's
CE), and ``meta_steps``, the one loop of outer steps that both the per-epoch meta-iterations and
the phase-end iterations of the ``cim`` compressor (``cilearn.memory.compressors``) run.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from ..train import Batch
from .codec import at_least_float32, cam, class_vectors, soft_compress


def cil_split(net: nn.Module, only: str = "") -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The CIL model's tensors for the CIM step's inner update: (its trainable parameters whose
    names start with ``only``, phi's rationals excepted, as fresh leaves; everything else). phi's
    coefficients stay the net's own tensors (the outer gradient reaches them through every
    forward); the other parameters and the buffers are detached. ``only="backbone."``: the
    official inner step, which leaves the classifier alone."""
    phi = phi_names(net)
    trainable = {k: p.detach().clone().requires_grad_(True) for k, p in net.named_parameters()
                 if p.requires_grad and k.startswith(only) and k not in phi}
    fixed = {k: (p if k in phi else p.detach()) for k, p in net.named_parameters() if k not in trainable}
    fixed.update({k: b.detach() for k, b in net.named_buffers()})
    return trainable, fixed


class LossModule(nn.Module):
    """``loss_fn`` (a ``PhaseContext.loss``, which runs ``net``) as a module holding ``net``, so
    that ``functional_call`` can run it with some of ``net``'s parameters replaced."""

    def __init__(self, net: nn.Module, loss_fn):
        super().__init__()
        self.net, self.loss_fn = net, loss_fn

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.loss_fn(batch)[0]


def method_inner_loss(net: nn.Module, loss_fn):
    """``inner(params, x, y) -> scalar``: the phase's full training loss ``loss_fn`` of the batch
    ``(x [B, C, H, W] normalised, y [B])`` with ``net``'s parameters ``params`` (names as in
    ``net``) in place of its own; the teacher's outputs computed on ``x`` (``view`` None)."""
    holder = LossModule(net, loss_fn)

    def inner(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        batch = Batch(x, y, torch.arange(len(y), device=y.device), None)
        return functional_call(holder, {f"net.{k}": v for k, v in params.items()}, (batch,))
    return inner


def phi_step(loss: torch.Tensor, params: list[nn.Parameter], opt: torch.optim.Optimizer, clip: float) -> bool:
    """One step of phi's optimizer on ``loss`` (gradient norm clipped at ``clip``); False, and
    no update, when the loss or a gradient is not finite (a young network's eval-mode forward can
    overflow, docs/methods/cim.md)."""
    grads = [torch.zeros_like(p) if g is None else g
             for p, g in zip(params, torch.autograd.grad(loss, params, allow_unused=True))]
    if not (torch.isfinite(loss) and all(bool(torch.isfinite(g).all()) for g in grads)):
        return False
    for p, g in zip(params, grads):
        p.grad = g
    torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()
    return True


class MetaBatches:
    """CIM's meta-batches as the official ``trainval_loader`` gives them (``models/foster.py:66-68``,
    ``:159-161, 188-189`` and ``:246-248, 279-280``; DER ``models/der.py:51-53``): the phase's
    training set ``(x uint8 [N, C, H, W], y [N])`` (its new-class images and the stored,
    compressed exemplars, mixed), shuffled by ``gen`` and read in consecutive batches of ``bs``
    (the last one of a pass smaller; a pass used up starts another, where the official iterator,
    made anew every epoch, would stop), each augmented by ``augment(x, gen) -> normalised`` (the
    run's training augmentation, the official ``mode='train'``). One object per epoch, as the
    official ``iter(trainval_loader)``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, bs: int, gen: torch.Generator, augment):
        self.x, self.y, self.bs, self.gen, self.augment = x, y, bs, gen, augment
        self.order: torch.Tensor | None = None
        self.pos = 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised ``[b, C, S, S]``, labels ``[b]``) of the next batch."""
        if self.order is None or self.pos >= len(self.y):
            self.order = torch.randperm(len(self.y), generator=self.gen, device=self.gen.device).to(self.y.device)
            self.pos = 0
        idx = self.order[self.pos:self.pos + self.bs]
        self.pos += len(idx)
        return self.augment(self.x[idx], self.gen), self.y[idx]


def meta_batch(batches: MetaBatches) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One CIM step's data, two consecutive batches as the official step reads them: ``(x, y)``,
    which the step compresses softly and takes its inner step on, then ``(val_x, val_y)``, the
    real images of the outer loss."""
    return (*batches.next(), *batches.next())


# ---------------------------------------------------------------- the CIM model
# A rational (Pade) activation, version A of Molina et al. (ICLR 2020), the form the official CIM
# code uses through the rational-activations package (degrees 5 / 4, "safe" denominator), with its
# coefficients initialised to that package's fit of ReLU on [-3, 3] (rationals_config.json, key
# Rational_version_A5/4, relu).
RATIONAL_RELU_P = (0.029963801610813613, 0.6168978366891341, 2.37534759733888, 3.0659900472408443,
                   1.5246831881677423, 0.2528070864040542)
RATIONAL_RELU_Q = (-1.191550121923625, 4.4080487697236626, 0.9110357113686055, 0.34884977946384615)


class Rational(nn.Module):
    """``f(x) = (a_0 + a_1 x + ... + a_5 x^5) / (1 + |b_1 x| + |b_2 x^2| + |b_3 x^3| + |b_4 x^4|)``,
    one set of coefficients for all channels, learnable; initially close to ReLU on [-3, 3].
    Trained by CIM's own step only (``trained_by_component``: the training loop leaves it out).

    ``relu_outside``: installed in a CIL backbone (``install_rationals``) the module is a ReLU
    except inside ``CIMModel.active()``, the official network's two activations in one slot
    (``convs/resnet.py``: ``forward(..., activation='relu')`` by default, ``'ratl'`` for the CIM
    forward only). A lone ``Rational()`` is the rational everywhere."""
    trained_by_component = True

    def __init__(self, relu_outside: bool = False):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(RATIONAL_RELU_P))
        self.q = nn.Parameter(torch.tensor(RATIONAL_RELU_Q))
        self.relu_outside = relu_outside
        self.active = False           # set by CIMModel.active() for the CIM forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.relu_outside and not self.active:
            return F.relu(x)
        return self.rational(x)

    def rational(self, x: torch.Tensor) -> torch.Tensor:
        """The same function in two evaluations, so that large inputs do not overflow (x^5 does in
        float32 above ~4e7, which deep activations of a young extractor reach): for |x| <= 1 as
        written; for |x| > 1 numerator and denominator divided by x^5 (t = 1/x, |t| < 1):
        ``(a_0 t^5 + a_1 t^4 + ... + a_5) / (t (t^4 + |b_1| |t|^3 + |b_2| t^2 + |b_3| |t| + |b_4|))``.
        Horner steps as fused multiply-adds (the activation runs at every layer of phi: this form
        is ~1.8x faster on a CPU than the term-by-term one, same values to float rounding). Large
        tensors go through in pieces of ``CHUNK`` elements: each of the ~25 elementwise steps
        allocates its result, and small allocations are reused by the C allocator where large ones
        are fresh pages every time (measured on a CPU: 4x faster evaluation at 500 x 64 x 28 x 28,
        ~1.3x a training step)."""
        xw = at_least_float32(x)
        if xw.numel() > self.CHUNK:
            flat = xw.reshape(-1)
            return torch.cat([self._values(c) for c in flat.split(self.CHUNK)]).view(xw.shape)
        return self._values(xw)

    CHUNK = 1 << 17

    def _values(self, xw: torch.Tensor) -> torch.Tensor:
        p, qa = self.p.to(xw.dtype), self.q.to(xw.dtype).abs()
        small = xw.abs() <= 1
        one = torch.ones_like(xw)
        u = torch.where(small, xw, 0 * one)                  # |x| <= 1 lanes: x; others 0
        t = torch.where(small, one, xw).reciprocal()         # |x| > 1 lanes: 1 / x; others 1 (finite both ways)
        au, at = u.abs(), t.abs()
        num_s, num_l = p[5], p[0]
        for k in range(4, -1, -1):
            num_s = torch.addcmul(p[k], num_s, u)            # a_0 + a_1 u + ... + a_5 u^5
            num_l = torch.addcmul(p[5 - k], num_l, t)        # a_5 + a_4 t + ... + a_0 t^5
        den_s, den_l = qa[3], at + qa[0]
        for k in (2, 1, 0):
            den_s = torch.addcmul(qa[k], den_s, au)          # |b_1| + |b_2| |u| + |b_3| u^2 + |b_4| |u|^3
        for k in (1, 2, 3):
            den_l = torch.addcmul(qa[k], den_l, at)          # t^4 + |b_1| |t|^3 + ... + |b_4|
        return torch.where(small, num_s / (den_s * au + 1), num_l / (den_l * t))


def _relus(module: nn.Module) -> list[tuple[nn.Module, str]]:
    """(parent, attribute name) of every ``nn.ReLU`` inside ``module``, in module order."""
    return [(parent, name) for parent in module.modules() for name, child in parent.named_children()
            if isinstance(child, nn.ReLU)]


def install_rationals(module: nn.Module) -> nn.Module:
    """Every ``nn.ReLU`` inside ``module`` replaced by a new ``Rational(relu_outside=True)`` (in
    place: a ReLU still, the rational inside ``CIMModel.active()``); returns it."""
    dev = next((p.device for p in module.parameters()), None)
    for parent, name in _relus(module):
        r = Rational(relu_outside=True)
        setattr(parent, name, r.to(dev) if dev is not None else r)
    return module


def phi_names(net: nn.Module) -> set[str]:
    """Names of the net's parameters that belong to its rationals (phi)."""
    return {f"{m}.{p}" if m else p for m, mod in net.named_modules() if isinstance(mod, Rational)
            for p, _ in mod.named_parameters()}


class CIMModel:
    """The mask model phi as the official code builds it (``convs/resnet.py:44-63, 100-125``;
    ``utils/inc_net.py`` ``FOSTERNet.forward(x, params=None, activation='relu')``): the CIL
    network with a second activation in every ReLU slot of its backbone (the stem's, and both of
    each residual block). The CIL model's own forward (training, the CIM inner step and its
    validation, evaluation) runs the ReLUs; the CIM forward (``active()``: the masks and the CIM
    model's logits, official ``activation='ratl'``) runs learnable ``Rational``s in their place
    through the **same** convolutions, BatchNorm layers (their running statistics are the ReLU
    network's) and head. phi is the rationals' coefficients: the training loop leaves them out
    (``trained_by_component``) and only the CIM step trains them, those of the extractors the CIL
    training trains (``trained``: a frozen extractor's stay as they are). An expandable backbone
    gets rationals in each new extractor, started from the previous extractor's (``inherit``). The CAM ``class_vector . maps`` of the CIM forward's last stage gives the masks,
    its logits the CIM model's CE."""

    def __init__(self):
        self.net: nn.Module | None = None
        self.fallbacks = 0          # images whose CAM was not finite (boxed as the whole image)

    def ensure(self, net: nn.Module) -> "CIMModel":
        """Rationals in place of every ReLU of ``net``'s backbone, now and in the extractors an
        expandable backbone adds later (idempotent)."""
        bb = net.backbone
        install_rationals(bb)
        if hasattr(bb, "builder") and not getattr(bb.builder, "with_rationals", False):
            builder = bb.builder

            def with_rationals():
                return install_rationals(builder())
            with_rationals.with_rationals = True
            bb.builder = with_rationals
        self.net = net
        return self

    @property
    def acts(self) -> list[nn.Module]:
        return [m for m in self.net.backbone.modules() if isinstance(m, Rational)] if self.net is not None else []

    def trained(self) -> list[nn.Module]:
        """The rationals phi trains: those of the extractors the CIL training trains. An expandable
        backbone's frozen extractors keep theirs (official ``models/foster.py:51-54``,
        ``models/der.py:38-41``: the loop meant to spare the rationals starts with the extractor
        itself, whose ``parameters()`` are all of its own, rationals included, so they are frozen
        with it and left out of phi's optimizer, ``models/foster.py:98``)."""
        bb = self.net.backbone if self.net is not None else None
        if bb is None:
            return []
        if hasattr(bb, "extractors"):
            return [m for e in list(bb.extractors)[int(bb.num_frozen):] for m in e.modules() if isinstance(m, Rational)]
        return self.acts

    def parameters(self) -> list[nn.Parameter]:
        """phi's trained coefficients (``trained``)."""
        return [p for a in self.trained() for p in a.parameters()]

    def inherit(self) -> None:
        """A phase's new extractor starts with the coefficients of the extractor before it, as the
        official code copies the whole previous extractor, rationals included, into the new one
        (``utils/inc_net.py:420`` FOSTER, ``:302`` DER). For FOSTER that one is the old model's
        extractor, whose copy is also the compressed student's extractor (``models/foster.py:309``)
        and the next phase's network (``:43-44``): phi's coefficients that carry over to the next
        phase are the old extractor's, the new extractor's trained copy goes with the boosted
        network. No-op for a single extractor."""
        bb = self.net.backbone
        if len(getattr(bb, "extractors", ())) < 2:
            return
        src, dst = ([m for m in e.modules() if isinstance(m, Rational)] for e in list(bb.extractors)[-2:])
        with torch.no_grad():
            for a, b in zip(src, dst):
                b.p.copy_(a.p)
                b.q.copy_(a.q)

    def train_phi(self) -> list[nn.Parameter]:
        """phi's trained coefficients with their gradient on, for CIM steps (``freeze_phi`` turns
        it off)."""
        return [p.requires_grad_(True) for p in self.parameters()]

    def freeze_phi(self) -> None:
        """Every rational's coefficients without gradient between CIM steps (the CIL training
        neither runs nor trains them)."""
        for a in self.acts:
            for p in a.parameters():
                p.requires_grad_(False)

    @contextlib.contextmanager
    def active(self):
        """The block runs the net with phi's rationals in place of its ReLUs (the CIM forward)."""
        acts = self.acts
        for a in acts:
            a.active = True
        try:
            yield
        finally:
            for a in acts:
                a.active = False

    def cam_and_logits(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(soft masks ``[B, H, W]`` in [0, 1], CIM logits ``[B, K]``, the same CAM at feature
        resolution ``[B, h, w]``) of normalised ``x`` for the labels ``y`` by the CIM forward;
        differentiable in phi (the head's parameters are constants here)."""
        with self.active():
            maps = net(x).maps[-1]                                            # [B, D, h, w]
        head = {k: v.detach() for k, v in net.head.named_parameters()}       # no gradient into the CIL head
        logits = functional_call(net.head, head, (maps.mean((2, 3)),))
        v = class_vectors(net.head)[y].detach()
        return cam(maps, v, tuple(x.shape[-2:])), logits, cam(maps, v, tuple(maps.shape[-2:]))

    @torch.no_grad()
    def masks(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """The CAM ``[B, *size]`` (default: ``x``'s size) of classes ``y`` on normalised ``x`` by the
        CIM forward (for the boxes)."""
        with self.active():
            maps = net(x).maps[-1]
        self.fallbacks += int((~torch.isfinite(maps.flatten(1)).all(1)).sum())
        return cam(maps, class_vectors(net.head)[y], size or tuple(x.shape[-2:]))


def cim_outer_loss(net: nn.Module, cim: CIMModel, trainable: dict[str, torch.Tensor], fixed: dict[str, torch.Tensor],
                   x: torch.Tensor, y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor, s: int, inner_lr: float,
                   mu: float, mu_cls: float, mode: str = "nearest", inner_loss=None) -> tuple[torch.Tensor, dict[str, float]]:
    """The CIM bilevel objective (paper Sec. 4) for one outer step, a scalar differentiable in phi,
    as the official step (``models/foster.py:160-194``, ``:247-285``):

    * every image of the batch ``(x, y)`` (new-class images and exemplars alike) softly compressed
      by its CIM mask ``c`` (the CAM of its label under the CIM forward);
    * inner: one SGD step of the CIL parameters ``trainable`` (``fixed``: the others and the
      buffers) on ``inner_loss(params, x, y)`` of the compressed batch (default: CE of the net's
      logits; the per-epoch meta-iterations: the method's full training loss,
      ``method_inner_loss``): ``theta' = theta - inner_lr * grad`` (the graph kept back to phi);
    * outer: CE of ``theta'`` on the next batch ``(val_x, val_y)`` of real images + ``mu *
      mean(c_f^2)``, the memory regulariser on the normalised CAM at feature resolution ``c_f`` (the
      official ``MSE(CAM, 0)``: a larger mask costs memory) + ``mu_cls * CE`` of the CIM model's
      logits on ``(x, y)``.
    All images normalised ``[B, C, H, W]``."""
    c, cim_logits, c_feat = cim.cam_and_logits(net, x, y)
    soft = soft_compress(x, c, s, mode)
    if inner_loss is None:
        inner = F.cross_entropy(at_least_float32(functional_call(net, {**fixed, **trainable}, (soft,)).logits), y)
    else:
        inner = at_least_float32(inner_loss(trainable, soft, y))
    names = list(trainable)
    grads = torch.autograd.grad(inner, [trainable[k] for k in names], create_graph=True, allow_unused=True)
    updated = {k: trainable[k] if g is None else trainable[k] - inner_lr * g for k, g in zip(names, grads)}
    val = F.cross_entropy(at_least_float32(functional_call(net, {**fixed, **updated}, (val_x,)).logits), val_y)
    reg = (c_feat ** 2).mean()
    ce_cim = F.cross_entropy(at_least_float32(cim_logits), y)
    loss = val + mu * reg + mu_cls * ce_cim
    return loss, {k: float(v.detach()) for k, v in (("val", val), ("reg", reg), ("ce_cim", ce_cim), ("mask", c.mean()))}


def meta_steps(net: nn.Module, phi: CIMModel, n: int, batches, opt: torch.optim.Optimizer, clip: float, s: int,
               inner_lr: float, mu: float, mu_cls: float, mode: str = "nearest", inner_loss=None,
               only: str = "") -> tuple[int, dict[str, float] | None, dict[str, float] | None]:
    """``n`` outer steps of the CIM bilevel objective on phi (``cim_outer_loss`` on ``batches()``,
    a fresh ``meta_batch`` each; ``phi_step`` with ``opt``, gradient norm clipped at ``clip``),
    the CIL model's parameters whose names start with ``only`` as the inner step's. The caller
    sets the network's BatchNorm mode. Returns (steps skipped as not finite, the first step's
    terms, the last's; each with its ``loss``)."""
    params = phi.train_phi()
    trainable, fixed = cil_split(net, only)
    skipped, first, last = 0, None, None
    try:
        for _ in range(n):
            loss, terms = cim_outer_loss(net, phi, trainable, fixed, *batches(), s, inner_lr, mu, mu_cls, mode,
                                         inner_loss=inner_loss)
            skipped += not phi_step(loss, params, opt, clip)
            last = {**terms, "loss": float(loss.detach())}
            first = first or last
    finally:
        phi.freeze_phi()
    return skipped, first, last
