"""LwM: Learning without Memorizing (Dhar et al., CVPR 2019)."""
from __future__ import annotations

from .base import METHODS, Method


@METHODS.register("lwm")
class LwM(Method):
    """LwF + attention distillation: ``L = CE + beta * KD(T = 2) + gamma * L_AD`` (Eq. 3), with
    L_AD the L1 distance of the L2-normalised Grad-CAMs of student and teacher on the last conv
    stage, for the teacher's top old class (Sec. 3). beta = gamma = 1 (``--loss.kd-weight``,
    ``--loss.attention-weight``): the paper gives no values (Sec. 4). Exemplar-free by default;
    ``--memory N`` adds exemplars (herding) like any method."""
    distill = "kd"
    terms = ("attention",)
