"""Batched augmentation on the training device (no per-sample Python).

Input: uint8 ``[B, C, H, W]``; output: normalised float ``[B, C, H, W]``. Policies:
``none``; ``flip`` (horizontal, p = 0.5); ``crop-flip`` (zero-pad by ``pad`` px, random HxW crop,
flip); ``rrc-flip`` (random-resized-crop, scale (0.08, 1), ratio (3/4, 4/3), back to HxW, flip).

``none`` and ``flip`` have a finite set of views (1 and 2). ``train`` then also returns the view
id of each sample, so a frozen teacher's outputs can be computed once per view and looked up
(``cilearn.services.OldOutputs``) instead of running the teacher on every batch.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .rows import as_tensor

POLICIES = ("none", "flip", "crop-flip", "rrc-flip")


class Augmenter:
    def __init__(self, policy: str, pad: int, mean, std, channels_last: bool = True):
        if policy not in POLICIES:
            raise ConfigError(f"--data.augment must be one of {', '.join(POLICIES)}, got '{policy}'")
        self.policy, self.pad, self.channels_last = policy, pad, channels_last
        std_t = torch.tensor(std, dtype=torch.float32)
        self._scale = (1.0 / (255.0 * std_t)).view(1, -1, 1, 1)        # x_norm = x * scale + shift
        self._shift = (-torch.tensor(mean, dtype=torch.float32) / std_t).view(1, -1, 1, 1)

    @property
    def num_views(self) -> int | None:
        """Number of distinct training views, or None when they are continuous."""
        return {"none": 1, "flip": 2}.get(self.policy)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 or float pixels in [0, 255] -> normalised float32. ``x`` may be a host-resident
        view (``cilearn.data.rows.HostRows``) of a batch: its rows are moved to the device here."""
        x = as_tensor(x)
        if self._scale.device != x.device:
            self._scale, self._shift = self._scale.to(x.device), self._shift.to(x.device)
        out = torch.addcmul(self._shift, x.float(), self._scale)
        return out.contiguous(memory_format=torch.channels_last) if self.channels_last else out

    def test(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalize(x)

    def view(self, x: torch.Tensor, v: int) -> torch.Tensor:
        """Deterministic view ``v`` (0: identity, 1: flipped) of a finite policy."""
        x = as_tensor(x)
        return self.normalize(x.flip(3) if v == 1 else x)

    def train(self, x: torch.Tensor, gen: torch.Generator, span: slice | None = None,
              batch: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns (augmented normalised batch, view ids [B] or None). ``x`` may be the rows ``span``
        of a batch of ``batch`` images (one rank's part under torchrun): the random parameters are
        drawn for the whole batch, as one process would, and the part's rows used, so the generator
        advances identically on every rank."""
        x = as_tensor(x)
        B = x.shape[0]
        dev = x.device
        span, batch = (slice(0, B), B) if span is None else (span, batch)
        if self.policy == "none":
            return self.normalize(x), torch.zeros(B, dtype=torch.long, device=dev)
        flip = (torch.rand(batch, generator=gen, device=gen.device).to(dev) < 0.5)[span]
        if self.policy == "crop-flip" and self.pad > 0:
            x = random_crop(x, self.pad, gen, span, batch)
        elif self.policy == "rrc-flip":
            x = random_resized_crop(x, gen, span=span, batch=batch)
        x = torch.where(flip.view(B, 1, 1, 1), x.flip(3), x)
        return self.normalize(x), (flip.long() if self.policy == "flip" else None)


def random_crop(x: torch.Tensor, pad: int, gen: torch.Generator, span: slice | None = None,
                batch: int | None = None) -> torch.Tensor:
    """Zero-pad by ``pad`` and take a random HxW window per sample (one gather). ``span``/``batch``:
    see ``Augmenter.train``."""
    B, C, H, W = x.shape
    span, batch = (slice(0, B), B) if span is None else (span, batch)
    xp = F.pad(x, (pad, pad, pad, pad))
    off = torch.randint(0, 2 * pad + 1, (2, batch), generator=gen, device=gen.device).to(x.device)[:, span]
    rows = (off[0, :, None] + torch.arange(H, device=x.device))[:, :, None]   # [B, H, 1]
    cols = (off[1, :, None] + torch.arange(W, device=x.device))[:, None, :]   # [B, 1, W]
    b = torch.arange(B, device=x.device)[:, None, None]
    return xp.permute(0, 2, 3, 1)[b, rows, cols].permute(0, 3, 1, 2)          # [B, C, H, W]


def random_resized_crop(x: torch.Tensor, gen: torch.Generator, scale=(0.08, 1.0),
                        ratio=(3 / 4, 4 / 3), span: slice | None = None, batch: int | None = None) -> torch.Tensor:
    """Random-resized-crop back to the input size, batched with one ``grid_sample``. ``span``/``batch``:
    see ``Augmenter.train``."""
    B, C, H, W = x.shape
    span, batch = (slice(0, B), B) if span is None else (span, batch)
    g = lambda: torch.rand(batch, generator=gen, device=gen.device).to(x.device)[span]  # noqa: E731
    area = scale[0] + (scale[1] - scale[0]) * g()                               # fraction of image
    logr = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * g()
    r = torch.exp(logr)
    w = torch.sqrt(area * r).clamp(max=1.0)                                      # fraction of width
    h = torch.sqrt(area / r).clamp(max=1.0)
    cx = (g() * 2 - 1) * (1 - w)                                                # centre in [-1, 1]
    cy = (g() * 2 - 1) * (1 - h)
    theta = torch.zeros(B, 2, 3, device=x.device)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w, cx, h, cy
    grid = F.affine_grid(theta, (B, C, H, W), align_corners=False)
    out = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.round_().clamp_(0, 255)
