"""The recipes built for pre-trained backbones: a frozen backbone and a closed-form head. They run
on any backbone (a pre-trained one with ``--weights``, or one cilearn trains in phase 0) and train
nothing in the phases whose schedule has no epochs: their classifier comes from the head's
``after_training`` (``cilearn.simplecil``, ``cilearn.ranpac``), the embeddings from the run's
embedding cache (``cilearn.embeddings``). docs/methods/simplecil-ranpac.md."""
from __future__ import annotations

from . import schedules
from .recipe import Recipe, register_recipe

# SimpleCIL: the backbone as given from phase 0 on (PILOT models/simplecil.py trains nothing), class
# means of its embeddings as a cosine classifier's rows
SIMPLECIL = register_recipe(Recipe(
    "simplecil", schedules.SIMPLECIL, "prototype", "ce", constraints=("freeze-backbone",),
    options={"freeze-backbone": {"after": -1}},
    summary="frozen backbone (as given), class means of its embeddings as a cosine classifier's rows; no training",
    paper="Zhou et al., *Revisiting Class-Incremental Learning with Pre-Trained Models: Generalizability and "
          "Adaptivity are All You Need*, IJCV 2024"))

# RanPAC: the first session trains the backbone (the official code adapts a ViT with a PETL method,
# RanPAC.py:225-236; here the backbone itself, or nothing with components.freeze-backbone.after -1),
# then freezes it; random projection + ridge regression from the accumulated statistics
RANPAC = register_recipe(Recipe(
    "ranpac", schedules.RANPAC, "ridge", "ce", constraints=("freeze-backbone",),
    summary="phase 0 trains the backbone, then frozen; random projection (M 10000) + ReLU, Gram matrix and class "
            "sums accumulated, ridge classifier (lambda chosen each phase)",
    paper="McDonnell et al., *RanPAC: Random Projections and Pre-trained Models for Continual Learning*, "
          "NeurIPS 2023"))
