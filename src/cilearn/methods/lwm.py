"""LwM: Learning without Memorizing (Dhar et al., CVPR 2019): LwF + attention distillation,
``L = L_C + beta * KD(T = 2) + gamma * L_AD`` (Eq. 3), with L_AD the L1 distance of the
L2-normalised Grad-CAMs of student and old model on the last conv stage, for the old model's top
old class (Sec. 3), and L_C LwF's classification loss (``ce-local``: CE over the classes with
training samples, i.e. the new ones when exemplar-free). beta = gamma = 1 (``--loss.kd-weight``,
``--loss.attention-weight``): Eq. 3 introduces them without values (Sec. 4; FACIL's authors note
the same). Exemplar-free by default; ``--memory N`` adds exemplars (herding) like any method, and
``ce-local`` is then plain CE."""
from __future__ import annotations

from dataclasses import replace

from . import schedules
from .baselines import LWF
from .recipe import register_recipe

LWM = register_recipe(replace(
    LWF, name="lwm", training=schedules.LWM, terms=("kd", "attention"),
    summary="LwF + attention distillation: `ce-local` + beta KD(T=2) + gamma L_AD, exemplar-free",
    paper="Dhar et al., *Learning without Memorizing*, CVPR 2019"))
