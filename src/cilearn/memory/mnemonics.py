"""Exemplar optimizers (kind ``exemplar-optimizer`` of ``cilearn.components``,
``--memory.optimizer``): after the selection rule has picked a phase's exemplars, an optimizer may
change their pixels.

* ``none`` (no component): the selected images are stored as they are.
* ``mnemonics``: Mnemonics Training's bilevel form (Liu et al., "Mnemonics Training: Multi-Class
  Incremental Learning without Forgetting", CVPR 2020, Sec. 4) as the authors' first release
  computes it (``trainer/mnemonics_train.py`` of the forks of yaoyao-liu/mnemonics; file and line
  of every value in docs/methods/mnemonics.md). Per phase, with the phase's model fixed:

  - the new classes' exemplars E (herding's choice) become pixel parameters (normalised input
    space). They are split into ``steps`` step-sets, set k holding the exemplars at positions k,
    k + S, k + 2S, ... of each class (S = the number of sets; one image per class and set when a
    class has ``steps`` exemplars, as the release);
  - inner problem: the **classifier (head) only** is adapted, from the model's head, by
    ``inner_epochs x S`` unrolled SGD steps, step j on set ``j mod S`` with its own learnable
    learning rate ``lr_j`` (initial ``inner_lr``), on the embeddings of E under the fixed backbone:
    ``W_j = W_{j-1} - lr_j grad_W CE(head(W_{j-1}; f(E_k)), y_k)`` (graph kept);
  - outer problem: CE of the adapted head on a batch of **all seen classes' data** (the phase's
    new-class images and the old classes' exemplars, the release's training loader), minimised
    over E's pixels and the learning rates by Adam (lr 1e-6, betas (0.5, 0.999)), ``epochs``
    passes over that data;
  - old classes (the paper's Sec. 4, not in the release): their exemplars are split into halves A
    and B (alternate positions), A optimised with B as the validation data and B with A, by the
    same bilevel step, each validated on the other half as it was before the adjustment.

* ``mnemonics-single``: the single-level form of the authors' current release
  (``mnemonics-training/1_train/trainer/mnemonics.py`` of yaoyao-liu/class-incremental-learning):
  frozen model; each image of all seen classes' data (new-class images and old exemplars) is
  classified by the cosine of its embedding to the normalised class means (old classes: of their
  stored exemplars, fixed; new classes: of the exemplars being optimised), CE, one epoch of SGD
  (momentum 0.9, weight decay 5e-4) on the new exemplars' pixels; old exemplars are not changed.

Storage: the optimised pixels are rounded (not truncated, which the releases do) to uint8 and
stored as images, so an optimised memory costs the bytes of the same exemplars unoptimised. The
network runs in eval mode throughout (BatchNorm with its running statistics) and in fp32. Per
phase, ``stats`` (``metrics.json``: ``exemplar_pixel_change``, ``exemplar_stored_pixel_change``,
``exemplar_optimizer_seconds`` and the ``exemplar_optimizer`` entry) hold the mean absolute change
of the exemplars' pixels in grey levels over the optimisation, of the float pixels the optimizer
moved and of the stored images after rounding (at the releases' step sizes the first is a
fraction of a grey level and the second 0), and the seconds spent.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch.func import functional_call

from ..components import Component, option, register
from ..errors import ConfigError

if TYPE_CHECKING:
    from . import Memory

Params = dict[str, torch.Tensor]


def _check_pixel_options(o) -> None:
    if o.epochs < 0 or (o.iterations is not None and o.iterations < 0) or not o.lr > 0 or o.batch_size < 1:
        raise ConfigError("--memory.mnemonics: epochs >= 0, iterations >= 0, lr > 0 and batch-size >= 1 are expected, "
                          f"got {o.epochs}, {o.iterations}, {o.lr}, {o.batch_size}")
    if o.step not in ("sgd", "adam"):
        raise ConfigError(f"--memory.mnemonics.step must be sgd or adam, got '{o.step}'")


# Defaults per form, from the authors' releases (docs/methods/mnemonics.md gives file and line):
# bilevel, the first release's main.py: 10 outer epochs, Adam lr 1e-6 (betas 0.5, 0.999 in
# trainer/mnemonics_train.py); single-level, the current release's main.py: one epoch, SGD lr 1e-5
# whose StepLR (step 1, gamma 0.5) is stepped before the epoch, so its steps are taken at 5e-6.
@dataclass(frozen=True)
class BilevelOptions:
    epochs: int = option(10, alias="memory.mnemonics.epochs")          # outer passes over all seen classes' data per phase
    iterations: int | None = option(None, alias="memory.mnemonics.iterations")  # cap on the outer steps per phase
    steps: int = option(20, alias="memory.mnemonics.steps")            # S: step-sets (first release: mnemonics_steps)
    inner_epochs: int = option(5, alias="memory.mnemonics.inner_epochs")   # inner passes over the step-sets
    inner_lr: float = option(0.01, alias="memory.mnemonics.inner_lr")  # initial learnable lr of each inner step
    lr: float = option(1e-6, alias="memory.mnemonics.lr")              # the pixel step, normalised input units
    batch_size: int = option(128, alias="memory.mnemonics.batch_size")  # validation images per outer step
    step: str = option("adam", alias="memory.mnemonics.step")          # adam (betas 0.5, 0.999) | sgd (momentum 0.9, wd 5e-4)
    adjust_old: bool = option(True, alias="memory.mnemonics.adjust_old")  # the paper's split-halves adjustment of old exemplars

    def __post_init__(self):
        _check_pixel_options(self)
        if self.steps < 1 or self.inner_epochs < 0 or not self.inner_lr > 0:
            raise ConfigError("--memory.mnemonics: steps >= 1, inner-epochs >= 0 and inner-lr > 0 are expected, "
                              f"got {self.steps}, {self.inner_epochs}, {self.inner_lr}")


@dataclass(frozen=True)
class SingleLevelOptions:
    epochs: int = option(1, alias="memory.mnemonics.epochs")
    iterations: int | None = option(None, alias="memory.mnemonics.iterations")
    lr: float = option(5e-6, alias="memory.mnemonics.lr")
    batch_size: int = option(128, alias="memory.mnemonics.batch_size")
    step: str = option("sgd", alias="memory.mnemonics.step")

    def __post_init__(self):
        _check_pixel_options(self)


# ---------------------------------------------------------------- pure functions
def step_sets(y: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """Exemplar indices ``[E]`` (labels ``y``, grouped by class in selection order) in
    ``S = min(steps, largest class)`` step-sets: set k holds the positions k, k + S, ... of each
    class, so every exemplar is in exactly one set and consecutive sets start at different
    exemplars (the first release starts every set at the same one: not copied)."""
    pos = torch.zeros_like(y)
    for c in y.unique():
        idx = (y == c).nonzero().flatten()
        pos[idx] = torch.arange(len(idx), device=y.device)
    n = min(steps, int(pos.max()) + 1)
    return [((pos % n) == k).nonzero().flatten() for k in range(n)]


def head_params(head: torch.nn.Module) -> Params:
    """Detached copies of the head's parameters, requiring grad (the inner loop's start)."""
    return {k: p.detach().clone().requires_grad_(True) for k, p in head.named_parameters()}


def head_logits(head: torch.nn.Module, params: Params, emb: torch.Tensor) -> torch.Tensor:
    """``[B, K]`` logits of ``head`` with ``params`` on embeddings ``emb [B, D]``."""
    return functional_call(head, params, (emb,))


def unrolled_head(head: torch.nn.Module, params: Params, emb: torch.Tensor, y: torch.Tensor,
                  sets: list[torch.Tensor], inner_epochs: int, lrs: torch.Tensor) -> Params:
    """The inner loop: ``inner_epochs * len(sets)`` SGD steps of CE on the head, step j on set
    ``j mod len(sets)`` of ``(emb [E, D], y [E])`` with learning rate ``lrs[j]``; every step a
    differentiable function of the previous parameters, of ``emb`` and of ``lrs``."""
    names = list(params)
    j = 0
    for _ in range(inner_epochs):
        for idx in sets:
            loss = F.cross_entropy(head_logits(head, params, emb[idx]), y[idx])
            grads = torch.autograd.grad(loss, [params[k] for k in names], create_graph=True, allow_unused=True)
            params = {k: params[k] if g is None else params[k] - lrs[j] * g for k, g in zip(names, grads)}
            j += 1
    return params


def bilevel_loss(net: torch.nn.Module, params: Params, z: torch.Tensor, z_y: torch.Tensor, val_emb: torch.Tensor,
                 val_y: torch.Tensor, sets: list[torch.Tensor], inner_epochs: int, lrs: torch.Tensor) -> torch.Tensor:
    """The exemplar-level objective: CE on validation embeddings ``(val_emb [V, D], val_y [V])``
    of the head adapted on the exemplars ``(z [E, C, H, W] normalised, z_y [E])``; a scalar,
    differentiable in ``z`` (through the backbone's embedding of it) and in ``lrs``."""
    emb = net(z).embedding                                                     # [E, D]
    adapted = unrolled_head(net.head, params, emb, z_y, sets, inner_epochs, lrs)
    return F.cross_entropy(head_logits(net.head, adapted, val_emb), val_y)


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


def class_means(emb: torch.Tensor, y: torch.Tensor, num: int) -> torch.Tensor:
    """``[num, D]`` normalised means of the normalised embeddings ``emb [E, D]`` per label
    ``y [E]`` in ``0..num-1`` (every label present)."""
    f = F.normalize(emb, dim=1)
    sums = torch.zeros(num, f.shape[1], device=f.device, dtype=f.dtype).index_add(0, y, f)
    return F.normalize(sums, dim=1)


def single_level_loss(net: torch.nn.Module, z: torch.Tensor, z_y: torch.Tensor, old_means: torch.Tensor,
                      x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The current release's objective: CE of the cosine similarities ``[B, K]`` of the
    embeddings of ``x [B, C, H, W]`` (labels ``y`` in ``0..K-1``) to the class means of all seen
    classes: the old ones' ``old_means [K_old, D]`` (fixed) followed by those of the new
    exemplars ``z`` (labels ``z_y`` in ``K_old..K-1``)."""
    k_old = old_means.shape[0]
    new = class_means(net(z).embedding.float(), z_y - k_old, int(z_y.max()) - k_old + 1)   # [K_new, D]
    means = torch.cat([old_means, new])                                                      # [K, D]
    cos = F.normalize(net(x).embedding.float(), dim=1) @ means.t()                           # [B, K]
    return F.cross_entropy(cos, y)


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
class ExemplarOptimizer(Component):
    """``optimize(memory, net, normalize, classes, x, y, gen)``: change the stored exemplars in
    place after the selection rule has picked those of ``classes`` from the phase's training images
    ``(x uint8 [N, C, H, W], y [N])``; ``normalize``: pixels -> network input. Returns the
    exemplars as they were before (``{class: [n, C, H, W]}``, for ``--save-tsne``). ``stats``: the
    last phase's objectives, pixel change and seconds (metrics.json). Refused without exemplars."""
    needs_memory = True

    def __init__(self, options, services):
        super().__init__(options, services)
        self.s = options
        self.stats: dict[str, float] = {}
        self.moved: dict[int, torch.Tensor] = {}

    def __call__(self, memory, net, normalize, classes, x, y, gen):
        before = {c: v.clone() for c, v in memory.exemplars.items()}
        was = net.training
        net.eval()
        t0 = time.perf_counter()
        self.stats = {}
        self.moved = {}                        # class -> |float pixel change| before rounding, by store()
        frozen = [p for p in net.parameters() if p.requires_grad]
        for p in frozen:                       # the model is fixed: gradients go to pixels only
            p.requires_grad_(False)
        try:
            with torch.enable_grad():
                self.optimize(memory, net, normalize, classes, x, y, gen)
        finally:
            for p in frozen:
                p.requires_grad_(True)
            net.train(was)
        targets = [c for c in self.targets(classes, before) if c in before]
        for part, sel in (("new", [c for c in targets if c >= classes.start]),
                          ("old", [c for c in targets if c < classes.start]), ("exemplar", targets)):
            if sel:   # mean absolute change of a pixel over the optimisation, grey levels (0-255):
                      # of the float pixels the optimizer moved, and of the stored (rounded) images
                self.stats[f"{part}_pixel_change"] = float(torch.cat(
                    [self.moved.get(c, torch.zeros(before[c].numel(), device=before[c].device)) for c in sel]).mean())
                self.stats[f"{part}_stored_pixel_change"] = float(torch.cat(
                    [(memory.exemplars[c].float() - before[c].float()).abs().flatten() for c in sel]).mean())
        self.stats["seconds"] = time.perf_counter() - t0
        return before

    def targets(self, classes: range, stored: dict) -> list[int]:
        """The classes whose exemplars this optimizer works on in a phase: the new ones."""
        return list(classes)

    def optimize(self, memory, net, normalize, classes, x, y, gen) -> None:  # pragma: no cover
        raise NotImplementedError

    @staticmethod
    def gather(memory: "Memory", ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The exemplars of classes ``ids`` as float pixels ``[E, C, H, W]`` and labels ``[E]``."""
        xs = [memory.exemplars[c].float() for c in ids]
        ys = [torch.full((len(v),), c, dtype=torch.long, device=v.device) for c, v in zip(ids, xs)]
        return torch.cat(xs), torch.cat(ys)

    def store(self, memory: "Memory", space: "PixelSpace", z: torch.Tensor, start: torch.Tensor,
              labels: torch.Tensor) -> None:
        """Write the optimised exemplars ``z`` (normalised, ``[E, C, H, W]``) back as images,
        rounded to uint8, per class, in the same (selection) order; ``start``: their float pixels
        before the optimisation. Records each class's movement before the rounding (grey levels,
        ``[n * C * H * W]``) for the ``*_pixel_change`` statistics."""
        moved = space.to_pixels(z.detach())                                          # [E, C, H, W] float
        shift = (moved - space.to_pixels(space.normalize(start))).abs()              # same round trip: 0 if unmoved
        pixels = moved.round().clamp(0, 255).to(torch.uint8)
        for c in labels.unique().tolist():
            memory.exemplars[c] = pixels[labels == c].clone()
            self.moved[c] = shift[labels == c].flatten()

    def pixel_optimizer(self, z: list[torch.Tensor]) -> torch.optim.Optimizer:
        """``adam``: the first release's outer optimizer (betas 0.5, 0.999); ``sgd``: the current
        release's (momentum 0.9, weight decay 5e-4)."""
        if self.s.step == "sgd":
            return torch.optim.SGD(z, lr=self.s.lr, momentum=0.9, weight_decay=5e-4)
        return torch.optim.Adam(z, lr=self.s.lr, betas=(0.5, 0.999))

    @staticmethod
    def descend(opt: torch.optim.Optimizer, leaves: list[torch.Tensor], loss: torch.Tensor, space: "PixelSpace") -> None:
        """One step on ``leaves`` (the pixels first) from ``loss``, then the pixels' clamp."""
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        for leaf, g in zip(leaves, grads):
            leaf.grad = torch.zeros_like(leaf) if g is None else g
        opt.step()
        space.clamp_(leaves[0])

    def outer_batches(self, n: int, gen: torch.Generator, device: torch.device):
        """The outer steps' batches of indices into ``n`` validation images: ``epochs`` seeded
        shuffled passes in batches of ``batch_size`` (the last one partial), capped at
        ``iterations``."""
        bs, done = min(self.s.batch_size, n), 0
        for _ in range(self.s.epochs):
            perm = torch.randperm(n, generator=gen).to(device)
            for i in range(0, n, bs):
                if self.s.iterations is not None and done >= self.s.iterations:
                    return
                done += 1
                yield perm[i:i + bs]

    @staticmethod
    def leaf(normalize, pixels: torch.Tensor) -> torch.Tensor:
        return normalize(pixels).contiguous().clone().requires_grad_(True)       # [E, C, H, W]

    @staticmethod
    def seen_data(memory, x, y, classes) -> tuple[torch.Tensor, torch.Tensor]:
        """All seen classes' data as the releases' training loader holds it: the phase's new-class
        images and the old classes' stored exemplars (float pixels ``[N, C, H, W]``, labels)."""
        old = sorted(c for c in memory.exemplars if c < classes.start)
        if not old:
            return x.float(), y
        ox, oy = ExemplarOptimizer.gather(memory, old)
        return torch.cat([x.float(), ox]), torch.cat([y, oy])


@register("exemplar-optimizer", "mnemonics")
class Mnemonics(ExemplarOptimizer):
    """The bilevel form (module docstring): the new classes' exemplars, validated on all seen
    classes' data, then each half of the old classes' exemplars validated on the other.
    ``stats``: the objective before and after on the same data (new: the first batch; old: the
    sum over both halves)."""
    Options = BilevelOptions

    def targets(self, classes, stored):
        """The new classes and, with ``adjust_old``, the old ones."""
        return sorted(stored) if self.s.adjust_old else list(classes)

    def fit(self, net, z: torch.Tensor, z_y: torch.Tensor, val, space: PixelSpace) -> tuple[float, float]:
        """Outer steps on ``z`` (and its inner learning rates) over ``val``, an iterable of
        ``(embeddings, labels)`` batches; (objective on the first batch before, after)."""
        s = self.s
        sets = step_sets(z_y, s.steps)
        lrs = torch.full((s.inner_epochs * len(sets),), s.inner_lr, device=z.device, requires_grad=True)
        params = head_params(net.head)
        opt = self.pixel_optimizer([z, lrs])
        first = before = None
        for emb, vy in val:
            first = (emb, vy) if first is None else first
            loss = bilevel_loss(net, params, z, z_y, emb, vy, sets, s.inner_epochs, lrs)
            before = float(loss.detach()) if before is None else before
            self.descend(opt, [z, lrs], loss, space)
            with torch.no_grad():
                lrs.clamp_(min=0.0)          # a learning rate stays >= 0
        if first is None:
            return math.nan, math.nan
        after = float(bilevel_loss(net, params, z, z_y, *first, sets, s.inner_epochs, lrs).detach())
        return before, after

    def optimize(self, memory, net, normalize, classes, x, y, gen):
        s = self.s
        if s.epochs == 0 or s.inner_epochs == 0 or s.iterations == 0:
            return
        space = PixelSpace(normalize, x.shape[1], x.device)

        def embed(px: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return net(normalize(px)).embedding.float()

        # new classes: validated on all seen classes' data (new images + old exemplars)
        ex, ex_y = self.gather(memory, [c for c in classes if c in memory.exemplars])
        vx, vy = self.seen_data(memory, x, y, classes)
        z = self.leaf(normalize, ex)
        val = ((embed(vx[i]), vy[i]) for i in self.outer_batches(len(vx), gen, x.device))
        self.stats["new_objective_before"], self.stats["new_objective_after"] = self.fit(net, z, ex_y, val, space)
        self.store(memory, space, z, ex, ex_y)

        # old classes (the paper's split halves): each half validated on the other as it was
        old_ids = sorted(c for c in memory.exemplars if c < classes.start)
        if not (s.adjust_old and old_ids):
            return
        ex, ex_y = self.gather(memory, old_ids)
        ia, ib = split_halves(ex_y)
        if len(ib) == 0:
            return
        za, zb = self.leaf(normalize, ex[ia]), self.leaf(normalize, ex[ib])
        ea, eb = embed(ex[ia]), embed(ex[ib])
        before = after = 0.0
        for z_h, y_h, e_o, y_o in ((za, ex_y[ia], eb, ex_y[ib]), (zb, ex_y[ib], ea, ex_y[ia])):
            val = ((e_o[i], y_o[i]) for i in self.outer_batches(len(e_o), gen, x.device))
            b, a = self.fit(net, z_h, y_h, val, space)
            before, after = before + b, after + a
        self.stats["old_objective_before"], self.stats["old_objective_after"] = before, after
        z = za.detach().new_empty((len(ex_y),) + tuple(za.shape[1:]))   # [E, C, H, W]
        z[ia], z[ib] = za.detach(), zb.detach()
        self.store(memory, space, z, ex, ex_y)


@register("exemplar-optimizer", "mnemonics-single")
class MnemonicsSingle(ExemplarOptimizer):
    """The current release's single-level form (module docstring): frozen model, cosine-to-class-
    mean CE over all seen classes on all seen classes' data, SGD on the new classes' exemplars;
    old exemplars are not adjusted."""
    Options = SingleLevelOptions

    def optimize(self, memory, net, normalize, classes, x, y, gen):
        space = PixelSpace(normalize, x.shape[1], x.device)
        ex, ex_y = self.gather(memory, [c for c in classes if c in memory.exemplars])
        old = sorted(c for c in memory.exemplars if c < classes.start)
        with torch.no_grad():
            if old:
                ox, oy = self.gather(memory, old)
                old_means = class_means(net(normalize(ox)).embedding.float(), oy, classes.start)   # [K_old, D]
            else:
                old_means = net(normalize(ex[:1])).embedding.float()[:0]                           # [0, D]
        vx, vy = self.seen_data(memory, x, y, classes)
        z = self.leaf(normalize, ex)
        opt = self.pixel_optimizer([z])
        first = None
        for idx in self.outer_batches(len(vx), gen, x.device):
            first = idx if first is None else first
            loss = single_level_loss(net, z, ex_y, old_means, normalize(vx[idx]), vy[idx])
            self.stats.setdefault("new_objective_before", float(loss.detach()))
            self.descend(opt, [z], loss, space)
        if first is not None:
            self.stats["new_objective_after"] = float(
                single_level_loss(net, z, ex_y, old_means, normalize(vx[first]), vy[first]).detach())
        self.store(memory, space, z, ex, ex_y)
