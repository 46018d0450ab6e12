"""Phase-end calibration: components that correct the bias of a trained model towards the new
classes (DESIGN: "phase-end calibration: none, weight aligning, balanced fine-tuning, NME").
Any method can use them (``Method.train_phase`` calls them; recipes only choose defaults):

* ``balanced_finetune``: class-balanced fine-tuning (LUCIR, Hou et al. 2019, "CBF"; PODNet
  fine-tunes its classifier on balanced data too), ``--balanced-finetune`` /
  ``--no-balanced-finetune``, default: the method's (on for ``lucir``).
* ``weight_align``: WA's weight aligning (Zhao et al. 2020), ``--train.weight-align``.
* ``clip_nonnegative``: WA's weight clipping, ``--train.weight-clip``.

Balanced Softmax CE (``--loss bsce``) corrects the same bias during training; its paper's claim
is that these stages can then be dropped (``lucir-bsce``, ``icarl-bsce``). The seconds spent in
the fine-tuning stage are recorded per phase (``finetune_seconds`` in metrics.json/csv).
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from ..train import Batch, FitResult
from .context import over_views

if TYPE_CHECKING:
    from ..data.scenario import Phase
    from .base import Method


@torch.no_grad()
def weight_align(weight: torch.Tensor, num_old: int) -> float:
    """WA (Zhao et al. 2020, Sec. 3.3): in place, ``W_new <- gamma W_new`` with
    ``gamma = mean_{c old} |W_c| / mean_{c new} |W_c|``, so that old and new rows have the same
    mean L2 norm; old rows are untouched. ``weight``: ``[K, D]``, new rows at ``num_old:``.
    Returns gamma (1 when there is nothing to align)."""
    if num_old == 0 or num_old >= weight.shape[0]:
        return 1.0
    norms = weight.float().norm(dim=1)                        # [K]
    gamma = norms[:num_old].mean() / norms[num_old:].mean().clamp_min(1e-12)
    weight[num_old:] *= gamma.to(weight.dtype)
    return float(gamma)


@torch.no_grad()
def clip_nonnegative(weight: torch.Tensor) -> None:
    """WA's weight clipping (Zhao et al. 2020, Sec. 3.3): ``W <- max(W, 0)`` in place. The
    embedding is a post-ReLU average, so non-negative weights make the logit scale follow the
    row norms, which is what weight aligning equalises."""
    weight.clamp_(min=0)


def select_balanced(method: "Method", phase: "Phase", x: torch.Tensor, y: torch.Tensor) -> dict:
    """The balanced set of the fine-tuning stage, as indices: ``m`` samples of every seen class,
    with ``m`` = the memory's per-class share after this phase (``--memory N``: N // seen;
    ``--memory-per-class P``: P), capped by the smallest class. Old classes: their first ``m``
    exemplars (selection order, as the memory will keep them). New classes: ``m`` images of the
    phase's data chosen by the memory's selection rule (``--selection``, herding by default) on
    the embeddings of the model just trained: the exemplars the memory is about to store, as in
    LUCIR's official code, which fine-tunes on the updated exemplar set. ``random`` draws from a
    generator seeded by (seed, phase), so the run's RNG stream is untouched."""
    ctx = method.ctx
    mem = ctx.memory
    assert mem is not None, "balanced fine-tuning needs a memory (checked by Method.check_config)"
    new_idx = (y >= phase.start).nonzero().flatten()
    y_new = y[new_idx]
    sizes = [len(mem.exemplars.get(c, ())) for c in range(phase.num_old)]
    sizes += [int((y_new == c).sum()) for c in phase.classes]
    m = min([mem.budget.share(phase.seen)] + sizes)
    picks = []
    if m > 0:
        feats = ctx.embed(method.net, x[new_idx])                 # [N_new, D]
        method.new_embeddings = feats                             # reused by the memory update
        gen = ctx.phase_generator(phase)
        for c in phase.classes:
            rows = (y_new == c).nonzero().flatten()
            picks.append(new_idx[rows[mem.select(feats[rows], m, gen).to(rows.device)]])
    idx = torch.cat(picks) if picks else torch.zeros(0, dtype=torch.long, device=y.device)
    return {"phase": phase.index, "per_class": m, "new_idx": idx.cpu()}


def balanced_finetune(method: "Method", phase: "Phase", x: torch.Tensor, y: torch.Tensor) -> tuple[FitResult, float]:
    """Class-balanced fine-tuning after the main training of a phase > 0 (LUCIR's CBF, PODNet's
    classifier fine-tuning): the method's classification loss on the ``select_balanced`` set,
    ``--train.finetune-epochs`` epochs at ``--train.finetune-lr``, step schedule; defaults from
    the method (``Method.finetune_epochs``, ``finetune_lr``, ``finetune_decay``: LUCIR's official
    20 epochs at 0.01, x0.1 at epoch 10; PODNet's 20 at a constant 0.05). By default only the head is trained
    (``--train.finetune-head-only``, as LUCIR; all its rows and sigma) with the backbone frozen in
    eval mode (BatchNorm statistics do not move either), so the embeddings, the exemplar
    selection and the NME prototypes are those of the main stage; with a finite augmentation
    (none, flip) the backbone's embeddings are computed once per image and view and looked up
    (exact: the frozen backbone is in eval mode), which matters for DER's growing backbone. With BSCE the balanced counts
    make the loss plain CE. A stage of the one training loop (``desc`` "phase i balanced-ft"):
    checkpointed and resumable; its selection is kept in the method state so that a resumed run
    fine-tunes on the same set. Returns the stage's FitResult and its seconds (selection
    included)."""
    t0 = time.perf_counter()
    ctx, net, t = method.ctx, method.net, method.ctx.cfg.train
    sub = method.ft_subset
    if sub is None or sub["phase"] != phase.index:
        sub = method.ft_subset = select_balanced(method, phase, x, y)
    m = sub["per_class"]
    epochs, lr = method.finetune_schedule()
    if m == 0 or epochs == 0:
        return FitResult(0.0, 0, {}), 0.0
    mem = ctx.memory
    idx = sub["new_idx"].to(y.device)
    xs = [mem.exemplars[c][:m] for c in range(phase.num_old)] + [x[idx]]
    ys = [torch.full((m,), c, dtype=torch.long, device=y.device) for c in range(phase.num_old)] + [y[idx]]
    xb, yb = torch.cat(xs), torch.cat(ys)
    counts = torch.bincount(yb, minlength=phase.seen).float()    # all equal to m
    head_only = t.finetune_head_only
    cached = None
    if head_only:   # the frozen backbone's embeddings once per image and view (finite views), exact
        net.backbone.eval()
        with torch.no_grad():
            cached = over_views(ctx, xb, lambda b: (net.backbone(b)[1].float(),))   # ([V, N, D],) or None

    def loss(batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if head_only:
            net.backbone.eval()                 # fit() put the whole net in train mode
            if cached is not None and batch.view is not None:
                emb = cached[0][batch.view, batch.idx]
            else:
                with torch.no_grad():
                    emb = net.backbone(batch.x)[1]
            logits = net.head(emb)
        else:
            logits = net(batch.x).logits
        cls = method.cls_fn(logits, batch.y, counts)
        return cls, {"cls": cls.detach()}

    settings = ctx.fit_settings(phase, epochs=epochs, lr=lr, schedule="step", gamma=0.1, warmup_epochs=0,
                                milestones=(max(1, epochs // 2),) if method.finetune_decay else ())
    select_s = time.perf_counter() - t0
    if not head_only:
        method.new_embeddings = None          # the backbone is about to change
    try:
        fr = ctx.fit(xb, yb, loss, settings, desc=f"phase {phase.index} balanced-ft",
                     params=net.head.parameters() if head_only else None)
    finally:
        net.backbone.train()
    return fr, select_s + fr.seconds
