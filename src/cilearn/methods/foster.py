"""FOSTER: Feature Boosting and Compression for Class-Incremental Learning (Wang, Zhou, Ye &
Zhan, ECCV 2022)."""
from __future__ import annotations

import copy

from ..losses import balanced_kd, effective_number_weights
from ..models.net import freeze
from ..train import FitResult
from . import schedules
from .base import METHODS, TeacherCache
from .der import Expanding


@METHODS.register("foster")
class FOSTER(Expanding):
    """FOSTER (Wang et al. 2022), each phase > 0 in two stages of the one training loop:

    1. **Feature boosting** (sections "feature boosting" and "calibration for old and new"; stage ``phase i``): the previous (single-extractor)
       model frozen + a new extractor, features concatenated, one linear head over all seen
       classes (old classes' weights on the old features initialised from the previous head, all
       of it trained: the official ``oofc = ft``). Loss: logit-adjusted CE ``CE(z / w, y)`` with
       effective-number class weights, beta1 = 0.96 (``la-ce``, ``--loss.la-beta``; ``--loss bsce``
       composes instead) + feature enhancement, CE of an auxiliary head on the new extractor's
       features over all seen classes (weight 1, ``--loss.aux-weight``) + KD(T = 2) of the old
       logits to the previous model's (weight 1, ``--loss.kd-weight``, ``--loss.temperature``).
    2. **Feature compression** (section "feature compression"; stage ``phase i compression``): a single-extractor
       student, initialised from the previous model (extractor and head rows of the old classes,
       as the official code), is distilled from the frozen boosted model with the class-balanced
       KD (``balanced_kd``, beta2 = 0.97, ``--loss.bkd-beta``, T = 2) on the same data,
       ``--train.compression-epochs`` (default: the official 130 on CIFAR and image folders, the
       phase's epochs on the quick data sets or with ``--epochs``) at ``--train.compression-lr``
       (default: the phase's lr). The student replaces the net: every phase ends with one
       extractor.

    beta1 / beta2 are the official CIFAR-100 configuration's. Phase 0 is plain CE (equal counts:
    the logit adjustment is the identity). Herding exemplars on the compressed model's
    embeddings; CNN and NME. Not included: the optional weight aligning of teacher or student
    (off in the official configurations)."""
    cls_loss = "la-ce"
    distill = "kd"
    own_terms = ("auxiliary CE", "compression stage (balanced KD)")
    options_used = ("loss.bkd_beta", "train.compression_epochs", "train.compression_lr", "loss.temperature")
    training = schedules.FOSTER

    def __init__(self, ctx):
        super().__init__(ctx)
        self.boosted = None       # the frozen boosted model while the compression stage runs

    def aux_outputs(self, phase) -> int:
        return phase.seen

    def aux_targets(self, y):
        return y

    def train_phase(self, phase, x, y):
        fr = super().train_phase(phase, x, y)                  # boosting (phase 0: plain training)
        if phase.index == 0:
            return fr
        cr = self.compress(phase, x, y)
        return FitResult(fr.seconds + cr.seconds, fr.images + cr.images, {**fr.loss, **cr.loss})

    def compress(self, phase, x, y) -> FitResult:
        ctx, t = self.ctx, self.ctx.cfg.train
        if self.boosted is None:               # (else resumed inside the compression stage)
            self.boosted = self.net.frozen_copy()
            student = copy.deepcopy(self.teacher.backbone.extractors[0])   # the previous extractor
            head = copy.deepcopy(self.teacher.head)                        # old classes' rows
            head.add_classes(phase.num_new)
            for p in head.parameters():
                p.requires_grad_(True)
            self.net.compress(student, head)
        self.aux = None
        cache = TeacherCache(self.boosted, x, ctx)
        weights = effective_number_weights(self.counts, ctx.cfg.loss.bkd_beta)    # [seen]
        T = self.T

        def loss(batch):
            kd = balanced_kd(self.net(batch.x).logits, cache(batch).logits, weights, T)
            return kd, {"bkd": kd.detach()}

        over = {}
        if t.compression_epochs is not None:
            over["epochs"] = t.compression_epochs
        if t.compression_lr is not None:
            over["lr"] = t.compression_lr
        fr = ctx.fit(x, y, loss, ctx.fit_settings(phase, **over), desc=f"phase {phase.index} compression")
        self.boosted = None
        return fr

    def state_dict(self):
        st = super().state_dict()
        if self.boosted is not None:
            st["boosted"] = {k: v.cpu() for k, v in self.boosted.state_dict().items()}
        return st

    def load_state_dict(self, state):
        super().load_state_dict(state)
        if "boosted" in state:                 # resumed inside the compression stage
            b = copy.deepcopy(self.net)
            b.load_state_dict(state["boosted"])
            self.boosted = freeze(b)                  # after the load, which resets requires_grad


@METHODS.register("foster-cim")
class FOSTERCIM(FOSTER):
    """FOSTER with CIM's compressed exemplars (Luo et al. 2023, the paper's main base):
    ``foster --memory.compressor cim``; the budget is in full-image units. On image folders batch
    256, as the official CIM configurations."""
    memory_compressor = "cim"
    training = schedules.FOSTER_CIM
