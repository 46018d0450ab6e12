"""Grad-CAM attention maps and LwM's attention distillation (Dhar et al., "Learning without
Memorizing", CVPR 2019, Sec. 3). Pure functions of tensors except ``lwm_attention_loss``, which
runs the frozen teacher. Shapes: maps ``[B, C, H, W]``, logits ``[B, K]``, classes ``[B]``
(int64), attention maps ``[B, H, W]``.

LwM's loss is ``L = L_C + beta * L_D + gamma * L_AD``: ``L_D`` is LwF's logit distillation
(``cilearn.losses.kd_kl``) and ``L_AD`` the attention distillation below, between the Grad-CAM
of the student and of the teacher, both for ``b``, the teacher's top old class.

BatchNorm and batched Grad-CAM
------------------------------
``gradcam`` differentiates the *sum* of the batch's selected scores with one ``autograd.grad``
call. The gradient that reaches ``maps[b]`` is then ``sum_b' d z_b'[cls b'] / d maps[b]``;
it equals the sample's own ``d z_b[cls b] / d maps[b]`` exactly when no operation *between the
maps and the logits* mixes samples. In ``IncrementalNet`` that part is the spatial mean and the
head, both per-sample, so the batched map is exact in train and in eval mode (tests show the
cross-sample gradients are exactly 0 and batched == one score at a time). A batch-coupled layer
there (e.g. a BatchNorm1d on the embedding in train mode) would add cross terms: those only flow
through its batch statistics (``tests/test_attention.py`` shows they are non-zero).
BatchNorm *before* the maps (the backbone's) does not couple the gradients, but in train mode it
changes the maps' values: they are normalised with the batch's statistics, so a sample's map
depends on the rest of its batch and differs from its eval-mode map (running statistics).
Consequence for LwM: the two maps must come from the same BN mode, or L_AD compares BatchNorm
modes instead of attention (with the student equal to the teacher at a phase's start, a
train-mode student map against an eval-mode teacher map gave L_AD = 3.77 on a digits batch, not
0). The ``attention`` term component therefore takes the student's map from a second student
forward in eval mode (``create_graph=True``, so the gradient still reaches the student's
parameters), like the teacher's (FACIL's choice); ``components.attention.student_bn train`` keeps
the training forward's map. ``lwm_attention_loss`` below takes a given student output as it is.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .models.net import IncrementalNet, NetOutput


def gradcam(maps: torch.Tensor, logits: torch.Tensor, cls: torch.Tensor, create_graph: bool,
            retain_graph: bool = True) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al. 2017, Eqs. 1-2; LwM Sec. 3) of class ``cls[b]`` for each sample:

    ``alpha[b, k] = mean_{h,w} d logits[b, cls[b]] / d maps[b, k, h, w]``,
    ``cam[b] = ReLU(sum_k alpha[b, k] * maps[b, k])``.

    ``maps``: ``[B, C, H, W]``, a tensor of the graph that produced ``logits`` ``[B, K]`` (it must
    require grad); ``cls``: ``[B]`` int64. Returns ``[B, H, W]`` in float32 (also under autocast).

    Vectorised: the selected scores ``logits.gather(1, cls[:, None])`` are summed and one
    ``autograd.grad`` call gives every sample its own gradient. This is exact because samples are
    independent downstream of ``maps``: the gradient of ``z_b'`` w.r.t. ``maps[b]`` is zero for
    ``b' != b`` unless a batch-coupled layer (BatchNorm in train mode) sits between ``maps`` and
    ``logits``; in this library's nets only the spatial mean and the head do, so the result is
    exact in either mode (see the module docstring for BN before the maps).

    ``create_graph=True`` keeps the graph of the gradients, so the map is differentiable w.r.t.
    the network's parameters through both the activations ``maps`` and the weights ``alpha``
    (LwM needs this for the student; FACIL's LwM detaches both, so its L_AD has zero gradient).
    With a linear head on the spatial mean, ``alpha[b, k] = W[cls b, k] / (H W)`` for any maps, so
    that second path reaches only the head's rows of the classes in ``cls``.
    ``retain_graph`` (default True) keeps the forward graph for the caller's later backward.
    """
    if not maps.requires_grad:
        raise ValueError("gradcam: maps does not require grad (was the forward run under no_grad, "
                         "or are the network's parameters frozen? see lwm_attention_loss)")
    cls = cls.to(device=logits.device, dtype=torch.long)
    with torch.enable_grad():
        score = logits.gather(1, cls[:, None]).float().sum()
        (grad,) = torch.autograd.grad(score, maps, create_graph=create_graph, retain_graph=retain_graph)
        alpha = grad.float().mean((2, 3))                                   # [B, C]
        # elementwise product + sum, not einsum: autocast would run einsum's bmm in half precision
        return F.relu((alpha[:, :, None, None] * maps.float()).sum(1))     # [B, H, W]


def attention_distillation(cam_student: torch.Tensor, cam_teacher: torch.Tensor,
                           eps: float = 1e-8) -> torch.Tensor:
    """LwM's attention distillation loss (Dhar et al. 2019, Sec. 3, L_AD):

    ``L_AD = mean_b sum_j | Q_s[b, j] / ||Q_s[b]||_2 - Q_t[b, j] / ||Q_t[b]||_2 |``,

    with ``Q[b]`` the map ``[H, W]`` of sample ``b`` vectorised (``j`` runs over the ``H W``
    positions): the L1 distance of the per-image L2-normalised maps, mean over the batch.
    ``cam_student``, ``cam_teacher``: ``[B, H, W]``. Zero when the maps are equal, invariant to
    scaling either map by a positive constant (up to ``eps``); an all-zero map is divided by
    ``eps`` instead of its norm, which keeps the loss and its gradient finite. Returns a scalar
    (float32).
    """
    if cam_student.shape != cam_teacher.shape:
        raise ValueError(f"attention_distillation: student map {tuple(cam_student.shape)} and "
                         f"teacher map {tuple(cam_teacher.shape)} differ")
    qs = F.normalize(cam_student.flatten(1).float(), p=2, dim=1, eps=eps)
    qt = F.normalize(cam_teacher.flatten(1).float(), p=2, dim=1, eps=eps)
    return (qs - qt).abs().sum(1).mean()


def teacher_gradcam(teacher_net: "IncrementalNet", x: torch.Tensor,
                    num_old: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The frozen teacher's Grad-CAM for its top old class.

    Returns ``(cam [B, H, W] float32 detached, b [B] int64, logits [B, K_t] detached)`` with
    ``b = argmax(logits[:, :num_old])``. The teacher runs in eval mode (it is switched there for
    the call and switched back if it was training, so its BN statistics never change); its
    parameters get no gradient. Since the teacher is frozen, these outputs depend on ``x`` only
    and may be cached per image (as ``services.OldOutputs`` does for logits).
    """
    if num_old <= 0:
        raise ValueError(f"teacher_gradcam: num_old must be positive, got {num_old}")
    was_training = teacher_net.training
    teacher_net.eval()
    try:
        # The teacher's parameters do not require grad, so a plain forward would give maps that
        # do not require grad either. The simplest correct fix for any backbone: make the *input*
        # require grad (a fresh leaf, detached from the caller's graph) under enable_grad, so
        # every activation, maps[-1] included, is in a graph. Parameters stay untouched
        # (grad None); the graph is local to this call and freed when it returns.
        with torch.enable_grad():
            xin = x.detach().requires_grad_(True)
            out = teacher_net(xin)
            logits = out.logits.detach()
            b = logits[:, :num_old].float().argmax(1)
            cam = gradcam(out.maps[-1], out.logits, b, create_graph=False, retain_graph=False)
    finally:
        if was_training:
            teacher_net.train()
    return cam.detach(), b, logits


def lwm_attention_loss(student_out: "NetOutput", teacher_net: "IncrementalNet", x: torch.Tensor,
                       num_old: int, create_graph: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """LwM's attention distillation term for one batch: ``(L_AD, b)``.

    ``student_out``: the ``NetOutput`` of the student's training forward on ``x`` (reused: its
    ``maps[-1]`` ``[B, C, H, W]`` and ``logits`` ``[B, K_old + K_new]``, no second student
    forward); ``teacher_net``: the frozen previous model (``frozen_copy()``), run here on ``x``;
    ``num_old``: the number of old classes. ``b = argmax`` of the teacher's logits over the old
    classes ``[:num_old]``, the class of both maps (LwM Sec. 3: the teacher's top base class).
    The teacher's map is computed without a graph and detached; the student's with
    ``create_graph`` (True: L_AD trains the student through its activations and its Grad-CAM
    weights). Both maps are float32, also when called under ``torch.autocast``. Returns the
    scalar ``attention_distillation(cam_student, cam_teacher)`` and ``b`` ``[B]``.
    """
    cam_t, b, _ = teacher_gradcam(teacher_net, x, num_old)
    cam_s = gradcam(student_out.maps[-1], student_out.logits, b, create_graph=create_graph)
    return attention_distillation(cam_s, cam_t), b
