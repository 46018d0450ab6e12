"""WA: Maintaining Discrimination and Fairness in Class Incremental Learning (Zhao et al., CVPR 2020),
and BiC: Large Scale Incremental Learning (Wu et al., CVPR 2019).

WA: iCaRL's CE + KD on data + exemplars (herding), with the weighting the paper takes from BiC:
``(1 - lambda) CE + lambda KD(T = 2)`` on the old logits, ``lambda = |old| / |seen|`` (Sec. 3: the
classification and KD weights null; T = 2 is PyCIL's value, the paper's could not be checked
here). After the training of each phase > 0, weight aligning rescales the new classes' head rows
to the old rows' mean norm; weight clipping keeps the head weights non-negative after every
optimizer step, in all phases (Sec. 3.3; ``--train.weight-clip false`` / ``--train.weight-align
false`` turn them off). Reports CNN and NME.

BiC: exemplars (herding) and the paper's first stage, the same ``(1 - lambda) CE + lambda KD``
(Sec. 4.1), on the phase's data and exemplars minus a held-out validation split; then the bias
correction (``--calibration bic``: an affine layer on the new classes' logits trained on the split
with the model frozen), whose corrected logits the evaluation and the next phase's old model use.
No weight clipping or aligning (WA's). Reports CNN and NME.
"""
from __future__ import annotations

from dataclasses import replace

from . import schedules
from .baselines import ICARL
from .recipe import register_recipe

# the classification and KD weights null: (1 - l) CE + l KD with l = |old| / |seen|
BALANCED_KD = {"classification": {"weight": None}, "kd": {"weight": None}}

WA = register_recipe(replace(
    ICARL, name="wa", training=schedules.WA, calibration=("weight-align",), constraints=("weight-clip",),
    options=BALANCED_KD,
    summary="iCaRL-style `(1 - l) CE + l KD(T=2)`, `l = old/seen`, non-negative head weights (clipping), weight "
            "aligning after each phase; CNN and NME",
    paper="Zhao et al., *Maintaining Discrimination and Fairness in Class Incremental Learning*, CVPR 2020"))

BIC = register_recipe(replace(
    WA, name="bic", training=schedules.BIC, calibration=("bic",), constraints=(),
    summary="iCaRL/WA-style `(1 - l) CE + l KD(T=2)` on the phase's data minus a held-out split, then BiC's bias "
            "correction (`--calibration bic`): `alpha z + beta` on the new classes' logits trained on the split with "
            "the model frozen; CNN and NME",
    paper="Wu et al., *Large Scale Incremental Learning*, CVPR 2019"))
