"""DER: Dynamically Expandable Representation for Class Incremental Learning (Yan, Xie & He, CVPR
2021), with and without CIM's compressed exemplars.

* a new extractor per phase, the old ones frozen (parameters and BatchNorm statistics), the
  embeddings concatenated into the super-feature (``Recipe.expandable``: the net grows by one
  extractor before each phase > 0; the frozen extractors' embedding is the old model's, taken from
  its cached outputs); one linear head over all seen classes on it, trained with CE
  ("expandable representation learning"; ``--loss bsce`` composes);
* the auxiliary classifier on the new extractor's features over the new classes + one bucket for
  all old classes, ``L = L_H + lambda_a L_Ha``, lambda_a = 1 (the ``aux-ce`` term,
  ``--loss.aux-weight``);
* herding exemplars; the classifier-learning stage: the head retrained on class-balanced data after
  each phase > 0 (``balanced-finetune``, head only, backbone frozen; 30 epochs at 0.1, x0.1 at
  epoch 15, weight decay 5e-4: the official "decouple" stage, exps/der_womask/*/configs/1.yaml).

Not included: the channel-level masks with sparsity loss and the pruning after each phase (the
paper's "dynamical expansion"): cilearn's DER is the paper's "DER w/o P" (its parameter count grows
by one full extractor per phase, reported per phase in ``metrics.json``). The temperature of the
classifier-learning stage is not applied. CNN and NME (on the super-feature) are reported.
"""
from __future__ import annotations

from dataclasses import replace

from . import schedules
from .recipe import Recipe, register_recipe

DER = register_recipe(Recipe(
    "der", schedules.DER, "linear", "ce", terms=("aux-ce",), exemplars=True, expandable=True, calibration=("balanced-finetune",),
    options={"balanced-finetune": {"epochs": 30, "lr": 0.1}},
    summary="one new extractor per phase, old ones frozen, features concatenated; CE + auxiliary CE (new classes "
            "+ one old bucket) on the new features; herding; head retrained on class-balanced exemplars; CNN and "
            "NME. No channel-mask pruning (\"DER w/o P\")",
    paper="Yan, Xie & He, *DER: Dynamically Expandable Representation for Class Incremental Learning*, CVPR 2021"))

# DER with CIM's compressed exemplars (Luo et al. 2023): the budget is in full-image units
DER_CIM = register_recipe(replace(
    DER, name="der-cim", compressor="cim",
    summary="`der` with CIM-compressed exemplars (`--compressor cim`)",
    paper="Luo, Liu, Schiele & Sun, *Class-Incremental Exemplar Compression for Class-Incremental Learning*, "
          "CVPR 2023"))
