"""LwM: Learning without Memorizing (Dhar et al., CVPR 2019)."""
from __future__ import annotations

from . import schedules
from .base import METHODS, Method


@METHODS.register("lwm")
class LwM(Method):
    """LwF + attention distillation: ``L = L_C + beta * KD(T = 2) + gamma * L_AD`` (Eq. 3), with
    L_AD the L1 distance of the L2-normalised Grad-CAMs of student and teacher on the last conv
    stage, for the teacher's top old class (Sec. 3), and L_C LwF's classification loss (``lwf``'s
    ``ce-local``: CE over the classes with training samples, i.e. the new ones when exemplar-free).
    beta = gamma = 1 (``--loss.kd-weight``, ``--loss.attention-weight``): Eq. 3 introduces them
    without values (Sec. 4; FACIL's authors note the same). Exemplar-free by default;
    ``--memory N`` adds exemplars (herding) like any method, and ``ce-local`` is then plain CE."""
    cls_loss = "ce-local"
    distill = "kd"
    terms = ("attention",)
    training = schedules.LWM
