"""Replay components (kind ``replay`` of ``cilearn.components``): where old-class samples come
from beyond the stored exemplars. ``--replay dfgr`` (any method, with or without exemplars): a
generator trained against the old model alone (``cilearn.replay.dfgr``), its samples mixed into
each training step. ``all-data``: every training image of the classes seen so far (the ``joint``
upper bound).
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..components import Component, option, register
from ..errors import ConfigError
from ..evaluate import predict
from ..losses import kd_bce, kd_kl
from .dfgr import GeneratorSettings, train_generator

KD_FORMS = {"kd": kd_kl, "bce": kd_bce}      # the KD on the samples: softmax KL at T, or iCaRL's sigmoid BCE


@dataclass(frozen=True)
class DFGROptions:
    """The generator replay's options (short names ``--replay.<option>``). The paper's values could
    not be read (METHODS.md); these are cilearn's, measured on digits / Fashion-MNIST."""
    steps: int = option(500, alias="replay.steps")                 # generator training steps (Adam)
    batch_size: int = option(64, alias="replay.batch_size")        # latent codes per generator step
    lr: float = option(1e-3, alias="replay.lr")
    z_dim: int = option(100, alias="replay.z_dim")
    width: int = option(64, alias="replay.width")                  # generator channels (DAFL's generator: 128)
    bn_weight: float = option(1.0, alias="replay.bn_weight")       # BatchNorm-statistics matching
    bn_loss: str = option("kl", alias="replay.bn_loss")            # kl (Gaussians) | l2
    entropy_weight: float = option(1.0, alias="replay.entropy_weight")      # per-sample entropy, minimised
    diversity_weight: float = option(1.0, alias="replay.diversity_weight")  # entropy of the batch-mean prediction, maximised
    # synthetic samples per training step; null: the training batch size
    samples_per_batch: int | None = option(None, alias="replay.samples_per_batch")
    kd_weight: float = option(1.0, alias="replay.kd_weight")       # KD of the old logits on the synthetic samples
    # CE over all seen classes, label = the old model's argmax (0: off, KD only)
    ce_weight: float = option(0.0, alias="replay.ce_weight")
    # joint: the samples go through the student in the same forward as the real batch (one BatchNorm
    # batch, "mixed into each training batch"); separate: their own forward (cilearn's earlier form)
    forward: str = option("joint", alias="replay.forward")
    # separate forward: it updates BatchNorm running statistics (false: real batches only)
    update_bn: bool = option(True, alias="replay.update_bn")
    distill: str = "kd"                  # the KD on the samples (KD_FORMS): kd, or bce (the lwf-mc recipe's)
    temperature: float = option(2.0, alias="loss.temperature")     # its T

    def __post_init__(self):
        for k in ("steps", "batch_size", "lr", "z_dim", "width", "temperature"):
            if not getattr(self, k) > 0:
                raise ConfigError(f"--replay.{k.replace('_', '-')} must be a positive number, got {getattr(self, k)}")
        for k in ("bn_weight", "entropy_weight", "diversity_weight", "kd_weight", "ce_weight"):
            if getattr(self, k) < 0:
                raise ConfigError(f"--replay.{k.replace('_', '-')} must be a non-negative number, got {getattr(self, k)}")
        if self.samples_per_batch is not None and self.samples_per_batch < 1:
            raise ConfigError(f"--replay.samples-per-batch must be a positive number, got {self.samples_per_batch}")
        if self.bn_loss not in ("kl", "l2"):
            raise ConfigError(f"--replay.bn-loss must be kl or l2, got '{self.bn_loss}'")
        if self.distill not in KD_FORMS:
            raise ConfigError(f"components.dfgr.distill must be one of {', '.join(KD_FORMS)}, got {self.distill!r}")
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
    per_phase = ("generator", "t_logits")
    reports = ("save_samples",)
    single_process = "its generator is trained outside the training loop and its samples are not sharded"

    def __init__(self, options, services):
        super().__init__(options, services)
        o = options
        self.settings = GeneratorSettings(steps=o.steps, batch_size=o.batch_size, lr=o.lr, z_dim=o.z_dim, width=o.width,
                                          bn_weight=o.bn_weight, entropy_weight=o.entropy_weight,
                                          diversity_weight=o.diversity_weight, bn_loss=o.bn_loss,
                                          progress=services.progress, log=services.log)
        self.kd_fn = KD_FORMS[o.distill]
        self.generator = self.t_logits = None   # the phase's generator; this step's old-model logits on the samples
        self.summary: dict[str, float] = {}

    def phase_start(self, ctx):
        s = self.services
        settings = dataclasses.replace(self.settings, desc=f"phase {ctx.phase.index} generator")
        self.generator, self.summary = train_generator(ctx.old_model, s.augmenter.normalize, tuple(ctx.x.shape[1:]),
                                                       settings, s.gen, s.device)
        n = s.events.wants("samples")
        if n > 0:
            self.save_samples(ctx, n)

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        """``n`` generated images, normalised like the training batches ``[n, C, H, W]``."""
        s = self.services
        z = torch.randn(n, self.settings.z_dim, generator=s.gen, device=s.gen.device).to(s.device)
        return s.augmenter.normalize(self.generator(z))

    def draw(self, step) -> torch.Tensor:
        """This step's samples ``[n, C, H, W]`` (normalised) and the old model's logits on them."""
        xs = self.sample(self.options.samples_per_batch or len(step.batch.x))
        with torch.no_grad():
            self.t_logits = step.ctx.old_model(xs).logits.float()      # [n, K_old]
        return xs

    def before_step(self, step):
        if self.options.forward == "joint":         # the samples join the student's forward of the batch
            step.add_rows(self, self.draw(step))

    def terms(self, step, out):
        o = self.options
        if o.forward == "joint":
            rows = step.output_of(self)
            if rows is None:           # a loss of the batch as given (no rows were added): no replay term
                return {}
            logits = rows.logits
        else:
            xs = self.draw(step)
            model = step.ctx.model
            with contextlib.nullcontext() if o.update_bn else bn_running_stats_frozen(model):
                logits = model(xs).logits
        t_logits = self.t_logits
        got = {"replay_kd": (o.kd_weight, self.kd_fn(logits[:, : t_logits.shape[1]], t_logits, o.temperature))}
        if o.ce_weight > 0:
            got["replay_ce"] = (o.ce_weight, F.cross_entropy(logits.float(), t_logits.argmax(1)))
        return got

    def diagnostics(self):
        s = self.summary
        self.summary = {}
        return {"generator_seconds": s.get("seconds"), "generator_bn_start": s.get("bn_start"),
                "generator_bn_end": s.get("bn_end")}

    @torch.no_grad()
    def save_samples(self, ctx, n: int) -> None:
        """For each old class, the ``n`` samples (of a pool of ``max(512, 8 n K_old)``) that the old
        model gives the highest probability of that class, handed to the reporting layer
        (``samples-phase<i>.png``)."""
        s, phase = self.services, ctx.phase
        k = phase.num_old
        pool = max(512, 8 * n * k)
        z = torch.randn(pool, self.settings.z_dim, generator=s.gen, device=s.gen.device).to(s.device)
        imgs = torch.cat([self.generator(z[i:i + 256]) for i in range(0, pool, 256)])   # [pool, C, H, W] pixels
        prob = F.softmax(predict(ctx.old_model, imgs, s.augmenter, s.eval_batch_size, s.autocast_dtype)[0], 1)
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


@register("replay", "all-data")
class AllData(Component):
    """Every training image of the classes seen so far, in every phase: the phase trains on all of
    them (``joint``, the upper bound). Runs with it keep no exemplars."""
    excludes_memory = True

    def training_set(self, phase, x, y, memory, data):
        return data.train_of(range(0, phase.end))
