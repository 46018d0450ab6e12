"""Loss-term components (kind ``term`` of ``cilearn.components``) that need the frozen old model or
its outputs, not only its logits: LUCIR's less-forget constraint and margin ranking, PODNet's
pooled-output distillation, LwM's attention distillation and DT-ID's second teacher. A recipe
lists its own in ``Method.terms``; a user adds more to any method with ``--distill NAME[,NAME]``.
Each term gets the student's output of the training forward (one forward serves the
classification loss, KD and every term) and adds ``weight * value``; they run in phases > 0.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from .attention import attention_distillation, gradcam, teacher_gradcam
from .components import Component, register
from .errors import ConfigError
from .losses import CLS_LOSSES, kd_kl, less_forget, lucir_lambda, margin_ranking, pod_distance, pod_flat, pod_vectors
from .services import TeacherCache
from .models.net import freeze
from .train import fit


def _non_negative(name: str, **values: float) -> None:
    for k, v in values.items():
        if v < 0:
            raise ConfigError(f"components.{name}.{k} must be >= 0, got {v}")


@dataclass(frozen=True)
class LessForgetOptions:
    weight: float = 5.0       # lambda_base (LUCIR Sec. 4: 5 on CIFAR-100, 10 on ImageNet; recipes set it per data set)

    def __post_init__(self):
        _non_negative("less-forget", weight=self.weight)


@register("term", "less-forget")
class LessForget(Component):
    """LUCIR's less-forget constraint (Hou et al. 2019, Sec. 3.2, Eq. 6): ``1 - cos(f_old(x), f(x))``
    on every training sample's embedding, weight ``lambda = lambda_base sqrt(|old| / |new|)``
    (``losses.lucir_lambda``), the old model's embedding from ``PhaseData.old_outputs``."""
    Options = LessForgetOptions
    needs_old_model = True
    needs_old_outputs = True

    def __init__(self, options, services):
        super().__init__(options, services)
        self.old_outputs, self.weight = None, 0.0

    def phase_start(self, phase, model, old_model, data):
        self.old_outputs = data.old_outputs
        self.weight = lucir_lambda(self.options.weight, phase.num_old, phase.num_new)

    def terms(self, batch, out):
        return {"less_forget": (self.weight, less_forget(out.embedding, self.old_outputs(batch).embedding))}

    def phase_end(self, phase, model, data):
        self.old_outputs = None


@dataclass(frozen=True)
class MarginRankingOptions:
    weight: float = 1.0       # LUCIR Sec. 3.3: L_mr added with weight 1 (official code: lw_mr = 1)
    margin: float = 0.5       # m (Sec. 4.1)
    k: int = 2                # the K hardest new classes (Sec. 4.1)

    def __post_init__(self):
        _non_negative("margin-ranking", weight=self.weight, margin=self.margin)
        if self.k < 1:
            raise ConfigError(f"components.margin-ranking.k must be >= 1, got {self.k}")


@register("term", "margin-ranking")
class MarginRanking(Component):
    """LUCIR's inter-class separation (Hou et al. 2019, Sec. 3.3, Eq. 8): for each old-class
    sample of the batch, its ground-truth score against the K hardest new classes' scores with a
    margin (``losses.margin_ranking``), scores = the head's similarities (cosine head: cos).
    Weight 0 skips it."""
    Options = MarginRankingOptions
    needs_old_model = True

    def __init__(self, options, services):
        super().__init__(options, services)
        self.model, self.num_old = None, 0

    def phase_start(self, phase, model, old_model, data):
        self.model, self.num_old = model, phase.num_old

    def terms(self, batch, out):
        o = self.options
        if o.weight == 0:
            return {}
        scores = self.model.head.similarity(out.embedding)
        return {"margin": (o.weight, margin_ranking(scores, batch.y, self.num_old, o.k, o.margin))}

    def phase_end(self, phase, model, data):
        self.model = None


@dataclass(frozen=True)
class PODOptions:
    spatial_weight: float = 3.0   # lambda_c (official options/podnet/podnet_cnn_cifar100.yaml: 3; ImageNet: 8)
    flat_weight: float = 1.0      # lambda_f (same files: 1; ImageNet: 10)

    def __post_init__(self):
        _non_negative("pod", spatial_weight=self.spatial_weight, flat_weight=self.flat_weight)


@register("term", "pod")
class PODDistill(Component):
    """PODNet's pooled outputs distillation (Douillard et al. 2020, Sec. 3.1): POD-spatial on every
    stage's output maps (width and height poolings, Eq. 2-3, ``losses.pod_distance``) and POD-flat
    on the embedding (``losses.pod_flat``), weights ``lambda sqrt(seen / new)`` (the official
    code's adaptive factor). The old model's pooled maps are kept in ``PhaseData.old_outputs``."""
    Options = PODOptions
    needs_old_model = True
    needs_old_outputs = True

    def __init__(self, options, services):
        super().__init__(options, services)
        self.old_outputs, self.adapt = None, 1.0
        self.sizes: list[int] | None = None   # POD vector sizes per stage

    def old_output_extra(self):
        def pooled(out):
            vs = pod_vectors(out.maps)
            self.sizes = [v.shape[1] for v in vs]
            return torch.cat(vs, dim=1)        # [B, sum_s C_s (H_s + W_s)]
        return pooled

    def phase_start(self, phase, model, old_model, data):
        self.old_outputs = data.old_outputs
        self.adapt = math.sqrt(phase.seen / phase.num_new)

    def terms(self, batch, out):
        t = self.old_outputs(batch)
        spatial = pod_distance(pod_vectors(out.maps), list(t.extra.split(self.sizes, dim=1)))
        flat = pod_flat(out.embedding, t.embedding)
        o = self.options
        return {"pod_spatial": (o.spatial_weight * self.adapt, spatial),
                "pod_flat": (o.flat_weight * self.adapt, flat)}

    def phase_end(self, phase, model, data):
        self.old_outputs = None


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
