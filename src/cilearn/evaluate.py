"""Evaluation after each phase and the summary metrics, as PyCIL/FACIL define them.

All accuracies are in percent. With ``a[i][j]`` = top-1 accuracy (CNN head, over all seen
classes' logits) on the test images of task j after phase i (the accuracy matrix, defined for
j <= i):
* ``acc_i``: top-1 on the test images of all classes seen after phase i;
* average incremental accuracy = mean_i acc_i (over all phases, the first included);
* last accuracy = acc of the final phase;
* ``acc_task`` (task-aware, or task-incremental, accuracy, as FACIL's "TAw" and Avalanche's
  task-incremental scenario): each test image's prediction is the argmax over the logits of the
  classes of its own task (the phase that brought its class) only, as if the task were given at
  test time; ``t[i][j]`` is that accuracy on task j after phase i (``accuracy_matrix_task``).
  It is an upper bound of ``acc`` and equals it after the first phase;
* ``acc_old_among_old`` (diagnostic): top-1 of the old classes' test images when only the old
  classes' logits compete: how much old knowledge survives apart from the bias towards new classes;
* ``acc_new_among_new`` (diagnostic): the same for the new classes' test images among the new
  classes' logits: whether the new classes were learnt, apart from the balance with the old ones;
* ``kd_target_entropy`` / ``kd_target_top_share`` (diagnostic, methods with a KD teacher,
  phases > 0): how spread the teacher's soft targets on the phase's training images are over the
  old classes (``kd_target_stats``);
* forgetting = mean over tasks j < T-1 of ``max_{j <= i < T-1} a[i][j] - a[T-1][j]``
  (Chaudhry et al. 2018; FACIL), 0 with a single phase;
* per-class accuracy ``c[i][k]`` (class k after phase i) and per-class forgetting
  ``max_{t_k <= i < T-1} c[i][k] - c[T-1][k]`` (t_k: the phase that brought class k), the same
  definition one class at a time (the HTML report's per-class view).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@torch.inference_mode()
def predict(net: torch.nn.Module, x: torch.Tensor, augmenter, batch_size: int,
            autocast_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [N, K], embeddings [N, D]) in eval mode, float32; restores the train/eval mode."""
    was_training = net.training
    net.eval()
    logits, embs = [], []
    for i in range(0, x.shape[0], batch_size):
        with torch.autocast(device_type=x.device.type, dtype=autocast_dtype or torch.bfloat16,
                            enabled=autocast_dtype is not None):
            out = net(augmenter.test(x[i:i + batch_size]))
        logits.append(out.logits.float())
        embs.append(out.embedding.float())
    net.train(was_training)
    if not logits:
        return torch.empty(0, 0, device=x.device), torch.empty(0, 0, device=x.device)
    return torch.cat(logits), torch.cat(embs)


def nme_predict(emb: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Nearest class mean (iCaRL): argmin_c || f/|f| - mu_c ||."""
    return torch.cdist(F.normalize(emb, dim=1), prototypes).argmin(1)


def accuracy(pred: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> float | None:
    if mask is not None:
        pred, y = pred[mask], y[mask]
    return None if len(y) == 0 else 100.0 * (pred == y).float().mean().item()


def topk_accuracy(logits: torch.Tensor, y: torch.Tensor, k: int) -> float:
    top = logits.topk(k, dim=1).indices
    return 100.0 * (top == y[:, None]).any(1).float().mean().item()


@dataclass
class PhaseEval:
    acc: float
    acc_nme: float | None
    top5: float | None
    acc_old: float | None
    acc_new: float
    acc_old_among_old: float | None     # old-class test images, argmax over the old classes' logits only
    acc_new_among_new: float            # new-class test images, argmax over the new classes' logits only
    task_acc: list[float]             # one per task seen so far (a row of the accuracy matrix)
    task_acc_nme: list[float] | None
    class_acc: list[float | None] | None = None   # one per seen class (incremental id); None: no test image
    acc_task: float | None = None       # task-aware: argmax over the logits of the image's own task only
    task_acc_task: list[float | None] | None = None   # task-aware, one per task seen so far


def evaluate_phase(logits: torch.Tensor, emb: torch.Tensor, y: torch.Tensor, bounds: list[tuple[int, int]],
                   prototypes: torch.Tensor | None) -> PhaseEval:
    """``logits``/``emb``: outputs on the test images of all seen classes, ``y`` their incremental
    ids; ``bounds``: (start, end) id range of each task so far, the last one being the new task."""
    pred = logits.argmax(1)
    pred_task = task_aware_predict(logits, y, bounds)
    nme = nme_predict(emb, prototypes) if prototypes is not None else None
    masks = [(y >= a) & (y < b) for a, b in bounds]
    new_start = bounds[-1][0]
    old = y < new_start
    return PhaseEval(
        acc=accuracy(pred, y),
        acc_nme=accuracy(nme, y) if nme is not None else None,
        top5=topk_accuracy(logits, y, 5) if logits.shape[1] >= 5 else None,
        acc_old=accuracy(pred, y, old) if new_start > 0 else None,
        acc_new=accuracy(pred, y, ~old),
        acc_old_among_old=accuracy(logits[:, :new_start].argmax(1), y, old) if new_start > 0 else None,
        acc_new_among_new=accuracy(logits[:, new_start:].argmax(1) + new_start, y, ~old),
        task_acc=[accuracy(pred, y, m) for m in masks],
        task_acc_nme=[accuracy(nme, y, m) for m in masks] if nme is not None else None,
        class_acc=per_class_accuracy(pred, y, bounds[-1][1]),
        acc_task=accuracy(pred_task, y),
        task_acc_task=[accuracy(pred_task, y, m) for m in masks],
    )


def task_aware_predict(logits: torch.Tensor, y: torch.Tensor, bounds: list[tuple[int, int]]) -> torch.Tensor:
    """Task-aware predictions ``[N]``: for an image whose id ``y`` lies in task ``[a, b)``, the
    argmax of ``logits[:, a:b]`` (plus ``a``). ``logits``: ``[N, K]``; ``bounds``: each task's id
    range; images outside every task keep the argmax over all logits."""
    pred = logits.argmax(1)
    for a, b in bounds:
        m = (y >= a) & (y < b)
        pred[m] = logits[m, a:b].argmax(1) + a
    return pred


def per_class_accuracy(pred: torch.Tensor, y: torch.Tensor, num_classes: int) -> list[float | None]:
    """Top-1 (%) of each class id ``0..num_classes-1`` on its own test images (``pred``, ``y``:
    ``[N]`` ids); None for a class without test images."""
    hits = torch.bincount(y[pred == y], minlength=num_classes).tolist()
    count = torch.bincount(y, minlength=num_classes).tolist()
    return [100.0 * h / n if n else None for h, n in zip(hits, count)]


def confusion_matrix(pred: torch.Tensor, y: torch.Tensor, num_classes: int) -> list[list[int]]:
    """Counts ``[true id][predicted id]``, ``num_classes x num_classes``."""
    flat = torch.bincount(y * num_classes + pred, minlength=num_classes * num_classes)
    return flat.view(num_classes, num_classes).tolist()


def class_forgetting(per_class: list[list[float | None]]) -> list[float | None]:
    """Forgetting of each class: ``per_class[i][k]`` is class k's accuracy after phase i (rows
    grow with the seen classes). For a class first seen before the last phase,
    ``max_{t_k <= i < T-1} per_class[i][k] - per_class[T-1][k]``; None for the last phase's
    classes (and for a class without test images)."""
    last = per_class[-1]
    out: list[float | None] = []
    for k, final in enumerate(last):
        before = [row[k] for row in per_class[:-1] if k < len(row) and row[k] is not None]
        out.append(max(before) - final if before and final is not None else None)
    return out


def kd_target_stats(teacher_logits: torch.Tensor, T: float) -> dict[str, float]:
    """How much the teacher's distillation targets say about the old classes (diagnostic).
    ``teacher_logits``: ``[N, K_old]`` on the phase's training images. Returns
    ``kd_target_entropy``: the mean entropy of ``softmax(logits / T)`` divided by ``ln K_old``
    (1: uniform, 0: one-hot), and ``kd_target_top_share``: the share of images whose teacher
    argmax is the most frequent old class (1: every image points to the same old class, and
    distilling on them cannot keep the other old classes apart)."""
    k = teacher_logits.shape[1]
    p = torch.softmax(teacher_logits.float() / T, dim=1)
    ent = -(p * p.clamp_min(1e-12).log()).sum(1).mean() / max(math.log(k), 1e-12)
    top = torch.bincount(p.argmax(1), minlength=k).max() / max(len(p), 1)
    return {"kd_target_entropy": float(ent) if k > 1 else 0.0, "kd_target_top_share": float(top)}


def average_incremental_accuracy(accs: list[float]) -> float:
    return sum(accs) / len(accs)


def forgetting(matrix: list[list[float]]) -> float:
    """Average forgetting of the accuracy matrix (rows: after phase i; columns: task j <= i)."""
    T = len(matrix)
    if T < 2:
        return 0.0
    drops = [max(matrix[i][j] for i in range(j, T - 1)) - matrix[T - 1][j] for j in range(T - 1)]
    return sum(drops) / len(drops)
