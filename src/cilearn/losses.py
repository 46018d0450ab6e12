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
    """iCaRL's classification loss (Rebuffi et al. 2017, Alg. 3): one sigmoid per class against
    one-hot targets, summed over classes, mean over the batch. (The paper's code averages over
    classes too and compensates with lr 2.0; summing keeps the usual lr 0.1 of CE usable.)"""
    target = F.one_hot(y, logits.shape[1]).float()
    return F.binary_cross_entropy_with_logits(logits.float(), target, reduction="sum") / logits.shape[0]


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
    sigmoids as soft targets, summed over old classes, mean over the batch (Rebuffi et al. 2017,
    Alg. 3; ``T`` is unused)."""
    target = torch.sigmoid(teacher.float())
    return F.binary_cross_entropy_with_logits(student.float(), target, reduction="sum") / student.shape[0]


DISTILL: Registry = Registry("distillation")
DISTILL.register("kd")(kd_kl)
DISTILL.register("bce")(kd_bce)
