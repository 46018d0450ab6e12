"""SimpleCIL's classifier (Zhou et al., "Revisiting class-incremental learning with pre-trained
models", IJCV 2024, Sec. 4): the class means of a frozen backbone's embeddings as the rows of a
cosine classifier, head component ``prototype`` (``--model.head prototype``, any recipe).

As PILOT's ``models/simplecil.py`` (sun-hailong/LAMDA-PILOT): after the phase's training (none
in SimpleCIL, the adaptation in APER) each new class's row is the mean of the embeddings of its
training images seen through the test transform (``replace_fc``, simplecil.py:27-50, the
``mode="test"`` loader of line 66), unnormalised (the cosine classifier normalises rows and
embeddings, ``backbone/linears.py`` ``CosineLinear.forward``:57-67), with its scale sigma
initialised to 1 (``reset_parameters``:51-55) and never trained; the old classes' rows are kept.
With a frozen backbone the embeddings come from the run's embedding cache (``cilearn.embeddings``).
"""
from __future__ import annotations

import time

import torch

from .components import register
from .models.heads import CosineHeadFactory
from .train import FitResult


@torch.no_grad()
def set_prototypes(weight: torch.Tensor, emb: torch.Tensor, y: torch.Tensor, classes: range) -> None:
    """Rows ``classes`` of ``weight`` ``[K, D]`` set to the mean of the embeddings ``emb`` ``[N, D]``
    of each class (labels ``y`` ``[N]``), one class at a time (a deterministic sum order on every
    device); a class without images keeps its row."""
    for c in classes:
        rows = emb[y == c]
        if len(rows):
            weight[c] = rows.float().mean(0).to(weight.dtype)


@register("head", "prototype")
class PrototypeHead(CosineHeadFactory):
    """A cosine classifier (``CosineHead``, scale ``--model.scale``, 1 as PILOT's) whose new rows are
    set, after each phase's training, to the class means of the new classes' training images
    (test view). Old rows are kept: with a frozen backbone the classifier after any sequence of
    phases is the one of a single phase on all the classes."""

    def after_training(self, ctx) -> FitResult:
        start = time.perf_counter()
        new = (ctx.y >= ctx.phase.start).nonzero().flatten()
        emb = self.services.embed(ctx.model, ctx.x[new])                     # [N_new, D]
        set_prototypes(ctx.model.head.weight, emb, ctx.y[new], ctx.phase.classes)
        return FitResult(time.perf_counter() - start, len(new), {})
