"""Head components (kind ``head`` of ``cilearn.components``): what happens to the classifier's rows
around the training of a phase, for any head type and any recipe.

* ``imprint``: the new classes' rows set from the current model's embeddings of their images once
  the head has grown (``cilearn.imprint``: class means, or K-means proxies for a local-similarity
  head); phases > 0.
* ``freeze-old-rows``: the old classes' rows (and biases) restored before every training step of
  the main stage and after its last one, i.e. fixed while the phase trains (projected SGD);
  phases > 0. Calibration stages (fine-tuning) train them.
* ``weight-clip``: the head's weights clipped to be non-negative at the same points, every phase.

A run's ``--train.weight-clip`` / ``--train.freeze-old-head`` add or remove the last two; the
recipe's ``head_components`` are the defaults. When both are in a run, clipping comes first.
"""
from __future__ import annotations

import torch

from .calibration import clip_nonnegative
from .components import Component, register
from .imprint import imprint


@register("head", "imprint")
class Imprint(Component):
    """Weight imprinting of the new classes' rows (Qi et al. 2018; LUCIR Sec. 3.2, PODNet's
    multi-imprinting) from the model's embeddings of their training images, before the phase
    trains: the old model's cached embeddings (unflipped view) when the augmentation has finite
    views, else one embedding pass. K-means draws come from the phase's own generator."""
    needs_old_model = True
    needs_old_outputs = True

    def new_classes(self, phase, model, data):
        new = (data.y >= phase.start).nonzero().flatten()
        emb = data.old_outputs.cached_embeddings(new) if data.old_outputs is not None else None
        if emb is None:
            emb = self.services.embed(model, data.x[new])
        imprint(model.head, emb, data.y[new], phase.classes, self.services.phase_generator(phase))


@register("head", "freeze-old-rows")
class FreezeOldRows(Component):
    """The old classes' rows of the head (weight and bias; for a local-similarity head all their
    proxies) kept at their values from the start of the phase while the main stage trains."""
    needs_old_model = True

    def __init__(self, options, services):
        super().__init__(options, services)
        self.frozen: list[tuple[torch.Tensor, torch.Tensor]] | None = None   # (parameter, its old rows)

    def new_classes(self, phase, model, data):
        head = model.head
        per = head.weight.shape[0] // phase.seen          # rows per class (LSC: proxies)
        self.frozen = [(p, p[: phase.num_old * per].detach().clone())
                       for p in (head.weight, getattr(head, "bias", None)) if p is not None]

    def constrain(self, model):
        if self.frozen is not None:
            with torch.no_grad():
                for p, rows in self.frozen:
                    p[: len(rows)] = rows

    def phase_end(self, phase, model, data):
        self.frozen = None


@register("head", "weight-clip")
class WeightClip(Component):
    """WA's weight clipping (Zhao et al. 2020, Sec. 3.3): non-negative head weights after every
    optimizer step of the main stage, in every phase (``calibration.clip_nonnegative``)."""

    def constrain(self, model):
        clip_nonnegative(model.head.weight)
