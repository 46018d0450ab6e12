"""Distillation terms that need the frozen teacher itself, not only its logits (registry
``TERMS``). A method lists its own in ``Method.terms``; a user adds more to any method with
``--distill NAME[,NAME]``. Each term gets the student's output of the training forward (one
forward serves the classification loss, KD and every term) and adds ``weight * value``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch

from ..attention import attention_distillation, gradcam, teacher_gradcam
from ..losses import CLS_LOSSES, kd_kl
from ..models.net import freeze
from ..registry import Registry
from ..train import fit
from .context import TeacherCache, over_views

if TYPE_CHECKING:
    from ..data.scenario import Phase
    from ..models.net import NetOutput
    from ..train import Batch
    from .base import Method
    from .context import SplitData

TERMS: Registry = Registry("distillation term")


class DistillTerm:
    name: ClassVar[str]

    def __init__(self, method: "Method"):
        self.m = method

    @property
    def weight(self) -> float:  # pragma: no cover
        raise NotImplementedError

    def before_phase(self, phase: "Phase", x: torch.Tensor, y: torch.Tensor) -> None:
        """Called once the teacher exists (phases > 0), with the phase's uint8 training set and
        its labels, before the head grows."""

    def __call__(self, batch: "Batch", out: "NetOutput") -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def after_phase(self, phase: "Phase", data: "SplitData") -> None:
        """Called after training, while the teacher still exists."""

    def diagnostics(self) -> dict[str, float | None]:
        """Per-phase values for metrics.json (same keys every phase)."""
        return {}


@TERMS.register("attention")
class AttentionDistill(DistillTerm):
    """LwM's attention distillation (Dhar et al. 2019, Sec. 3), weight ``loss.attention_weight``
    (gamma, default 1: the paper gives no value, Sec. 4 Eq. 3). Grad-CAM on the last stage for
    ``b``, the teacher's top old class; the student's map from the training forward with
    ``create_graph=True`` (BN in train mode), the teacher's in eval mode (see
    ``cilearn.attention``). With a finite augmentation (none, flip) the teacher's maps and ``b``
    are computed once per training image and view, exactly as the teacher would per batch."""
    name = "attention"

    def __init__(self, method: "Method"):
        super().__init__(method)
        self.cam = self.b = None   # cached teacher maps [V, N, h, w] and classes [V, N]

    @property
    def weight(self) -> float:
        w = self.m.ctx.cfg.loss.attention_weight
        return 1.0 if w is None else w

    def before_phase(self, phase, x, y):
        got = over_views(self.m.ctx, x, lambda xb: teacher_gradcam(self.m.teacher, xb, phase.num_old)[:2])
        self.cam, self.b = got if got is not None else (None, None)   # [V, N, h, w], [V, N]

    def teacher_maps(self, batch: "Batch") -> tuple[torch.Tensor, torch.Tensor]:
        if self.cam is not None and batch.view is not None:
            return self.cam[batch.view, batch.idx], self.b[batch.view, batch.idx]
        cam, b, _ = teacher_gradcam(self.m.teacher, batch.x, self.m.phase.num_old)
        return cam, b

    def __call__(self, batch, out):
        cam_t, b = self.teacher_maps(batch)
        cam_s = gradcam(out.maps[-1], out.logits, b, create_graph=True)
        return attention_distillation(cam_s, cam_t)

    def after_phase(self, phase, data):
        """``--save-attention N``: N test images of the seen classes with the teacher's and the
        student's Grad-CAM for b, handed to the reporting layer (``attention-phase<i>.png``)."""
        n = self.m.ctx.cfg.report.save_attention
        self.cam = self.b = None
        if n <= 0 or not self.m.ctx.events.wants("attention"):
            return
        seen = (data.test_y < phase.end).nonzero().flatten()
        pick = seen[torch.from_numpy(np.random.RandomState(phase.index).permutation(len(seen))[:n]).to(seen.device)]
        x, y = data.test_x[pick], data.test_y[pick]
        aug, net = self.m.ctx.augmenter, self.m.net
        cam_t, b, _ = teacher_gradcam(self.m.teacher, aug.test(x), phase.num_old)
        was = net.training
        net.eval()
        with torch.enable_grad():
            o = net(aug.test(x).requires_grad_(True))
            cam_s = gradcam(o.maps[-1], o.logits, b, create_graph=False, retain_graph=False)
        net.train(was)
        order = self.m.ctx.cfg.scenario.class_order
        titles = [f"y={order[int(a)]} b={order[int(c)]}" for a, c in zip(y, b)]
        self.m.ctx.events.on_images("attention", phase.index, {"images": x.cpu(), "teacher": cam_t, "student": cam_s,
                                                               "titles": titles})


@TERMS.register("dual-teacher")
class DualTeacherDistill(DistillTerm):
    """DT-ID's second teacher (Choi et al. 2021): before the phase's main stage, a new-class
    teacher is trained on the phase's new-class images alone (never on exemplars or generated
    samples), starting from a copy of the old model (``--loss.dual-teacher-init copy``, default)
    or from a fresh initialisation (``scratch``), with CE over the new classes, for
    ``--loss.dual-teacher-epochs`` (default: the phase's). The student then distils the new-class
    block of its logits from it:

        L = L_cls + beta * KL_T(old block | old teacher) + w * KL_T(new block | new teacher)

    where the old-block term is the method's own KD (LwF, iCaRL: ``kd`` at T) and ``w`` is
    ``--loss.dual-teacher-weight`` (default 1). Each KL is a softmax at temperature T over its own
    block only (``losses.kd_kl``), on every training image of the batch. With a finite
    augmentation the new teacher's logits are computed once per image and view."""
    name = "dual-teacher"

    def __init__(self, method: "Method"):
        super().__init__(method)
        self.new_teacher = self.cache = None
        self.seconds: float | None = None
        self.block = (0, 0)

    @property
    def weight(self) -> float:
        return self.m.ctx.cfg.loss.dual_teacher_weight

    def before_phase(self, phase, x, y):
        import copy

        ctx, lc = self.m.ctx, self.m.ctx.cfg.loss
        new = y >= phase.start
        xn, yn = x[new], y[new]
        seed = ctx.cfg.seed * 1_000_003 + phase.index * 7919 + 17      # apart from the run's RNG stream
        with torch.random.fork_rng(devices=[ctx.device] if ctx.device.type == "cuda" else []):
            torch.manual_seed(seed)
            model = copy.deepcopy(self.m.net)          # the old model (head not grown yet)
            if lc.dual_teacher_init == "scratch":
                for mod in model.modules():
                    if mod is not model and hasattr(mod, "reset_parameters"):
                        mod.reset_parameters()
            model.add_classes(phase.num_new)
        for p in model.parameters():
            p.requires_grad_(True)
        counts = torch.bincount(yn, minlength=phase.seen).float()
        ce_local = CLS_LOSSES.get("ce-local")

        def loss(batch):
            v = ce_local(model(batch.x).logits, batch.y, counts)
            return v, {"ce": v.detach()}

        over = {} if lc.dual_teacher_epochs is None else {"epochs": lc.dual_teacher_epochs}
        gen = torch.Generator(device=ctx.device).manual_seed(seed)
        fr = fit(model, xn, yn, loss, ctx.fit_settings(phase, **over), ctx.augmenter, gen,
                 desc=f"phase {phase.index} new-class teacher")
        self.new_teacher, self.seconds, self.block = freeze(model), fr.seconds, (phase.start, phase.end)
        self.cache = TeacherCache(model, x, ctx)     # its outputs once per image and view (finite views)

    def __call__(self, batch, out):
        a, b = self.block
        return kd_kl(out.logits[:, a:b], self.cache(batch).logits[:, a:b], self.m.T)

    def after_phase(self, phase, data):
        self.new_teacher = self.cache = None

    def diagnostics(self):
        s, self.seconds = self.seconds, None
        return {"new_teacher_seconds": s}
