"""Classification losses (kind ``classification`` of ``cilearn.components``, ``--loss NAME``): the
loss of the labels on the student's logits, one per run, every phase. Each binds its options to a
pure function of ``cilearn.losses``: ``loss(logits, y, counts) -> scalar`` (``counts`` ``[seen]``:
the phase's training images per class), which other components reuse (class-balanced
fine-tuning, a new-class teacher), and gives the step's term ``cls`` with its ``weight``.

``weight`` null is the balance of BiC and WA: ``1 - |old| / |seen|`` against the logit
distillation's ``|old| / |seen|`` (the ``kd`` term's weight null; BiC Sec. 4.1, WA Sec. 3).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .components import Component, option, register
from .errors import ConfigError
from .losses import (balanced_softmax_ce, binary_cross_entropy, cross_entropy, local_cross_entropy,
                     logit_adjusted_ce, nca)


@dataclass(frozen=True)
class ClassificationOptions:
    # weight of the loss; null: 1 - |old| / |seen| (BiC Sec. 4.1, WA: (1 - l) CE + l KD)
    weight: float | None = option(1.0, alias="loss.cls_weight")

    def __post_init__(self):
        if self.weight is not None and self.weight < 0:
            raise ConfigError(f"--loss.cls-weight must be >= 0, got {self.weight}")


class Classification(Component):
    """A classification loss: ``loss`` (a pure function of the logits with this component's
    options) and the step's ``cls`` term."""
    Options = ClassificationOptions
    term_name = "cls"

    def loss(self, logits: torch.Tensor, y: torch.Tensor, counts: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover

    def weight(self, phase) -> float:
        w = self.options.weight
        return 1.0 - phase.num_old / phase.seen if w is None else w

    def terms(self, step, out):
        ctx = step.ctx
        return {self.term_name: (self.weight(ctx.phase), self.loss(out.logits, step.batch.y, ctx.counts))}


@register("classification", "ce")
class CE(Classification):
    """Softmax cross-entropy over all seen classes."""

    def loss(self, logits, y, counts=None):
        return cross_entropy(logits, y, counts)


@register("classification", "ce-local")
class LocalCE(Classification):
    """Softmax CE over the classes with training samples in the phase (``losses.local_cross_entropy``:
    LwF's new-task loss when exemplar-free, plain CE with exemplars)."""

    def loss(self, logits, y, counts=None):
        return local_cross_entropy(logits, y, counts)


@dataclass(frozen=True)
class BCEOptions(ClassificationOptions):
    # iCaRL's Alg. 3: the old classes' targets are the old model's sigmoids (phases > 0), so one
    # sigmoid BCE does classification and distillation (term ``bce``); false: one-hot targets for all
    old_targets: bool = False


@register("classification", "bce")
class BCE(Classification):
    """Sigmoid binary cross-entropy per class, summed over classes, mean over the batch
    (``losses.binary_cross_entropy``). With ``old_targets`` (iCaRL's own loss, Rebuffi et al.
    2017 Alg. 3) the old classes' targets are the old model's sigmoids on the batch."""
    Options = BCEOptions

    def __init__(self, options, services):
        super().__init__(options, services)
        self.needs_old_outputs = options.old_targets
        self.term_name = "bce" if options.old_targets else "cls"

    def loss(self, logits, y, counts=None):
        return binary_cross_entropy(logits, y, counts)

    def terms(self, step, out):
        if not (self.options.old_targets and step.ctx.old_outputs is not None):
            return super().terms(step, out)
        target = F.one_hot(step.batch.y, out.logits.shape[1]).float()
        t_logits = step.old.logits
        target[:, : t_logits.shape[1]] = torch.sigmoid(t_logits)
        value = F.binary_cross_entropy_with_logits(out.logits.float(), target, reduction="sum") / len(target)
        return {self.term_name: (self.weight(step.ctx.phase), value)}


@register("classification", "bsce")
class BalancedSoftmaxCE(Classification):
    """Balanced Softmax CE (Jodelet, Liu & Murata 2021): ``CE(z + log n, y)`` with the phase's
    per-class counts ``n`` (``losses.balanced_softmax_ce``)."""

    def loss(self, logits, y, counts=None):
        return balanced_softmax_ce(logits, y, counts)


@dataclass(frozen=True)
class NCAOptions(ClassificationOptions):
    margin: float = option(0.6, alias="loss.nca_margin")   # delta on the unscaled similarity (PODNet Sec. 4.1)

    def __post_init__(self):
        super().__post_init__()
        if self.margin < 0:
            raise ConfigError(f"--loss.nca-margin must be >= 0, got {self.margin}")


@register("classification", "nca")
class NCA(Classification):
    """PODNet's NCA loss (``losses.nca``) with ``margin = eta * delta``: ``delta`` in unscaled-
    similarity units and ``eta`` the head's learnt scale, detached (see ``losses.nca``)."""
    Options = NCAOptions

    def attach(self, model):
        self.model = model

    def loss(self, logits, y, counts=None):
        head = self.model.head
        scale = head.sigma.detach() if hasattr(head, "sigma") else 1.0
        return nca(logits, y, counts, margin=scale * self.options.margin)


@dataclass(frozen=True)
class LogitAdjustedOptions(ClassificationOptions):
    beta: float = option(0.96, alias="loss.la_beta")   # effective-number beta1 (FOSTER's CIFAR-100 configuration)

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.beta < 1:
            raise ConfigError(f"--loss.la-beta must be in [0, 1), got {self.beta}")


@register("classification", "la-ce")
class LogitAdjustedCE(Classification):
    """FOSTER's logit-adjusted CE with effective-number class weights (``losses.logit_adjusted_ce``)."""
    Options = LogitAdjustedOptions

    def loss(self, logits, y, counts=None):
        return logit_adjusted_ce(logits, y, counts, beta=self.options.beta)
