"""DF-GR, data-free generative replay (Choi, El-Khamy & Lee, CVPR Workshops 2021).

Before each phase after the first, a generator is trained from scratch against the frozen old
model alone: no image of any data set is read. Its losses (pure functions below):

* BatchNorm statistics matching: at every BatchNorm layer of the old model, the per-channel
  mean and variance of the generated batch's inputs to that layer against the layer's running
  statistics (``bn_statistics_loss``: KL between the two Gaussians, or L2);
* per-sample prediction entropy, minimised (each sample confidently one old class);
* entropy of the batch-mean prediction, maximised (the batch covers all old classes).

During the phase, the generator's samples are mixed into every training batch and distilled
from the old model's soft labels (KD on the old-class logits); see ``DFGRReplay``. The generator
is dropped at the end of the phase (not stored, as in the paper).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..progress import bar as progress_bar
from ..progress import stage_line
from ..errors import ConfigError
from ..models.net import freeze


# ---------------------------------------------------------------- losses (pure functions)
def bn_statistics_loss(mean: torch.Tensor, var: torch.Tensor, run_mean: torch.Tensor, run_var: torch.Tensor,
                       kind: str = "kl", eps: float = 1e-5) -> torch.Tensor:
    """Distance of a batch's per-channel statistics ``mean``, ``var`` ``[C]`` (biased variance)
    to a BatchNorm layer's running ones ``[C]``, averaged over channels. ``kl``:
    ``KL(N(mean, var) || N(run_mean, run_var)) = log(s_r / s_b) + (s_b^2 + (m_b - m_r)^2) / (2 s_r^2) - 1/2``
    (``s^2 = var + eps``); ``l2``: ``||m_b - m_r||_2 + ||s_b^2 - s_r^2||_2`` (DeepInversion's
    form). Both are 0 exactly when the statistics are equal and positive otherwise."""
    if kind == "kl":
        vb, vr = var.float() + eps, run_var.float() + eps
        kl = 0.5 * torch.log(vr / vb) + (vb + (mean.float() - run_mean.float()) ** 2) / (2 * vr) - 0.5
        return kl.mean()
    if kind == "l2":
        return torch.linalg.vector_norm(mean.float() - run_mean.float()) + \
            torch.linalg.vector_norm(var.float() - run_var.float())
    raise ValueError(f"bn_statistics_loss: kind must be 'kl' or 'l2', got {kind!r}")


def sample_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of each sample's prediction entropy ``-sum_c p_c log p_c`` (nats);
    ``logits`` ``[B, K]``. Minimised: each generated sample should be confidently one class."""
    logp = F.log_softmax(logits.float(), dim=1)
    return -(logp.exp() * logp).sum(1).mean()


def batch_mean_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the batch-mean prediction ``p_bar = mean_b softmax(logits_b)`` (nats);
    maximised (``ln K`` when the batch covers the K classes evenly)."""
    p = F.softmax(logits.float(), dim=1).mean(0)
    return -(p * p.clamp_min(1e-12).log()).sum()


# ---------------------------------------------------------------- generator
class Generator(nn.Module):
    """DCGAN-style generator (as in data-free distillation, e.g. DAFL, whose width is 128; 64 here
    for CPU cost): ``z [B, z_dim]`` -> linear -> ``[B, width, h0, w0]`` -> BN -> 2 x (upsample x2, conv 3x3, BN, LeakyReLU 0.2) -> conv 3x3 to
    ``C`` channels -> sigmoid x 255: float pixels ``[B, C, H, W]`` in ``[0, 255]``, which the run's
    ``Augmenter.normalize`` maps to the model's input space like real images. ``h0 = ceil(H / 4)``;
    the output is resized to exactly ``H x W`` when ``H`` is not a multiple of 4."""

    def __init__(self, image_shape: tuple[int, int, int], z_dim: int = 100, width: int = 64):
        super().__init__()
        c, h, w = image_shape
        self.image_shape, self.z_dim = (c, h, w), z_dim
        self.h0, self.w0 = math.ceil(h / 4), math.ceil(w / 4)
        self.fc = nn.Linear(z_dim, width * self.h0 * self.w0)
        self.bn0 = nn.BatchNorm2d(width)
        self.body = nn.Sequential(
            nn.Upsample(scale_factor=2), nn.Conv2d(width, width, 3, 1, 1), nn.BatchNorm2d(width), nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2), nn.Conv2d(width, width // 2, 3, 1, 1), nn.BatchNorm2d(width // 2),
            nn.LeakyReLU(0.2), nn.Conv2d(width // 2, c, 3, 1, 1))
        self.width = width

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.bn0(self.fc(z).view(len(z), self.width, self.h0, self.w0))
        x = self.body(x)
        if x.shape[-2:] != self.image_shape[1:]:
            x = F.interpolate(x, size=self.image_shape[1:], mode="bilinear", align_corners=False)
        return torch.sigmoid(x) * 255.0


@dataclass
class GeneratorSettings:
    steps: int = 500
    batch_size: int = 64
    width: int = 64
    lr: float = 1e-3                 # Adam
    z_dim: int = 100
    bn_weight: float = 1.0
    entropy_weight: float = 1.0      # per-sample entropy, minimised
    diversity_weight: float = 1.0    # batch-mean entropy, maximised
    bn_loss: str = "kl"
    progress: bool = True                          # draw a bar (cilearn.progress.bars of train.progress)
    log: Callable[[str], None] | None = None       # where the finished training's line goes (the run's log)
    desc: str = "generator"                        # its name in the bar and the line


class _BNStats:
    """Forward hooks on every BatchNorm layer of a model: the per-channel mean and (biased)
    variance of each layer's input, with its graph (so the generator gets their gradient)."""

    def __init__(self, model: nn.Module):
        self.layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.stats: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.handles = [m.register_forward_hook(self.hook) for m in self.layers]

    def hook(self, module, inputs, output):
        x = inputs[0].float()
        dims = [0] + list(range(2, x.dim()))
        self.stats.append((x.mean(dims), x.var(dims, unbiased=False)))

    def loss(self, kind: str) -> torch.Tensor:
        terms = [bn_statistics_loss(m, v, layer.running_mean, layer.running_var, kind)
                 for (m, v), layer in zip(self.stats, self.layers)]
        self.stats = []
        return torch.stack(terms).mean()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def train_generator(old_model: nn.Module, normalize, image_shape: tuple[int, int, int], s: GeneratorSettings,
                    gen: torch.Generator, device: torch.device) -> tuple[Generator, dict[str, float]]:
    """Train a generator from scratch against ``old_model`` alone (frozen, eval mode: its BN
    layers normalise with their running statistics, which the generated batch's statistics are
    matched to). No data set is read: the inputs are the model, the input normalisation of the
    run (``normalize``: float pixels -> model input), the image shape and the settings.

    ``old_model(x).logits`` are the old classes' logits. The loop is Adam over ``s.steps`` steps
    of ``s.batch_size`` latent codes drawn from ``gen``; it is not a pass over data, so it does not
    use ``cilearn.train.fit``. Returns the generator (eval mode, frozen) and a summary:
    ``{"seconds", "bn_start", "bn_end", "entropy_end", "diversity_end"}``."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in old_model.modules()) and s.bn_weight > 0:
        raise ConfigError("--replay dfgr matches BatchNorm statistics, and the old model has no BatchNorm layer; "
                          "give --replay.bn-weight 0 or a backbone with BatchNorm")
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen, device=gen.device)))
        g = Generator(image_shape, s.z_dim, s.width).to(device)
    was = old_model.training
    old_model.eval()
    hooks = _BNStats(old_model)
    opt = torch.optim.Adam(g.parameters(), lr=s.lr)
    bar = progress_bar(s.steps, s.desc, "step") if s.progress else None
    first = last = {}
    try:
        for step in range(s.steps):
            z = torch.randn(s.batch_size, s.z_dim, generator=gen, device=gen.device).to(device)
            logits = old_model(normalize(g(z))).logits
            bn = hooks.loss(s.bn_loss) if hooks.layers else logits.new_zeros(())
            ent, div = sample_entropy(logits), batch_mean_entropy(logits)
            loss = s.bn_weight * bn + s.entropy_weight * ent - s.diversity_weight * div
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            last = {"bn": bn.detach(), "entropy": ent.detach(), "diversity": div.detach(), "loss": loss.detach()}
            if step == 0:
                first = last
            if bar is not None:
                bar.update(1)
                if step % 50 == 0:
                    bar.set_postfix({k: f"{float(v):.3f}" for k, v in last.items()})
    finally:
        hooks.remove()
        old_model.train(was)
        if bar is not None:
            bar.close()
    freeze(g)
    summary = {"seconds": time.perf_counter() - start,
               "bn_start": float(first.get("bn", float("nan"))), "bn_end": float(last.get("bn", float("nan"))),
               "entropy_end": float(last.get("entropy", float("nan"))),
               "diversity_end": float(last.get("diversity", float("nan")))}
    if s.log is not None:
        s.log(stage_line(s.desc, s.steps, "step", summary["seconds"], float(last.get("loss", float("nan")))))
    return g, summary
