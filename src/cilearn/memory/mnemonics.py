"""Exemplar optimizers (registry ``MEMORY_OPTIMIZERS``, ``--memory.optimizer``): after the
selection rule has picked a phase's exemplars, an optimizer may change their pixels.

* ``none``: the selected images are stored as they are.
* ``mnemonics``: Mnemonics Training as the paper describes it (Liu et al., "Mnemonics Training:
  Multi-Class Incremental Learning without Forgetting", CVPR 2020, Sec. 4), a bilevel problem
  solved per phase with the model of the phase fixed:

  - new classes (Sec. 4, the exemplar-level problem): the exemplars E of the new classes become float
    pixel parameters, initialised by the selection rule (herding). One iteration copies the model
    (parameters theta), fine-tunes the copy on E for K differentiable SGD steps
    ``theta_k = theta_{k-1} - lambda grad CE(theta_{k-1}; E)`` (unrolled, the graph kept), measures
    the CE of the adapted copy theta_K on a batch of the new classes' training data D, and takes a
    step on the pixels along ``-grad_E CE(theta_K(E); D)`` (``step: sgd``: the paper's plain
    ``E <- E - beta grad``; default ``adam``, see the README for why).
  - old classes (Sec. 4, adjusting the old exemplars): D of the old classes is gone, so their
    exemplars are split into two halves A and B (alternate positions within each class, so both
    halves span the selection order); A is optimised with B as the validation data and B with A,
    by the same bilevel step, each validated on the other half as it was when the adjustment
    began. Only old-class exemplars change in this step.

* ``mnemonics-single``: the single-level form of the released code (cheaper; not the paper's
  form): the model is frozen, each training image of the new classes is classified by the
  cosine similarity of its embedding to the normalised class means of the exemplars' embeddings,
  and that CE is backpropagated to the exemplars' pixels, one epoch over the new classes' data at
  lr 1e-5 (the released code's settings).

The pixels are optimised in the network's normalised input space and clamped to the image of
[0, 255] there; the result is stored as float32 pixels in [0, 255] (the paper keeps the
exemplars as float parameters; ``memory.mnemonics.quantize``: rounded back to uint8 instead, so
the bytes equal the unoptimised memory's). The number of exemplars per class never changes; the
bytes reported in ``metrics.json`` are the bytes actually stored (float32: 4 per pixel).

The network runs in eval mode throughout (BatchNorm with its running statistics, so an
exemplar's gradient does not pass through batch statistics) and in fp32.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch.func import functional_call

from ..errors import ConfigError
from ..registry import Registry

if TYPE_CHECKING:
    from ..config import RunConfig
    from . import Memory

MEMORY_OPTIMIZERS: Registry = Registry("memory optimizer")

Params = dict[str, torch.Tensor]


@dataclass(frozen=True)
class MnemonicsSettings:
    """Resolved options (``memory.mnemonics.*``; None there means the form's default below)."""
    iterations: int | None   # outer steps per phase (single: None -> one epoch over the new data)
    inner_steps: int         # K
    inner_lr: float          # lambda
    lr: float                # beta, on normalised pixels
    batch_size: int          # new-class images per outer step
    step: str                # pixel update: sgd (the paper's plain gradient step) | adam
    adjust_old: bool         # split-halves adjustment of the old classes' exemplars (bilevel only)
    quantize: bool           # store rounded uint8 instead of float32


# ---------------------------------------------------------------- pure functions
def model_state(net: torch.nn.Module) -> tuple[Params, Params]:
    """Detached copies of ``net``'s parameters (requiring grad: the inner steps differentiate
    with respect to them) and its buffers: the temporary model of the bilevel step."""
    params = {k: p.detach().clone().requires_grad_(True) for k, p in net.named_parameters()}
    buffers = {k: b.detach() for k, b in net.named_buffers()}
    return params, buffers


def logits_of(net: torch.nn.Module, params: Params, buffers: Params, x: torch.Tensor) -> torch.Tensor:
    """``[B, K]`` logits of ``net`` with the given parameters, on normalised ``x [B, C, H, W]``."""
    return functional_call(net, (params, buffers), (x,)).logits


def unrolled_finetune(net: torch.nn.Module, params: Params, buffers: Params, x: torch.Tensor,
                      y: torch.Tensor, steps: int, lr: float) -> Params:
    """``steps`` plain SGD steps of CE on ``(x [B, C, H, W], y [B])`` from ``params``, each a
    differentiable function of the previous parameters and of ``x`` (``create_graph``): the
    returned parameters carry the graph back to ``x`` through every step."""
    names = list(params)
    for _ in range(steps):
        loss = F.cross_entropy(logits_of(net, params, buffers, x), y)
        grads = torch.autograd.grad(loss, [params[k] for k in names], create_graph=True, allow_unused=True)
        params = {k: params[k] if g is None else params[k] - lr * g for k, g in zip(names, grads)}
    return params


def bilevel_loss(net: torch.nn.Module, params: Params, buffers: Params, ex: torch.Tensor, ex_y: torch.Tensor,
                 val_x: torch.Tensor, val_y: torch.Tensor, steps: int, lr: float) -> torch.Tensor:
    """The exemplar-level objective (Mnemonics Sec. 4): CE on the validation data
    ``(val_x [V, C, H, W], val_y [V])`` of the model fine-tuned for ``steps`` SGD steps on the
    exemplars ``(ex [E, C, H, W], ex_y [E])``; a scalar, differentiable in ``ex``."""
    adapted = unrolled_finetune(net, params, buffers, ex, ex_y, steps, lr)
    return F.cross_entropy(logits_of(net, adapted, buffers, val_x), val_y)


def split_halves(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of halves A and B of exemplars with labels ``y [E]`` (grouped by class in selection
    order): alternate positions within each class, so both halves span the selection order.
    A class with one exemplar puts it in A."""
    a, b = [], []
    for c in y.unique(sorted=True):
        idx = (y == c).nonzero().flatten()
        a.append(idx[0::2])
        b.append(idx[1::2])
    return torch.cat(a), torch.cat(b)


def single_level_loss(net: torch.nn.Module, ex: torch.Tensor, ex_y: torch.Tensor, x: torch.Tensor,
                      y: torch.Tensor, classes: range) -> torch.Tensor:
    """The released code's single-level objective: CE of the cosine similarities ``[B, n]`` of
    the embeddings of ``x [B, C, H, W]`` to the normalised class means of the exemplars'
    normalised embeddings, over the ``classes`` (``y``, ``ex_y`` in ``classes``)."""
    f_ex = F.normalize(net(ex).embedding, dim=1)                                        # [E, D]
    onehot = F.one_hot(ex_y - classes.start, len(classes)).to(f_ex.dtype)              # [E, n]
    means = F.normalize(onehot.t() @ f_ex / onehot.sum(0, keepdim=True).t(), dim=1)    # [n, D]
    cos = F.normalize(net(x).embedding, dim=1) @ means.t()                              # [B, n]
    return F.cross_entropy(cos, y - classes.start)


# ---------------------------------------------------------------- pixel space
class PixelSpace:
    """The normalisation of the network input (per-channel affine ``z = x * s + t`` of pixels
    ``x`` in [0, 255]): to normalised values, back, and their valid range ``[lo, hi]``."""

    def __init__(self, normalize: Callable[[torch.Tensor], torch.Tensor], channels: int, device: torch.device):
        self.normalize = normalize
        self.lo = normalize(torch.zeros(1, channels, 1, 1, device=device)).contiguous()          # [1, C, 1, 1]
        self.hi = normalize(torch.full((1, channels, 1, 1), 255.0, device=device)).contiguous()

    def to_pixels(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised ``[N, C, H, W]`` -> float pixels in [0, 255]."""
        return ((z - self.lo) / (self.hi - self.lo) * 255.0).clamp(0.0, 255.0)

    def clamp_(self, z: torch.Tensor) -> None:
        with torch.no_grad():
            torch.maximum(torch.minimum(z, self.hi), self.lo, out=z)


# ---------------------------------------------------------------- the optimizers
class ExemplarOptimizer:
    """``opt(memory, net, normalize, classes, x, y, gen)``: change the stored exemplars in place
    after the selection rule has picked those of ``classes`` from the phase's training images
    ``(x uint8 [N, C, H, W], y [N])``; ``normalize``: pixels -> network input. Returns the
    exemplars as they were before (``{class: [n, C, H, W]}``, for ``--save-tsne``), or None when
    nothing changed."""

    def __call__(self, memory: "Memory", net: torch.nn.Module, normalize, classes: range, x: torch.Tensor,
                 y: torch.Tensor, gen: torch.Generator) -> dict[int, torch.Tensor] | None:
        return None


MEMORY_OPTIMIZERS.register("none")(ExemplarOptimizer)


class _PixelOptimizer(ExemplarOptimizer):
    def __init__(self, s: MnemonicsSettings):
        self.s = s
        self.stats: dict[str, float] = {}     # the last phase's objective and pixel change (metrics.json)

    def __call__(self, memory, net, normalize, classes, x, y, gen):
        before = {c: v.clone() for c, v in memory.exemplars.items()}
        was = net.training
        net.eval()
        t0 = time.perf_counter()
        self.stats = {}
        try:
            with torch.enable_grad():
                self.optimize(memory, net, normalize, classes, x, y, gen)
        finally:
            net.train(was)
        for part, ids in (("new", [c for c in classes if c in before]),
                          ("old", [c for c in before if c < classes.start])):
            if ids:   # mean absolute change of a pixel, in [0, 255] units
                self.stats[f"{part}_pixel_change"] = float(torch.cat(
                    [(memory.exemplars[c].float() - before[c].float()).abs().flatten() for c in ids]).mean())
        self.stats["seconds"] = time.perf_counter() - t0
        return before

    def optimize(self, memory, net, normalize, classes, x, y, gen) -> None:  # pragma: no cover
        raise NotImplementedError

    @staticmethod
    def gather(memory: "Memory", ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The exemplars of classes ``ids`` as float pixels ``[E, C, H, W]`` and labels ``[E]``."""
        xs = [memory.exemplars[c].float() for c in ids]
        ys = [torch.full((len(v),), c, dtype=torch.long, device=v.device) for c, v in zip(ids, xs)]
        return torch.cat(xs), torch.cat(ys)

    def store(self, memory: "Memory", pixels: torch.Tensor, labels: torch.Tensor) -> None:
        """Write optimised float pixels back, per class, in the same (selection) order."""
        pixels = pixels.detach().round().to(torch.uint8) if self.s.quantize else pixels.detach().float()
        for c in labels.unique().tolist():
            memory.exemplars[c] = pixels[labels == c].clone()

    def pixel_optimizer(self, z: list[torch.Tensor]) -> torch.optim.Optimizer:
        """The pixel update: ``sgd``, plain gradient descent ``z <- z - beta g`` (as the paper writes the exemplar update),
        or ``adam`` (``memory.mnemonics.step``)."""
        if self.s.step == "sgd":
            return torch.optim.SGD(z, lr=self.s.lr)
        return torch.optim.Adam(z, lr=self.s.lr)

    def descend(self, opt: torch.optim.Optimizer, z: torch.Tensor, loss: torch.Tensor, space: "PixelSpace") -> None:
        """One pixel step on ``z`` (a leaf) from ``loss``, then the clamp to the valid range."""
        (z.grad,) = torch.autograd.grad(loss, z)
        opt.step()
        space.clamp_(z)

    def batches(self, n: int, gen: torch.Generator, device: torch.device):
        """Endless seeded random batches of indices into the ``n`` new-class images."""
        bs = min(self.s.batch_size, n)
        while True:
            perm = torch.randperm(n, generator=gen).to(device)
            for i in range(0, n - bs + 1, bs):
                yield perm[i:i + bs]

    def leaf(self, normalize, pixels: torch.Tensor) -> torch.Tensor:
        return normalize(pixels).contiguous().clone().requires_grad_(True)       # [E, C, H, W]

    def fit_new(self, memory, normalize, classes, x, y, gen, space: "PixelSpace", steps: int,
                objective: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        """``steps`` pixel steps on the new classes' exemplars ``z``, each on
        ``objective(z, z labels, normalised batch of the new data, its labels)``, then stored;
        ``stats``: the objective on the first batch before and after."""
        ex, ex_y = self.gather(memory, [c for c in classes if c in memory.exemplars])
        z = self.leaf(normalize, ex)
        opt = self.pixel_optimizer([z])
        batches = self.batches(len(x), gen, x.device)
        first = None
        for _ in range(steps):
            idx = next(batches)
            first = idx if first is None else first
            loss = objective(z, ex_y, normalize(x[idx]), y[idx])
            self.stats.setdefault("new_objective_before", float(loss.detach()))
            self.descend(opt, z, loss, space)
        if first is not None:
            self.stats["new_objective_after"] = float(objective(z, ex_y, normalize(x[first]), y[first]).detach())
        self.store(memory, space.to_pixels(z), ex_y)


@MEMORY_OPTIMIZERS.register("mnemonics")
class Mnemonics(_PixelOptimizer):
    """The paper's bilevel form (module docstring), ``iterations`` pixel steps for the new
    classes' exemplars, then ``iterations`` steps of each half of the old classes' exemplars.
    ``stats``: the objective before and after on the same data (new: the first batch; old: the
    sum over both halves)."""

    def optimize(self, memory, net, normalize, classes, x, y, gen):
        s = self.s
        if s.iterations == 0 or s.inner_steps == 0:
            return
        space = PixelSpace(normalize, x.shape[1], x.device)
        params, buffers = model_state(net)

        def objective(z, z_y, vx, vy):
            return bilevel_loss(net, params, buffers, z, z_y, vx, vy, s.inner_steps, s.inner_lr)

        # new classes (Sec. 4): validated on a batch of their training data D per step
        self.fit_new(memory, normalize, classes, x, y, gen, space, s.iterations, objective)

        # old classes (Sec. 4): halves A and B, each the validation data of the other
        old_ids = sorted(c for c in memory.exemplars if c < classes.start)
        if not (s.adjust_old and old_ids):
            return
        ex, ex_y = self.gather(memory, old_ids)
        ia, ib = split_halves(ex_y)
        if len(ib) == 0:
            return
        za, zb = self.leaf(normalize, ex[ia]), self.leaf(normalize, ex[ib])
        opt_a, opt_b = self.pixel_optimizer([za]), self.pixel_optimizer([zb])
        # each half is validated on the other as it was before this adjustment: validating on the
        # moving other half makes both objectives rise (measured on digits: 0.24 -> 0.40)
        va, vb = za.detach().clone(), zb.detach().clone()

        def both() -> float:
            return float(objective(za, ex_y[ia], vb, ex_y[ib]).detach() + objective(zb, ex_y[ib], va, ex_y[ia]).detach())

        self.stats["old_objective_before"] = both()
        for _ in range(s.iterations):
            self.descend(opt_a, za, objective(za, ex_y[ia], vb, ex_y[ib]), space)
            self.descend(opt_b, zb, objective(zb, ex_y[ib], va, ex_y[ia]), space)
        self.stats["old_objective_after"] = both()
        z = za.detach().new_empty((len(ex_y),) + tuple(za.shape[1:]))   # [E, C, H, W]
        z[ia], z[ib] = za.detach(), zb.detach()
        self.store(memory, space.to_pixels(z), ex_y)


@MEMORY_OPTIMIZERS.register("mnemonics-single")
class MnemonicsSingle(_PixelOptimizer):
    """The released code's single-level form (module docstring): frozen model, cosine-to-class-
    mean CE on the new classes' data, pixel steps on the new classes' exemplars; old exemplars
    are not adjusted."""

    def optimize(self, memory, net, normalize, classes, x, y, gen):
        s = self.s
        space = PixelSpace(normalize, x.shape[1], x.device)
        frozen = [p for p in net.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        try:
            steps = s.iterations if s.iterations is not None else math.ceil(len(x) / min(s.batch_size, len(x)))
            self.fit_new(memory, normalize, classes, x, y, gen, space, steps,
                         lambda z, z_y, vx, vy: single_level_loss(net, z, z_y, vx, vy, classes))
        finally:
            for p in frozen:
                p.requires_grad_(True)


# ---------------------------------------------------------------- configuration
# Defaults per form. Bilevel: the paper's experimental values could not be read here (no access to the
# full text); these are cilearn's, chosen on Fashion-MNIST (benchmarks/RESULTS.md) and stated in
# the README. Single-level: the released code's (one epoch over the new data, lr 1e-5).
DEFAULTS = {
    "mnemonics": {"iterations": 20, "lr": 0.01, "step": "adam"},
    "mnemonics-single": {"iterations": None, "lr": 1e-5, "step": "sgd"},
}


def settings(cfg: "RunConfig") -> MnemonicsSettings | None:
    """The resolved settings of ``cfg.memory.optimizer`` (None for ``none``)."""
    name, m = cfg.memory.optimizer, cfg.memory.mnemonics
    if name in (None, "none"):
        return None
    d = DEFAULTS[name]
    return MnemonicsSettings(iterations=d["iterations"] if m.iterations is None else m.iterations,
                             inner_steps=m.inner_steps, inner_lr=m.inner_lr,
                             lr=d["lr"] if m.lr is None else m.lr, batch_size=m.batch_size,
                             step=d["step"] if m.step is None else m.step,
                             adjust_old=m.adjust_old, quantize=m.quantize)


def build(cfg: "RunConfig") -> ExemplarOptimizer:
    s = settings(cfg)
    return ExemplarOptimizer() if s is None else MEMORY_OPTIMIZERS.get(cfg.memory.optimizer)(s)


def check(cfg: "RunConfig", method: str, has_memory: bool) -> None:
    """Config checks, before anything is written: the name, the pixel update, and that the method
    keeps exemplars to optimise (the numbers: ``config.validate``)."""
    name = cfg.memory.optimizer
    if name not in MEMORY_OPTIMIZERS:
        raise ConfigError(f"--memory.optimizer must be one of {', '.join(MEMORY_OPTIMIZERS.names())}, got '{name}'")
    m = cfg.memory.mnemonics
    if m.step not in (None, "sgd", "adam"):
        raise ConfigError(f"--memory.mnemonics.step must be sgd or adam, got '{m.step}'")
    if name != "none" and not has_memory:
        raise ConfigError(f"--memory.optimizer {name} optimises exemplars and --method {method} keeps none here: "
                          "give --memory N or --memory-per-class N, or use a method with exemplars")
