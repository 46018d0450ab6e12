"""FOSTER: Feature Boosting and Compression for Class-Incremental Learning (Wang, Zhou, Ye & Zhan,
ECCV 2022), with and without CIM's compressed exemplars. Each phase > 0 in two stages of the one
training loop:

1. **Feature boosting** (sections "feature boosting" and "calibration for old and new"; the main
   stage): the previous (single-extractor) model frozen + a new extractor, features concatenated,
   one linear head over all seen classes (old classes' weights on the old features from the
   previous head, all of it trained: the official ``oofc = ft``). Loss: logit-adjusted CE
   ``CE(z / w, y)`` with effective-number class weights, beta1 = 0.96 (``la-ce``,
   ``--loss.la-beta``; ``--loss bsce`` composes instead) + feature enhancement, CE of an auxiliary
   head on the new extractor's features over all seen classes (``aux-ce`` with targets ``seen``,
   weight 1) + KD(T = 2) of the old logits to the previous model's (``kd``, weight 1).
2. **Feature compression** (section "feature compression"; the ``feature-compression`` stage): a
   single-extractor student, initialised from the previous model, distilled from the frozen
   boosted model with the class-balanced KD (beta2 = 0.97, T = 2) on the same data, the official
   130 epochs on CIFAR and image folders (the phase's on the quick data sets or with ``--epochs``).

beta1 / beta2 are the official CIFAR-100 configuration's. Phase 0 is plain CE (equal counts: the
logit adjustment is the identity). Herding exemplars; CNN and NME. Not included: the optional
weight aligning of teacher or student (off in the official configurations). foster-cim: on image
folders batch 256, as the official CIM configurations.
"""
from __future__ import annotations

from dataclasses import replace

from . import schedules
from .recipe import Recipe, register_recipe

FOSTER = register_recipe(Recipe(
    "foster", schedules.FOSTER, "linear", "la-ce", terms=("kd", "aux-ce"), exemplars=True, expandable=True,
    stages=("feature-compression",), options={"aux-ce": {"targets": "seen"}},
    summary="per phase: boosting (frozen old extractor + new one; logit-adjusted CE with effective-number "
            "weights + CE of the new branch + KD(T=2) on the old logits), then compression into one extractor by "
            "class-balanced KD; herding; CNN and NME",
    paper="Wang, Zhou, Ye & Zhan, *FOSTER: Feature Boosting and Compression for Class-Incremental Learning*, "
          "ECCV 2022"))

FOSTER_CIM = register_recipe(replace(
    FOSTER, name="foster-cim", compressor="cim", training=schedules.FOSTER_CIM,
    summary="`foster` with CIM-compressed exemplars (`--compressor cim`; any exemplar method takes "
            "`--compressor full / cam-threshold / cim`)",
    paper="Luo, Liu, Schiele & Sun, *Class-Incremental Exemplar Compression for Class-Incremental Learning*, "
          "CVPR 2023"))
