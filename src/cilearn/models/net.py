"""The incremental network: a backbone and a growing head."""
from __future__ import annotations

import contextlib
import copy
from typing import Iterator, NamedTuple

import torch
import torch.nn as nn



class NetOutput(NamedTuple):
    logits: torch.Tensor            # [B, num_classes]
    embedding: torch.Tensor         # [B, D]
    maps: list[torch.Tensor]        # per stage [B, C_s, H_s, W_s]


def freeze(module: nn.Module) -> nn.Module:
    """``module`` in eval mode with no parameter requiring a gradient (in place); returns it."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode for the block, its previous mode restored after."""
    was = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was)


@contextlib.contextmanager
def batch_statistics(net: nn.Module) -> Iterator[nn.Module]:
    """The block runs ``net`` in training mode (a frozen extractor stays in eval mode, as in the
    training) with each BatchNorm that trains normalising by the batch's own statistics and its
    running statistics left as they are (``track_running_stats`` off for the block)."""
    was = net.training
    net.train()
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
           and m.track_running_stats]
    for m in bns:
        m.track_running_stats = False
    try:
        yield net
    finally:
        for m in bns:
            m.track_running_stats = True
        net.train(was)


class LogitBias(nn.Module):
    """A per-class affine correction of the logits, ``z_k -> scale_k z_k + shift_k``, identity for
    the classes no calibration has corrected (BiC's bias layers, ``cilearn.calibration``).
    ``scale``, ``shift``: buffers ``[K]`` grown with the head, part of the model's state."""

    def __init__(self, num_classes: int = 0):
        super().__init__()
        self.register_buffer("scale", torch.ones(num_classes))
        self.register_buffer("shift", torch.zeros(num_classes))

    def add_classes(self, n: int) -> None:
        self.scale = torch.cat([self.scale, self.scale.new_ones(n)])
        self.shift = torch.cat([self.shift, self.shift.new_zeros(n)])

    @torch.no_grad()
    def set(self, start: int, end: int, alpha: float, beta: float) -> None:
        """Classes ``start..end-1`` corrected by ``alpha z + beta``."""
        self.scale[start:end] = alpha
        self.shift[start:end] = beta

    def forward(self, z: torch.Tensor) -> torch.Tensor:   # [B, K] -> [B, K]
        return z * self.scale + self.shift


class IncrementalNet(nn.Module):
    expandable = False                 # grows by an extractor per phase (``ExpandableNet``)

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.logit_bias: LogitBias | None = None      # enable_logit_bias(): a calibration's correction

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    def add_classes(self, n: int) -> None:
        self.head.add_classes(n)
        if self.logit_bias is not None:
            self.logit_bias.add_classes(n)

    def grow(self, phase) -> None:
        """The network of ``phase`` (``data.scenario.Phase``): head rows for its new classes; a
        backbone whose embedding grows each phase (``backbone.grow(phase)`` -> the coordinates it
        added, e.g. EASE's adapter sets) widens the head by as many input columns."""
        self.add_classes(phase.num_new)
        grow = getattr(self.backbone, "grow", None)
        added = grow(phase) if grow is not None else 0
        if added:
            self.head.widen(added)

    @property
    def reuses_old_embedding(self) -> bool:
        """Whether the training forward takes part of the embedding from the old model's cached
        outputs (``forward(x, old_embedding)``) instead of computing it (frozen extractors)."""
        return False

    def freeze_backbone(self) -> None:
        """The backbone trains no more: no gradient, and in eval mode (BatchNorm statistics kept)
        even when the net is put in train mode."""
        freeze(self.backbone)
        self.backbone_frozen = True

    def train(self, mode: bool = True):
        super().train(mode)
        if getattr(self, "backbone_frozen", False):
            self.backbone.eval()
        return self

    def enable_logit_bias(self) -> None:
        """Logits pass through a ``LogitBias`` (identity until a calibration sets it)."""
        if self.logit_bias is None:
            p = next(self.head.parameters(), None)
            self.logit_bias = LogitBias(self.num_classes).to(p.device if p is not None else "cpu")

    def logits(self, emb: torch.Tensor) -> torch.Tensor:
        """The head's logits ``[B, K]`` of embeddings ``[B, D]``, with the logit correction if any."""
        z = self.head(emb)
        return z if self.logit_bias is None else self.logit_bias(z)

    def forward(self, x: torch.Tensor) -> NetOutput:
        maps, emb = self.backbone(x)
        return NetOutput(self.logits(emb), emb, maps)

    def frozen_copy(self) -> "IncrementalNet":
        """A deep copy in eval mode with no gradients: the teacher of the next phase."""
        return freeze(copy.deepcopy(self))
