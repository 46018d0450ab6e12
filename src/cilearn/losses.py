"""Loss terms: pure functions of tensors. Shapes: logits ``[B, K]``, labels ``[B]`` (int64).

Classification losses are ``fn(logits, y, counts) -> scalar``; ``counts`` (``[K]`` float, training
samples per class in this phase) is for prior-aware losses (``bsce``) and ignored by the others.
The components that use them (their options, their weights) are in ``cilearn.classification``
and ``cilearn.terms``.
"""
from __future__ import annotations

import math
import torch
import torch.nn.functional as F

def cross_entropy(logits: torch.Tensor, y: torch.Tensor, counts: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax cross-entropy, mean over the batch."""
    return F.cross_entropy(logits.float(), y)


def local_cross_entropy(logits: torch.Tensor, y: torch.Tensor, counts: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax CE over the classes that have training samples in this phase (``counts > 0``),
    mean over the batch. Without exemplars these are the new classes: LwF's new-task loss
    ``L_new`` on the new classes' outputs (Li & Hoiem 2016, Sec. 3), as PyCIL's and FACIL's
    class-incremental LwF compute it, so the classification loss does not push the old logits
    down; with exemplars every seen class has samples and it is plain CE. ``counts`` None: CE."""
    z = logits.float()
    if counts is not None:
        z = z.masked_fill((counts == 0).to(z.device), float("-inf"))    # [B, K]; y always present
    return F.cross_entropy(z, y)


def binary_cross_entropy(logits: torch.Tensor, y: torch.Tensor, counts: torch.Tensor | None = None) -> torch.Tensor:
    """iCaRL's classification loss (Rebuffi et al. 2017, Alg. 3): one sigmoid per class against
    one-hot targets, summed over classes, mean over the batch. (The paper's code averages over
    classes too and compensates with lr 2.0; summing keeps the usual lr 0.1 of CE usable.)"""
    target = F.one_hot(y, logits.shape[1]).float()
    return F.binary_cross_entropy_with_logits(logits.float(), target, reduction="sum") / logits.shape[0]


# n_j = 0 is floored at this count in the balanced softmax (see ``balanced_softmax_ce``).
BSCE_MIN_COUNT = 1e-4


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
    # The softmax ignores a common shift; taking the max out makes the prior exactly 0 when all
    # counts are equal (a base phase), so BSCE is then bit-identical to CE, not CE up to rounding.
    return F.cross_entropy(logits.float() + (prior - prior.max()), y)


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


def dual_teacher_joint_target(old_t: torch.Tensor, new_t: torch.Tensor, num_old: int, T: float) -> torch.Tensor:
    """DT-ID's joint target (cilearn's rule; docs/methods/dfgr-dtid.md): logits ``[B, K_seen]``
    whose softmax at temperature T is one distribution over all seen classes, the old block from
    the old teacher ``old_t`` ``[B, K_old]``, the new block from the new teacher ``new_t``
    ``[B, K_seen]``, the new block shifted per sample by
    ``c = T (LSE(old_t / T) - LSE(new_t[:, :K_old] / T))``: the new teacher's old-class logits are
    calibrated onto the old teacher's, so that the target keeps the new teacher's odds of new
    against old classes, the old teacher's distribution within the old classes and the new
    teacher's within the new ones."""
    old_t, new_t = old_t.float(), new_t.float()
    c = T * (torch.logsumexp(old_t / T, 1) - torch.logsumexp(new_t[:, :num_old] / T, 1))    # [B]
    return torch.cat([old_t, new_t[:, num_old:] + c[:, None]], 1)


def kd_bce(student: torch.Tensor, teacher: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """iCaRL's distillation: BCE of the student's old-class sigmoids against the teacher's
    sigmoids as soft targets, summed over old classes, mean over the batch (Rebuffi et al. 2017,
    Alg. 3; ``T`` is unused)."""
    target = torch.sigmoid(teacher.float())
    return F.binary_cross_entropy_with_logits(student.float(), target, reduction="sum") / student.shape[0]


def nca(logits: torch.Tensor, y: torch.Tensor, counts: torch.Tensor | None = None,
        margin: torch.Tensor | float = 0.0) -> torch.Tensor:
    """PODNet's NCA loss on the local-similarity classifier (Douillard et al. 2020, Eq. 7):
    ``mean_b [ -log( exp(z_y - margin) / sum_{i != y} exp(z_i) ) ]_+``, i.e.
    ``mean_b max(0, logsumexp_{i != y} z_i - (z_y - margin))``.

    ``logits`` ``[B, K]`` are the scaled scores ``eta * s`` (``LSCHead``); the paper's margin
    delta applies to the unscaled scores, ``eta (s_y - delta)``, so pass ``margin = eta * delta``
    (the ``nca`` component does this with its ``margin`` option, eta detached: with eta's gradient through
    the margin, ``d loss / d eta`` gets ``+delta`` wherever the hinge is active, which at
    initialisation (no separation yet) drives the learnt eta to 0 and the logits with it; measured
    on digits: 20% accuracy on 5 classes with it, 100% without). The positive class is left out of the denominator and the loss is
    hinged at 0, as the paper's equation (proxy-NCA form). The official code subtracts the margin
    from every logit, which cancels with the positive left out (its maintainer's issue #59):
    cilearn applies it to the target only, as the paper writes. ``counts`` is unused."""
    z = logits.float()
    pos = z.gather(1, y[:, None]).squeeze(1) - margin                      # [B]
    neg = z.masked_fill(F.one_hot(y, z.shape[1]).bool(), float("-inf"))    # [B, K], y excluded
    return (torch.logsumexp(neg, dim=1) - pos).clamp_min(0).mean()




def pod_vectors(maps: list[torch.Tensor]) -> list[torch.Tensor]:
    """PODNet's pooled descriptors (Douillard et al. 2020, Sec. 3.1, Eq. 2-3): per stage, ``h``
    ``[B, C, H, W]`` squared elementwise, sum-pooled over the width (``[B, C, H]``) and over the
    height (``[B, C, W]``), flattened, concatenated and L2-normalised per image:
    ``[B, C (H + W)]`` per stage."""
    out = []
    for h in maps:
        h2 = h.float().pow(2)
        out.append(F.normalize(torch.cat([h2.sum(3).flatten(1), h2.sum(2).flatten(1)], dim=1), dim=1))
    return out


def pod_distance(v: list[torch.Tensor], v_old: list[torch.Tensor]) -> torch.Tensor:
    """Euclidean distance between the student's and the teacher's ``pod_vectors``, mean over the
    batch, mean over the stages."""
    return sum((a - b).norm(dim=1).mean() for a, b in zip(v, v_old)) / len(v)


def pod_spatial(maps: list[torch.Tensor], maps_old: list[torch.Tensor]) -> torch.Tensor:
    """PODNet's POD-spatial distillation over the stages' maps (student, teacher); the weight
    (``lambda_c sqrt(seen / new)``) is applied by the caller."""
    return pod_distance(pod_vectors(maps), pod_vectors(maps_old))


def pod_flat(emb: torch.Tensor, emb_old: torch.Tensor) -> torch.Tensor:
    """PODNet's POD-flat (Sec. 3.1): Euclidean distance between the student's and the teacher's
    embeddings ``[B, D]``, mean over the batch. The weight is applied by the caller."""
    return (emb.float() - emb_old.float()).norm(dim=1).mean()


def effective_number_weights(counts: torch.Tensor, beta: float) -> torch.Tensor:
    """Class weights from the effective number of samples (Cui et al. 2019), as FOSTER uses them
    (Wang et al. 2022, "calibration for old and new"): ``w_j = (1 - beta) / (1 - beta^{n_j})``, normalised so that
    ``sum_j w_j = K``. ``counts`` ``[K]``: training samples per class in this phase; ``[K]`` out.
    Rare classes (old classes' exemplars) get large weights. A class with ``n_j = 0`` is counted
    as ``n_j = 1`` (``1 - beta^0 = 0`` would give an infinite weight). ``beta = 0`` gives equal
    weights."""
    n = counts.float().clamp_min(1.0)
    w = (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta, dtype=n.dtype, device=n.device), n))   # [K]
    return w / w.sum() * len(w)


def logit_adjusted_ce(logits: torch.Tensor, y: torch.Tensor, counts: torch.Tensor | None = None,
                      beta: float = 0.96) -> torch.Tensor:
    """FOSTER's logit-adjusted CE (Wang et al. 2022, "logits alignment"):
    ``CE(z / w, y)``, mean over the batch, with ``w`` the ``effective_number_weights`` of the
    phase's counts: a frequent (new) class's logit is divided by a small weight, i.e. enlarged
    during training, so that the model learns smaller raw logits for it and the bias towards the
    new classes shrinks at inference (raw logits). ``beta``: ``--loss.la-beta`` (0.96, the
    official CIFAR-100 configuration). ``counts`` None: plain CE."""
    z = logits.float()                                                   # [B, K]
    if counts is not None:
        z = z / effective_number_weights(counts, beta).to(z.device)
    return F.cross_entropy(z, y)


def balanced_kd(student: torch.Tensor, teacher: torch.Tensor, weights: torch.Tensor, T: float) -> torch.Tensor:
    """FOSTER's class-balanced distillation of the compression stage (Wang et al. 2022, "feature compression"):
    the teacher's ``p = softmax(teacher / T)`` is reweighted per class and renormalised,
    ``p'_j = w_j p_j / sum_k w_k p_k`` (``weights`` ``[K]``: ``effective_number_weights`` with
    beta2), and the student ``q = softmax(student / T)`` is pulled towards it:
    ``mean_b KL(p' || q) = mean_b sum_j p'_j (log p'_j - log q_j)`` (the cross-entropy of the
    paper up to the entropy of ``p'``, which has no gradient). ``student``, ``teacher``: ``[B, K]``
    over all seen classes. No T^2 factor. Zero when the student's softmax equals ``p'``."""
    log_q = F.log_softmax(student.float() / T, dim=1)                    # [B, K]
    p = F.softmax(teacher.float() / T, dim=1) * weights.to(student.device)[None]
    p = p / p.sum(1, keepdim=True)                                       # [B, K]
    return (p * (torch.log(p.clamp_min(1e-12)) - log_q)).sum(1).mean()
