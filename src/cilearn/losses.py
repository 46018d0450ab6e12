"""Loss terms: pure functions of tensors. Shapes: logits ``[B, K]``, labels ``[B]`` (int64).

Classification losses are registered in ``CLS_LOSSES`` as ``fn(logits, y, counts) -> scalar``;
``counts`` (``[K]`` float, training samples per class in this phase) is for prior-aware losses
(``bsce``) and ignored by the others.
"""
from __future__ import annotations

import math

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


# n_j = 0 is floored at this count in the balanced softmax (see ``balanced_softmax_ce``).
BSCE_MIN_COUNT = 1e-4


@CLS_LOSSES.register("bsce")
def balanced_softmax_ce(logits: torch.Tensor, y: torch.Tensor, counts: torch.Tensor | None = None) -> torch.Tensor:
    """Balanced Softmax CE (Jodelet, Liu & Murata 2021, after Ren et al. 2020):
    ``-log(n_y e^{z_y} / sum_j n_j e^{z_j}) = CE(z + log n, y)``, mean over the batch.

    ``counts`` ``[K]``: training samples of each class in this phase (new-class images and each old
    class's exemplars, recomputed every phase); ``logits`` are whatever the head outputs (for the
    cosine head the scaled ``sigma * cos``). Only the training loss changes: inference uses the
    raw logits.

    A class with ``n_j = 0`` (e.g. the old classes of an exemplar-free method, ``lwf --loss bsce``)
    has prior 0: the exact limit, ``log 0 = -inf``, takes it out of the training softmax. ``-inf``
    is kept out of the arithmetic (it gives NaN in ``inf - inf`` and an infinite loss for a sample
    whose own class has no count), so ``n`` is floored at ``BSCE_MIN_COUNT = 1e-4``: the class's
    log-prior is ``log 1e-4 = -9.2``, i.e. ``9.2 + log n_k`` nats below every class k with samples
    (13.8 nats, a factor 1e-6, below a class with 100 samples). Its probability, and with it the
    gradient pushing its logit down, is ~0 unless its logit exceeds the others' by about that
    much, in which case it is pushed down as in plain CE. Everything stays finite."""
    if counts is None:
        raise ValueError("bsce needs the per-class training counts")
    prior = torch.log(counts.float().clamp_min(BSCE_MIN_COUNT)).to(logits.device)   # [K]
    return F.cross_entropy(logits.float() + prior, y)


def less_forget(emb: torch.Tensor, emb_old: torch.Tensor) -> torch.Tensor:
    """LUCIR's less-forget constraint (Hou et al. 2019, Eq. 4, "feature" form):
    ``mean_b (1 - cos(f_old(x_b), f_new(x_b)))``. ``emb``, ``emb_old``: ``[B, D]`` embeddings of
    the student and of the frozen teacher. 0 when the directions agree; the weight
    (``lucir_lambda``) is applied by the caller."""
    return (1 - F.cosine_similarity(emb.float(), emb_old.float(), dim=1)).mean()


def lucir_lambda(base: float, num_old: int, num_new: int) -> float:
    """LUCIR's adaptive less-forget weight ``lambda_base * sqrt(|O| / |C_t|)`` (Sec. 3.2):
    |O| old classes, |C_t| new classes of this phase."""
    return base * math.sqrt(num_old / num_new)


def margin_ranking(scores: torch.Tensor, y: torch.Tensor, num_old: int, k: int = 2,
                   margin: float = 0.5) -> torch.Tensor:
    """LUCIR's inter-class separation (Sec. 3.3, Eq. 6): for every sample of an old class
    (an exemplar), its ground-truth score must exceed each of the ``k`` highest new-class scores
    by ``margin``: ``mean over (old samples, k) of max(0, margin - s_y + s_hard)``.

    ``scores`` ``[B, K]``: cosine similarities (before the scale sigma) over all seen classes,
    new classes at ids ``>= num_old``; ``y`` ``[B]``. Averaged over the old-class samples and the
    ``k`` negatives (the official code's mean); 0 when the batch holds no old-class sample.
    ``k`` is capped at the number of new classes."""
    if scores.shape[1] <= num_old or num_old == 0:
        return scores.new_zeros((), dtype=torch.float32)
    s = scores.float()
    k = min(k, s.shape[1] - num_old)
    old = (y < num_old).float()[:, None]                          # [B, 1] (masked, no host sync)
    gt = s.gather(1, y[:, None])                                  # [B, 1]
    hard = s[:, num_old:].topk(k, dim=1).values                   # [B, k]
    hinge = (margin - gt + hard).clamp_min(0) * old               # [B, k]
    return hinge.sum() / (old.sum() * k).clamp_min(1)


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
