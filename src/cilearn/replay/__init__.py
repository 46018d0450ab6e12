"""Replay components (kind ``replay`` of ``cilearn.components``): where the old-class samples that
are mixed into each training step come from, beyond the stored exemplars. ``--replay dfgr`` (any
method, with or without exemplars): a generator trained against the old model alone
(``cilearn.replay.dfgr``).
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..components import Component, register
from ..config import GeneratorReplayFields
from ..errors import ConfigError
from ..evaluate import predict
from ..losses import DISTILL
from .dfgr import GeneratorSettings, train_generator


@dataclass
class DFGROptions(GeneratorReplayFields):
    """The generator replay's options (``config.GeneratorReplayFields``, shorthands ``--replay.<option>``)
    and the KD it applies to the samples."""
    distill: str = "kd"                  # the KD on the samples: the method's (kd, bce), kd without one
    temperature: float = 2.0             # its T (the run's --loss.temperature)

    def __post_init__(self):
        if self.forward not in ("joint", "separate"):
            raise ConfigError(f"--replay.forward must be joint or separate, got {self.forward!r}")
        if self.forward == "joint" and not self.update_bn:
            raise ConfigError("--replay.update-bn false applies to --replay.forward separate (a joint forward "
                              "updates the BatchNorm statistics once, with real and synthetic samples together)")


@register("replay", "dfgr")
class DFGRReplay(Component):
    """Data-free generative replay. Before each phase > 0: ``train_generator`` against the old
    model and nothing else. In each training step: ``samples_per_batch`` generated samples
    (default: the training batch's size) are mixed into the training batch: with ``forward`` joint
    (default) they go through the student in the same forward as the real images
    (``extra_rows``), so BatchNorm normalises one mixed batch and updates its running statistics
    once, with both (the paper: synthetic samples "mixed into each training batch"); the method's
    own losses see only the real rows. They are distilled from the old model:
    ``kd_weight * KD_T(student old logits, old model's logits)`` with ``distill``,
    ``+ ce_weight * CE(all seen logits, old model's argmax)`` (off by default). ``forward``
    separate (cilearn's earlier form, an ablation) runs them through the student in a forward of
    their own, with their own batch statistics, updating the running statistics a second time per
    step (``update_bn`` true) or not (false: ``bn_running_stats_frozen``). With
    ``--save-samples N`` the reporting layer draws N samples per old class after each generator
    training."""
    Options = DFGROptions
    needs_old_model = True

    def __init__(self, options, services):
        super().__init__(options, services)
        o = options
        self.settings = GeneratorSettings(steps=o.steps, batch_size=o.batch_size, lr=o.lr, z_dim=o.z_dim, width=o.width,
                                          bn_weight=o.bn_weight, entropy_weight=o.entropy_weight,
                                          diversity_weight=o.diversity_weight, bn_loss=o.bn_loss,
                                          progress=services.progress, log=services.log)
        self.kd_fn = DISTILL.get(o.distill)
        self.generator = self.model = self.old_model = None
        self.out = self.t_logits = None       # this step's samples: the student's output rows, the old model's logits
        self.summary: dict[str, float] = {}

    def phase_start(self, phase, model, old_model, data):
        s = self.services
        self.model, self.old_model = model, old_model
        settings = dataclasses.replace(self.settings, desc=f"phase {phase.index} generator")
        self.generator, self.summary = train_generator(old_model, s.augmenter.normalize, tuple(data.x.shape[1:]),
                                                       settings, s.gen, s.device)
        n = s.events.wants("samples")
        if n > 0:
            self.save_samples(phase, n)

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        """``n`` generated images, normalised like the training batches ``[n, C, H, W]``."""
        s = self.services
        z = torch.randn(n, self.settings.z_dim, generator=s.gen, device=s.gen.device).to(s.device)
        return s.augmenter.normalize(self.generator(z))

    def draw(self, batch) -> torch.Tensor:
        """This step's samples ``[n, C, H, W]`` (normalised) and the old model's logits on them."""
        xs = self.sample(self.options.samples_per_batch or len(batch.x))
        with torch.no_grad():
            self.t_logits = self.old_model(xs).logits.float()      # [n, K_old]
        return xs

    def extra_rows(self, batch):
        return self.draw(batch) if self.options.forward == "joint" else None

    def extra_output(self, out):
        self.out = out

    def terms(self, batch, out):
        o = self.options
        if o.forward == "joint":
            logits, self.out = self.out.logits, None
        else:
            xs = self.draw(batch)
            with contextlib.nullcontext() if o.update_bn else bn_running_stats_frozen(self.model):
                logits = self.model(xs).logits
        t_logits = self.t_logits
        got = {"replay_kd": (o.kd_weight, self.kd_fn(logits[:, : t_logits.shape[1]], t_logits, o.temperature))}
        if o.ce_weight > 0:
            got["replay_ce"] = (o.ce_weight, F.cross_entropy(logits.float(), t_logits.argmax(1)))
        return got

    def phase_end(self, phase, model, data):
        self.generator = self.model = self.old_model = None

    def diagnostics(self):
        s = self.summary
        self.summary = {}
        return {"generator_seconds": s.get("seconds"), "generator_bn_start": s.get("bn_start"),
                "generator_bn_end": s.get("bn_end")}

    @torch.no_grad()
    def save_samples(self, phase, n: int) -> None:
        """For each old class, the ``n`` samples (of a pool of ``max(512, 8 n K_old)``) that the old
        model gives the highest probability of that class, handed to the reporting layer
        (``samples-phase<i>.png``)."""
        s, k = self.services, phase.num_old
        pool = max(512, 8 * n * k)
        z = torch.randn(pool, self.settings.z_dim, generator=s.gen, device=s.gen.device).to(s.device)
        imgs = torch.cat([self.generator(z[i:i + 256]) for i in range(0, pool, 256)])   # [pool, C, H, W] pixels
        prob = F.softmax(predict(self.old_model, imgs, s.augmenter, s.eval_batch_size, s.autocast_dtype)[0], 1)
        top = prob.topk(min(n, pool), dim=0).indices.T                       # [K_old, n]
        s.events.on_images("samples", phase.index, {
            "images": imgs[top.flatten()].round().clamp(0, 255).to(torch.uint8).cpu(), "rows": k,
            "cols": min(n, pool), "labels": [f"class {s.class_order[c]}" for c in range(k)]})


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
