"""Constraint components (kind ``constraint`` of ``cilearn.components``): what the main stage may
change, for any head type and any recipe.

* ``freeze-old-rows``: the old classes' rows (and biases) of the head restored before every
  training step of the main stage and after its last one, i.e. fixed while the phase trains
  (projected SGD); phases > 0. Calibration stages (fine-tuning) train them.
  ``--train.freeze-old-head true|false`` adds or removes it.
* ``weight-clip``: the head's weights clipped to be non-negative at the same points, every phase
  (WA). ``--train.weight-clip true|false`` adds or removes it.
* ``freeze-backbone``: from the phase after ``after`` on, the backbone trains no more (no
  gradient; BatchNorm in eval mode, its statistics kept); ``after: -1``: never trained, the
  backbone used as given (pre-trained weights).

When two are in a run they act in the recipe's order (clipping before freezing: the rows are
restored last).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .calibration import clip_nonnegative
from .components import Component, register
from .errors import ConfigError


@register("constraint", "freeze-old-rows")
class FreezeOldRows(Component):
    """The old classes' rows of the head (weight and bias; for a local-similarity head all their
    proxies) kept at their values from the start of the phase while the main stage trains."""
    from_phase = 1
    switch = "train.freeze_old_head"
    per_phase = ("frozen",)

    def __init__(self, options, services):
        super().__init__(options, services)
        self.frozen: list[tuple[torch.Tensor, torch.Tensor]] | None = None   # (parameter, its old rows)

    def phase_start(self, ctx):
        head, phase = ctx.model.head, ctx.phase
        per = head.weight.shape[0] // phase.seen          # rows per class (LSC: proxies)
        self.frozen = [(p, p[: phase.num_old * per].detach().clone())
                       for p in (head.weight, getattr(head, "bias", None)) if p is not None]

    def constrain(self, ctx):
        if self.frozen is not None:
            with torch.no_grad():
                for p, rows in self.frozen:
                    p[: len(rows)] = rows


@register("constraint", "weight-clip")
class WeightClip(Component):
    """WA's weight clipping (Zhao et al. 2020, Sec. 3.3): non-negative head weights after every
    optimizer step of the main stage, in every phase (``calibration.clip_nonnegative``)."""
    switch = "train.weight_clip"

    def constrain(self, ctx):
        clip_nonnegative(ctx.model.head.weight)


@dataclass(frozen=True)
class FreezeBackboneOptions:
    after: int = 0        # the last phase whose main stage trains the backbone; -1: none (used as given)

    def __post_init__(self):
        if self.after < -1:
            raise ConfigError(f"components.freeze-backbone.after must be >= -1 (-1: the backbone is never trained), "
                              f"got {self.after}")


@register("constraint", "freeze-backbone")
class FreezeBackbone(Component):
    """The backbone frozen from phase ``after + 1`` on (``IncrementalNet.freeze_backbone``: no
    gradient, eval mode in training too): what trains after it is the head and what components
    add (e.g. nothing, for a nearest-class-mean recipe with no epochs in later phases). Its
    embeddings are then computed once per image (``cilearn.embeddings``)."""
    Options = FreezeBackboneOptions

    def first_phase(self) -> int:
        return self.options.after + 1

    def phase_start(self, ctx):
        ctx.model.freeze_backbone()
