"""LUCIR: Learning a Unified Classifier Incrementally via Rebalancing (Hou et al., CVPR 2019),
and the Balanced Softmax CE recipes (Jodelet, Liu & Murata 2021) built on LUCIR and iCaRL."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..losses import less_forget, lucir_lambda, margin_ranking
from ..models.heads import CosineHead
from .base import METHODS, Method
from .baselines import ICaRL


def imprint_weights(emb: torch.Tensor, y: torch.Tensor, classes: range, old_weight: torch.Tensor) -> torch.Tensor:
    """LUCIR's imprinting of new-class weights (Sec. 3.2, after Qi et al. 2018): for each new
    class c, the L2-normalised mean of the L2-normalised embeddings of its training images,
    scaled to the mean L2 norm of the old classes' rows. ``emb`` ``[N, D]``, ``y`` ``[N]`` (all in
    ``classes``), ``old_weight`` ``[K_old, D]`` -> ``[len(classes), D]``."""
    f = F.normalize(emb.float(), dim=1)
    sums = torch.zeros(len(classes), f.shape[1], device=f.device).index_add_(0, y - classes.start, f)
    # normalising the sum normalises the mean (the count is a positive factor)
    return F.normalize(sums, dim=1) * old_weight.float().norm(dim=1).mean()


@METHODS.register("lucir")
class LUCIR(Method):
    """LUCIR (Hou et al. 2019): cosine-normalised head with a learnable scale sigma (Sec. 3.1);
    new-class rows imprinted from the current model's normalised class means before each phase
    (Sec. 3.2); less-forget constraint ``lambda (1 - cos(f_old(x), f(x)))`` on every training
    sample with ``lambda = lambda_base sqrt(|old| / |new|)`` (Sec. 3.2, ``--loss.less-forget-weight``:
    lambda_base, 5 for CIFAR, 10 on image folders as the paper's ImageNet value); margin ranking
    of each old-class exemplar's ground-truth cosine against the K = 2 hardest new classes, margin
    0.5, weight 1 (Sec. 3.3, ``--loss.margin``, ``--loss.margin-k``, ``--loss.margin-weight``);
    herding exemplars; class-balanced fine-tuning after each phase > 0 (on by default,
    ``--no-balanced-finetune``). The old classes' rows stay fixed during the main training of a
    phase (``--train.freeze-old-head``, on: the official code does so while the less-forget
    constraint is on; the fine-tuning stage trains all rows). Reports CNN and NME.
    Not included: removing the backbone's last ReLU (the official ResNet-32 has none before the
    pooled embedding; cilearn's backbones keep it)."""
    head = "cosine"
    uses_memory = True
    needs_teacher = True
    balanced_finetune = True
    freeze_old_head = True   # default of train.freeze_old_head

    def __init__(self, ctx):
        super().__init__(ctx)
        lc, t = ctx.cfg.loss, ctx.cfg.train
        self.lf_base = 5.0 if lc.less_forget_weight is None else lc.less_forget_weight
        self.freeze = self.freeze_old_head if t.freeze_old_head is None else t.freeze_old_head
        self.lf_weight = 0.0
        self.frozen_old: torch.Tensor | None = None

    def before_phase(self, phase, x, y):
        super().before_phase(phase, x, y)   # teacher and its cached outputs, head grown, counts
        self.frozen_old = None
        if phase.index == 0:
            return
        self.lf_weight = lucir_lambda(self.lf_base, phase.num_old, phase.num_new)
        new = (y >= phase.start).nonzero().flatten()
        cache = self.teacher_out
        # the current model's embeddings of the new classes' images (the teacher is its frozen
        # copy: its cached outputs, unflipped view, when the augmentation has finite views)
        emb = cache.emb[0, new] if cache is not None and cache.emb is not None else self.ctx.embed(self.net, x[new])
        w = self.net.head.weight
        with torch.no_grad():
            w[phase.num_old:] = imprint_weights(emb, y[new], phase.classes, w[:phase.num_old]).to(w.dtype)
        if self.freeze:
            self.frozen_old = w[:phase.num_old].detach().clone()

    def constrain(self):
        super().constrain()
        if self.frozen_old is not None:
            with torch.no_grad():
                self.net.head.weight[: len(self.frozen_old)] = self.frozen_old

    def after_phase(self, phase, data):
        self.frozen_old = None
        super().after_phase(phase, data)

    def teacher_terms(self, batch, out):
        lc = self.ctx.cfg.loss
        _, t_emb = self.teacher_out(batch)
        lf = less_forget(out.embedding, t_emb)
        head = self.net.head
        scores = head.cosine(out.embedding) if isinstance(head, CosineHead) else out.logits
        mr = margin_ranking(scores, batch.y, self.phase.num_old, lc.margin_k, lc.margin)
        return [("less_forget", self.lf_weight, lf), ("margin", lc.margin_weight, mr)]


@METHODS.register("lucir-bsce")
class LUCIRBSCE(LUCIR):
    """LUCIR with Balanced Softmax CE instead of CE (Jodelet et al. 2021) and without the
    class-balanced fine-tuning stage, which BSCE makes unnecessary (the paper's claim;
    ``--balanced-finetune`` puts it back to measure it)."""
    cls_loss = "bsce"
    balanced_finetune = False


@METHODS.register("icarl-bsce")
class ICaRLBSCE(ICaRL):
    """iCaRL (CE + KD form) with Balanced Softmax CE (Jodelet et al. 2021): ``CE(z + log n, y)``
    with n the per-class training counts of the phase (new images, old exemplars)."""
    cls_loss = "bsce"
