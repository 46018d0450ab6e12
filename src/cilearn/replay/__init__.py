"""Replay sources (registry ``REPLAY``): where the old-class samples that are mixed into each
training batch come from, beyond the stored exemplars. ``--replay dfgr`` (any method, with or
without exemplars): a generator trained against the old model alone (``cilearn.replay.dfgr``).

A source is built per run with the method (``source(method)``) and has hooks:
  ``before_phase(phase, image_shape)``  once the old model (the method's teacher) exists, phases > 0
  ``terms(batch_size)``                 -> [(name, weight, value)] for one training step
  ``after_phase(phase)``                drop what the phase needed
  ``diagnostics()``                     -> per-phase values for metrics.json
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..evaluate import predict
from ..losses import kd_kl
from ..registry import Registry
from .dfgr import GeneratorSettings, train_generator

if TYPE_CHECKING:
    from ..data.scenario import Phase
    from ..methods.base import Method

REPLAY: Registry = Registry("replay source")


@REPLAY.register("dfgr")
class DFGRReplay:
    """Data-free generative replay. Before each phase > 0: ``train_generator`` against the old
    model (the method's frozen teacher) and nothing else. In each training step:
    ``samples_per_batch`` generated samples (default: the training batch size) go through the
    student in their own forward pass (their own BatchNorm batch statistics; the real batch's
    forward, which serves the method's losses, is unchanged), and are distilled from the old model:
    ``kd_weight * KD_T(student old logits, teacher logits)`` with the method's KD (LwF's softmax KD
    at T when the method has none), ``+ ce_weight * CE(all seen logits, teacher argmax)`` (off by
    default). The synthetic forward updates the student's BatchNorm running statistics like a real
    batch (``--replay.update-bn true``, default); ``false`` keeps them to the real batches'
    (``bn_running_stats_frozen``). ``--save-samples N``: a PNG of N samples per old class after each
    generator training."""

    def __init__(self, method: "Method"):
        self.m = method
        r = method.ctx.cfg.replay
        self.settings = GeneratorSettings(steps=r.steps, batch_size=r.batch_size, lr=r.lr, z_dim=r.z_dim, width=r.width,
                                          bn_weight=r.bn_weight, entropy_weight=r.entropy_weight,
                                          diversity_weight=r.diversity_weight, bn_loss=r.bn_loss,
                                          progress=method.ctx.cfg.train.progress)
        self.generator = None
        self.summary: dict[str, float] = {}

    def before_phase(self, phase: "Phase", image_shape: tuple[int, int, int]) -> None:
        ctx = self.m.ctx
        self.generator, self.summary = train_generator(self.m.teacher, ctx.augmenter.normalize, image_shape,
                                                       self.settings, ctx.gen, ctx.device)
        n = ctx.cfg.report.save_samples
        if n > 0 and ctx.events.wants("samples"):
            self.save_samples(phase, n)

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        """``n`` generated images, normalised like the training batches ``[n, C, H, W]``."""
        ctx = self.m.ctx
        z = torch.randn(n, self.settings.z_dim, generator=ctx.gen, device=ctx.gen.device).to(ctx.device)
        return ctx.augmenter.normalize(self.generator(z))

    def terms(self, batch_size: int) -> list[tuple[str, float, torch.Tensor]]:
        r = self.m.ctx.cfg.replay
        xs = self.sample(r.samples_per_batch or batch_size)
        with torch.no_grad():
            t_logits = self.m.teacher(xs).logits.float()
        with contextlib.nullcontext() if r.update_bn else bn_running_stats_frozen(self.m.net):
            logits = self.m.net(xs).logits
        kd_fn = self.m.kd_fn or kd_kl
        out = [("replay_kd", r.kd_weight, kd_fn(logits[:, : t_logits.shape[1]], t_logits, self.m.T))]
        if r.ce_weight > 0:
            out.append(("replay_ce", r.ce_weight, F.cross_entropy(logits.float(), t_logits.argmax(1))))
        return out

    def after_phase(self, phase: "Phase") -> None:
        self.generator = None

    def diagnostics(self) -> dict[str, float | None]:
        s = self.summary
        self.summary = {}
        return {"generator_seconds": s.get("seconds"), "generator_bn_start": s.get("bn_start"),
                "generator_bn_end": s.get("bn_end")}

    @torch.no_grad()
    def save_samples(self, phase: "Phase", n: int) -> None:
        """For each old class, the ``n`` samples (of a pool of ``max(512, 8 n K_old)``) that the old
        model gives the highest probability of that class, handed to the reporting layer
        (``samples-phase<i>.png``)."""
        ctx, k = self.m.ctx, phase.num_old
        pool = max(512, 8 * n * k)
        z = torch.randn(pool, self.settings.z_dim, generator=ctx.gen, device=ctx.gen.device).to(ctx.device)
        imgs = torch.cat([self.generator(z[i:i + 256]) for i in range(0, pool, 256)])   # [pool, C, H, W] pixels
        prob = F.softmax(predict(self.m.teacher, imgs, ctx.augmenter, ctx.cfg.train.eval_batch_size,
                                 ctx.autocast_dtype)[0], 1)                               # [pool, K_old]
        top = prob.topk(min(n, pool), dim=0).indices.T                       # [K_old, n]
        order = ctx.cfg.scenario.class_order
        ctx.events.on_images("samples", phase.index, {
            "images": imgs[top.flatten()].round().clamp(0, 255).to(torch.uint8).cpu(), "rows": k,
            "cols": min(n, pool), "labels": [f"class {order[c]}" for c in range(k)]})


@contextlib.contextmanager
def bn_running_stats_frozen(net: torch.nn.Module):
    """BatchNorm layers of ``net`` normalise with their batch statistics as usual (train mode) but
    leave their running statistics, the ones used at test time, unchanged: momentum 0 inside, and
    the batch counter restored on exit (``--replay.update-bn false``)."""
    layers = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None) for m in layers]
    for m in layers:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (mom, n) in zip(layers, saved):
            m.momentum = mom
            if n is not None:
                m.num_batches_tracked.copy_(n)


def replay_source(method: "Method"):
    """The run's replay source for ``method``: ``--replay`` (``none`` turns a recipe's off), else
    the recipe's ``replay_source``; None without one."""
    name = method.ctx.cfg.replay.source or method.replay_source
    return None if name in (None, "none") else REPLAY.get(name)(method)
