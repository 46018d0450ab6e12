"""Loss terms: pure functions of tensors. Shapes: logits ``[B, K]``, labels ``[B]`` (int64).

Classification losses are registered in ``CLS_LOSSES`` as ``fn(logits, y, counts) -> scalar``;
``counts`` (``[K]`` float, training samples per class in this phase) is for prior-aware losses and
ignored by the others.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import Registry

CLS_LOSSES: Registry = Registry("classification loss")


@CLS_LOSSES.register("ce")
def cross_entropy(logits: torch.Tensor, y: torch.Tensor, counts: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax cross-entropy, mean over the batch."""
    return F.cross_entropy(logits.float(), y)


@CLS_LOSSES.register("bce")
def binary_cross_entropy(logits: torch.Tensor, y: torch.Tensor, counts: torch.Tensor | None = None) -> torch.Tensor:
    """iCaRL's classification loss: one sigmoid per class against one-hot targets,
    mean over batch and classes (Rebuffi et al. 2017, Alg. 3)."""
    target = F.one_hot(y, logits.shape[1]).float()
    return F.binary_cross_entropy_with_logits(logits.float(), target)


def kd_kl(student: torch.Tensor, teacher: torch.Tensor, T: float) -> torch.Tensor:
    """Logit distillation (Hinton et al.; LwF with T = 2):
    ``mean_b sum_j p_j log(p_j / q_j)``, ``p = softmax(teacher / T)``, ``q = softmax(student / T)``.
    No T^2 factor (as LwF and PyCIL). Zero when student == teacher. ``student``, ``teacher``:
    ``[B, K_old]``, the old-class logits."""
    log_q = F.log_softmax(student.float() / T, dim=1)
    log_p = F.log_softmax(teacher.float() / T, dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(1).mean()


def kd_bce(student: torch.Tensor, teacher: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """iCaRL's distillation: BCE of the student's old-class sigmoids against the teacher's
    sigmoids as soft targets, mean over batch and old classes (Rebuffi et al. 2017, Alg. 3)."""
    return F.binary_cross_entropy_with_logits(student.float(), torch.sigmoid(teacher.float()))


DISTILL: Registry = Registry("distillation")
DISTILL.register("kd")(kd_kl)
DISTILL.register("bce")(kd_bce)
