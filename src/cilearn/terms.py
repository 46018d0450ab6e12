"""Loss-term components that need the frozen old model itself, not only its logits (kind ``term``
of ``cilearn.components``): LwM's attention distillation and DT-ID's second teacher. A recipe
lists its own in ``Method.terms``; a user adds more to any method with ``--distill NAME[,NAME]``.
Each term gets the student's output of the training forward (one forward serves the
classification loss, KD and every term) and adds ``weight * value``; they run in phases > 0.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from .attention import attention_distillation, gradcam, teacher_gradcam
from .components import Component, register
from .losses import CLS_LOSSES, kd_kl
from .services import TeacherCache
from .models.net import freeze
from .train import fit


@dataclass(frozen=True)
class AttentionOptions:
    weight: float = 1.0       # gamma of Eq. 3 (Dhar et al. 2019); Sec. 4 gives no value (FACIL notes the same)


@register("term", "attention")
class AttentionDistill(Component):
    """LwM's attention distillation (Dhar et al. 2019, Sec. 3), weight gamma. Grad-CAM on the last
    stage for ``b``, the old model's top old class; the student's map from the training forward
    with ``create_graph=True`` (BN in train mode), the old model's in eval mode (see
    ``cilearn.attention``). With a finite augmentation (none, flip) the old model's maps and ``b``
    are computed once per training image and view, exactly as it would per batch.
    (``--save-attention N``: the reporting layer draws N test images' maps after each phase.)"""
    Options = AttentionOptions
    needs_old_model = True

    def __init__(self, options, services):
        super().__init__(options, services)
        self.cam = self.b = None   # cached maps [V, N, h, w] and classes [V, N]
        self.old_model, self.num_old = None, 0

    def phase_start(self, phase, model, old_model, data):
        self.old_model, self.num_old = old_model, phase.num_old
        got = self.services.views(data.x, lambda xb: teacher_gradcam(old_model, xb, phase.num_old)[:2])
        self.cam, self.b = got if got is not None else (None, None)   # [V, N, h, w], [V, N]

    def teacher_maps(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cam is not None and batch.view is not None:
            return self.cam[batch.view, batch.idx], self.b[batch.view, batch.idx]
        cam, b, _ = teacher_gradcam(self.old_model, batch.x, self.num_old)
        return cam, b

    def terms(self, batch, out):
        cam_t, b = self.teacher_maps(batch)
        cam_s = gradcam(out.maps[-1], out.logits, b, create_graph=True)
        return {"attention": (self.options.weight, attention_distillation(cam_s, cam_t))}

    def phase_end(self, phase, model, data):
        self.cam = self.b = self.old_model = None


@dataclass(frozen=True)
class DualTeacherOptions:
    weight: float = 1.0          # w of the new-class block's KD (the old block keeps the method's own KD)
    init: str = "copy"           # copy: the new teacher starts from the old model; scratch: a fresh initialisation
    epochs: int | None = None    # its training epochs; None: the phase's
    temperature: float = 2.0     # T of its KD (the run's --loss.temperature)


@register("term", "dual-teacher")
class DualTeacherDistill(Component):
    """DT-ID's second teacher (Choi et al. 2021): before the phase's main stage, a new-class
    teacher is trained on the phase's new-class images alone (never on exemplars or generated
    samples), starting from a copy of the old model (``init`` copy) or from a fresh initialisation
    (``scratch``), with CE over the new classes, for ``epochs`` (default: the phase's). The student
    then distils the new-class block of its logits from it:

        L = L_cls + beta * KL_T(old block | old teacher) + w * KL_T(new block | new teacher)

    where the old-block term is the method's own KD (LwF, iCaRL: ``kd`` at T). Each KL is a
    softmax at temperature T over its own block only (``losses.kd_kl``), on every training image
    of the batch. With a finite augmentation the new teacher's logits are computed once per image
    and view. Its training draws from a generator seeded by (seed, phase), apart from the run's."""
    Options = DualTeacherOptions
    needs_old_model = True

    def __init__(self, options, services):
        super().__init__(options, services)
        self.new_teacher = self.cache = None
        self.seconds: float | None = None
        self.block = (0, 0)

    def phase_start(self, phase, model, old_model, data):
        s, o = self.services, self.options
        new = data.y >= phase.start
        xn, yn = data.x[new], data.y[new]
        seed = s.seed * 1_000_003 + phase.index * 7919 + 17      # apart from the run's RNG stream
        with torch.random.fork_rng(devices=[s.device] if s.device.type == "cuda" else []):
            torch.manual_seed(seed)
            teacher = copy.deepcopy(old_model)         # the old model (head not grown)
            if o.init == "scratch":
                for mod in teacher.modules():
                    if mod is not teacher and hasattr(mod, "reset_parameters"):
                        mod.reset_parameters()
            teacher.add_classes(phase.num_new)
        for p in teacher.parameters():
            p.requires_grad_(True)
        counts = torch.bincount(yn, minlength=phase.seen).float()
        ce_local = CLS_LOSSES.get("ce-local")

        def loss(batch):
            v = ce_local(teacher(batch.x).logits, batch.y, counts)
            return v, {"ce": v.detach()}

        over = {} if o.epochs is None else {"epochs": o.epochs}
        gen = torch.Generator(device=s.device).manual_seed(seed)
        fr = fit(teacher, xn, yn, loss, s.fit_settings(phase, **over), s.augmenter, gen,
                 desc=f"phase {phase.index} new-class teacher")
        self.new_teacher, self.seconds, self.block = freeze(teacher), fr.seconds, (phase.start, phase.end)
        self.cache = TeacherCache(teacher, data.x, s)     # its outputs once per image and view (finite views)

    def terms(self, batch, out):
        a, b = self.block
        return {"dual-teacher": (self.options.weight,
                                 kd_kl(out.logits[:, a:b], self.cache(batch).logits[:, a:b], self.options.temperature))}

    def phase_end(self, phase, model, data):
        self.new_teacher = self.cache = None

    def diagnostics(self):
        s, self.seconds = self.seconds, None
        return {"new_teacher_seconds": s}
