"""Calibration components (kind ``calibration``): after a phase's training, correct the model's
bias towards the new classes. Any method can use any of them (``--calibration NAME[,NAME]``;
recipes choose defaults), in the order given, in phases > 0:

* ``weight-align``: WA's weight aligning (Zhao et al. 2020); ``--train.weight-align`` adds or
  removes it. WA's weight clipping is a constraint of the training, not a calibration
  (``cilearn.constraints``, ``--train.weight-clip``).
* ``balanced-finetune``: class-balanced fine-tuning (LUCIR's "CBF", Hou et al. 2019; PODNet and DER
  retrain their classifier on balanced data too); ``--balanced-finetune`` / ``--no-balanced-finetune``.
* ``bic``: BiC's bias correction (Wu et al. 2019): a held-out validation split of the phase's
  data and exemplars, and a two-parameter affine layer on the new classes' logits trained on it
  with the model frozen.

Balanced Softmax CE (``--loss bsce``) corrects the same bias during training; its paper's claim
is that these stages can then be dropped (``lucir-bsce``, ``icarl-bsce``). The seconds spent in
calibration stages are recorded per phase (``finetune_seconds`` in metrics.json/csv).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .components import Component, PhaseContext, option, register
from .errors import ConfigError
from .models.net import eval_mode
from .train import Batch, FitResult

if TYPE_CHECKING:
    from .data.scenario import Phase


class Calibration(Component):
    """A calibration component: ``after_training`` returns the FitResult of the stage it ran (or
    None); phases > 0."""
    from_phase = 1


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


@register("calibration", "weight-align")
class WeightAlign(Calibration):
    """Weight aligning of the head's new-class rows to the old rows' mean norm."""
    switch = "train.weight_align"

    def __init__(self, options, services):
        super().__init__(options, services)
        self.gamma: float | None = None      # the last phase's gamma

    def after_training(self, ctx):
        if self.services.resuming_later_stage():   # a resumed run continues a later stage: done before it
            return None
        self.gamma = weight_align(ctx.model.head.weight.data, ctx.phase.num_old)
        return None


@dataclass(frozen=True)
class BalancedFinetuneOptions:
    """Defaults: LUCIR's official code (class_incremental_cosine_cifar100.py: 20 epochs at lr 0.01,
    x0.1 at epoch 10); recipes set their own (PODNet: constant 0.05, DER: 30 epochs at 0.1)."""
    epochs: int = option(20, alias="train.finetune_epochs")
    lr: float = option(0.01, alias="train.finetune_lr")
    decay: bool = True                   # x0.1 at half the epochs; false: constant lr
    # the head alone (backbone frozen, BatchNorm in eval mode); false: the whole network
    head_only: bool = option(True, alias="train.finetune_head_only")

    def __post_init__(self):
        if self.epochs < 0 or not self.lr > 0:
            raise ConfigError(f"components.balanced-finetune: epochs must be >= 0 and lr > 0, got {self.epochs}, {self.lr}")


@register("calibration", "balanced-finetune")
class BalancedFinetune(Calibration):
    """Class-balanced fine-tuning after the main training of a phase > 0: the run's classification
    loss on ``m`` samples of every seen class (``select``), a stage of the one training loop
    (``desc`` "phase i balanced-ft": checkpointed and resumable, its selection kept in the state so
    that a resumed run fine-tunes on the same set). By default only the head is trained (all its
    rows and sigma) with the backbone frozen in eval mode, so the embeddings, the exemplar
    selection and the NME prototypes are those of the main stage; with a finite augmentation
    (none, flip) the backbone's embeddings are computed once per image and view and looked up
    (exact: the frozen backbone is in eval mode). With BSCE the balanced counts make the loss plain
    CE."""
    Options = BalancedFinetuneOptions
    needs_memory = True
    switch = "train.balanced_finetune"

    def __init__(self, options, services):
        super().__init__(options, services)
        self.subset: dict | None = None      # the stage's selection {phase, per_class, new_idx}

    def select(self, phase: "Phase", model: torch.nn.Module, data: PhaseContext) -> dict:
        """The balanced set, as indices: ``m`` samples of every seen class, with ``m`` the memory's
        per-class share after this phase (``--memory N``: N // seen; ``--memory-per-class P``: P),
        capped by the smallest class. Old classes: their first ``m`` exemplars (selection order,
        as the memory will keep them). New classes: ``m`` images of the phase's data chosen by the
        memory's selection rule on the embeddings of the model just trained: the exemplars the
        memory is about to store, as in LUCIR's official code, which fine-tunes on the updated
        exemplar set. ``random`` draws from a generator seeded by (seed, phase), so the run's RNG
        stream is untouched. The new images' embeddings are left in ``data.new_embeddings`` for the
        memory update (valid while the backbone does not change)."""
        mem, x, y = data.memory, data.x, data.y
        new_idx = (y >= phase.start).nonzero().flatten()
        y_new = y[new_idx]
        sizes = [len(mem.exemplars.get(c, ())) for c in range(phase.num_old)]
        sizes += [int((y_new == c).sum()) for c in phase.classes]
        m = min([mem.budget.share(phase.seen)] + sizes)
        picks = []
        if m > 0:
            feats = self.services.embed(model, x[new_idx])                 # [N_new, D]
            data.new_embeddings = feats
            gen = self.services.phase_generator(phase)
            for c in phase.classes:
                rows = (y_new == c).nonzero().flatten()
                picks.append(new_idx[rows[mem.select(feats[rows], m, gen).to(rows.device)]])
        idx = torch.cat(picks) if picks else torch.zeros(0, dtype=torch.long, device=y.device)
        return {"phase": phase.index, "per_class": m, "new_idx": idx.cpu()}

    def after_training(self, ctx):
        t0 = time.perf_counter()
        o, phase, model, data = self.options, ctx.phase, ctx.model, ctx
        if self.subset is None or self.subset["phase"] != phase.index:
            self.subset = self.select(phase, model, data)
        m = self.subset["per_class"]
        if m == 0 or o.epochs == 0:
            return FitResult(0.0, 0, {})
        mem, x, y = data.memory, data.x, data.y
        idx = self.subset["new_idx"].to(y.device)
        xs = [mem.exemplars[c][:m] for c in range(phase.num_old)] + [x[idx]]
        ys = [torch.full((m,), c, dtype=torch.long, device=y.device) for c in range(phase.num_old)] + [y[idx]]
        xb, yb = torch.cat(xs), torch.cat(ys)
        counts = torch.bincount(yb, minlength=phase.seen).float()    # all equal to m
        cached = None
        if o.head_only:   # the frozen backbone's embeddings once per image and view (finite views), exact
            model.backbone.eval()
            with torch.no_grad():
                cached = self.services.views(xb, lambda b: (model.backbone(b)[1].float(),))   # ([V, N, D],) or None

        def loss(batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            if o.head_only:
                model.backbone.eval()                 # fit() put the whole net in train mode
                if cached is not None and batch.view is not None:
                    emb = cached[0][batch.view, batch.idx]
                else:
                    with torch.no_grad():
                        emb = model.backbone(batch.x)[1]
                logits = model.logits(emb)
            else:
                logits = model(batch.x).logits
            cls = data.cls_loss(logits, batch.y, counts)
            return cls, {"cls": cls.detach()}

        settings = self.services.fit_settings(phase, epochs=o.epochs, lr=o.lr, schedule="step", gamma=0.1,
                                              warmup_epochs=0, milestones=(max(1, o.epochs // 2),) if o.decay else ())
        select_s = time.perf_counter() - t0
        if not o.head_only:
            data.new_embeddings = None          # the backbone is about to change
        try:
            fr = self.services.fit(xb, yb, loss, settings, desc=f"phase {phase.index} balanced-ft",
                                   params=model.head.parameters() if o.head_only else None)
        finally:
            model.backbone.train()
        return FitResult(select_s + fr.seconds, fr.images, fr.loss)

    def state_dict(self):
        return {"subset": self.subset} if self.subset is not None else {}

    def load_state_dict(self, state):
        self.subset = state.get("subset")


@dataclass(frozen=True)
class BiCOptions:
    """Defaults: FACIL's BiC (mmasana/FACIL src/approach/bic.py), which follows the official code."""
    val_fraction: float = 0.1            # per class ceil(0.1 x the per-class exemplar share) held out (the paper's 9:1 split)
    epochs: int = 200                    # bias-layer epochs (FACIL num_bias_epochs)
    lr: float = 0.1                      # SGD, momentum 0.9, no weight decay, constant lr (FACIL: the training lr, 0.1)
    beta_decay: float = 0.1              # + beta_decay * beta^2 / 2 in the loss (the official code's, FACIL notes)

    def __post_init__(self):
        if not 0 <= self.val_fraction < 1 or self.epochs < 0 or not self.lr > 0 or self.beta_decay < 0:
            raise ConfigError("components.bic: val_fraction in [0, 1), epochs >= 0, lr > 0 and beta_decay >= 0 "
                              f"are expected, got {self.val_fraction}, {self.epochs}, {self.lr}, {self.beta_decay}")


@register("calibration", "bic")
class BiC(Calibration):
    """BiC's bias correction (Wu et al., "Large Scale Incremental Learning", CVPR 2019, Sec. 4).

    * Before training, ``v = ceil(val_fraction x share)`` samples of every seen class are held out
      of the phase's training set (``share``: the memory's per-class exemplars after this phase):
      the first ``v`` images of each new class, and the last ``v`` exemplars (selection order) of
      each old class.
    * After the main stage, the model is frozen (eval mode) and the new classes' logits get the
      affine correction ``q_k = alpha o_k + beta`` (one pair for the phase's new classes, Eq. 4),
      trained on the held-out set with CE over all seen classes + ``beta_decay beta^2 / 2``
      (``epochs`` epochs, SGD momentum 0.9 at ``lr``; a stage of the one training loop, "phase i
      bias-correction"). Old classes' logits keep their earlier phases' corrections.
    * The learnt pair becomes part of the model (``IncrementalNet.logit_bias``): the evaluation and
      the next phase's teacher use the corrected logits, as the paper's.

    Deviation (docs): the old classes' validation samples are held out of the stored exemplars
    for the phase, where FACIL keeps a separate validation store of the images held out when each
    class was new (outside the training exemplars' budget)."""
    Options = BiCOptions
    needs_memory = True

    def __init__(self, options, services):
        super().__init__(options, services)
        self.val: tuple[torch.Tensor, torch.Tensor] | None = None      # held-out uint8 images, labels
        self.alpha = self.beta = None
        self.pair: tuple[float, float] | None = None                   # the last phase's (alpha, beta)

    def attach(self, model):
        model.enable_logit_bias()

    def training_set(self, phase, x, y, memory, data):
        v = math.ceil(self.options.val_fraction * memory.budget.share(phase.seen)) if memory is not None else 0
        keep = torch.ones(len(y), dtype=torch.bool, device=y.device)
        held = []
        for c in range(phase.seen):
            rows = (y == c).nonzero().flatten()
            take = rows[:v] if c >= phase.start else rows[max(len(rows) - v, 0):]
            if len(take) < len(rows):      # never the whole class
                held.append(take)
        idx = torch.cat(held) if held else torch.zeros(0, dtype=torch.long, device=y.device)
        keep[idx] = False
        self.val = (x[idx], y[idx])
        return x[keep], y[keep]

    def phase_start(self, ctx):
        dev = self.services.device
        self.alpha = torch.nn.Parameter(torch.ones((), device=dev))
        self.beta = torch.nn.Parameter(torch.zeros((), device=dev))

    def after_training(self, ctx):
        phase, model = ctx.phase, ctx.model
        xv, yv = self.val
        if len(yv) == 0 or self.options.epochs == 0:
            return FitResult(0.0, 0, {})
        a, o = phase.start, self.options
        alpha, beta = self.alpha, self.beta
        with eval_mode(model), torch.no_grad():
            cached = self.services.views(xv, lambda b: (model(b).logits.float(),))    # ([V, N, K],) or None

        def loss(batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            if cached is not None and batch.view is not None:
                z = cached[0][batch.view, batch.idx]
            else:
                with eval_mode(model), torch.no_grad():
                    z = model(batch.x).logits.float()
            q = torch.cat([z[:, :a], alpha * z[:, a:] + beta], dim=1)     # [B, seen]
            ce = F.cross_entropy(q, batch.y)
            return ce + o.beta_decay * beta ** 2 / 2, {"bias_ce": ce.detach()}

        settings = self.services.fit_settings(phase, epochs=o.epochs, lr=o.lr, schedule="step", milestones=(),
                                              warmup_epochs=0, weight_decay=0.0)
        fr = self.services.fit(xv, yv, loss, settings, desc=f"phase {phase.index} bias-correction", params=[alpha, beta])
        self.pair = (float(alpha.detach()), float(beta.detach()))
        model.logit_bias.set(phase.start, phase.end, *self.pair)
        return fr

    def state_dict(self):
        if self.alpha is None:
            return {}
        return {"alpha": float(self.alpha.detach()), "beta": float(self.beta.detach())}

    def load_state_dict(self, state):
        if self.alpha is not None and "alpha" in state:
            with torch.no_grad():
                self.alpha.fill_(state["alpha"])
                self.beta.fill_(state["beta"])

    def diagnostics(self):
        p, self.pair = self.pair, None
        return {"bic_alpha": p[0] if p else None, "bic_beta": p[1] if p else None}
