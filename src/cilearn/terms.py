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
from .losses import (CLS_LOSSES, dual_teacher_joint_target, kd_kl, less_forget, lucir_lambda, margin_ranking,
                     pod_distance, pod_flat, pod_vectors)
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
    # BatchNorm mode of the student's Grad-CAM. eval: a second student forward in eval mode, the
    # same mode as the old model's map (FACIL's choice), so L_AD is exactly 0 when student == old
    # model. train: the map of the training forward (BN batch statistics), cilearn's earlier form:
    # L_AD is then not 0 at the phase start (3.77 on a digits batch) and trains BN artefacts.
    student_bn: str = "eval"

    def __post_init__(self):
        _non_negative("attention", weight=self.weight)
        if self.student_bn not in ("eval", "train"):
            raise ConfigError(f"components.attention.student_bn must be eval or train, got {self.student_bn!r}")


@register("term", "attention")
class AttentionDistill(Component):
    """LwM's attention distillation (Dhar et al. 2019, Sec. 3), weight gamma. Grad-CAM on the last
    stage for ``b``, the old model's top old class; both maps in the same BatchNorm mode: the old
    model's in eval mode, the student's (``student_bn`` eval, the default) from a second forward of
    the student in eval mode with ``create_graph=True``, so L_AD trains the student through its
    activations and its Grad-CAM weights and is exactly 0 when the student equals the old model
    (see ``cilearn.attention``). ``student_bn`` train takes the map of the training forward
    instead (one forward less; BN batch statistics). With a finite augmentation (none, flip) the
    old model's maps and ``b`` are computed once per training image and view, exactly as it would
    per batch. ``attention_loss_first_step`` in each phase's metrics row: L_AD at the phase's
    first training step. (``--save-attention N``: the reporting layer draws N test images' maps
    after each phase.)"""
    Options = AttentionOptions
    needs_old_model = True

    def __init__(self, options, services):
        super().__init__(options, services)
        self.cam = self.b = None   # cached maps [V, N, h, w] and classes [V, N]
        self.old_model = self.model = None
        self.num_old = 0
        self.first: float | None = None   # L_AD at the phase's first step
        self.stats: list = []             # (BatchNorm layer, running mean, running var) at the step's start

    def phase_start(self, phase, model, old_model, data):
        self.old_model, self.model, self.num_old = old_model, model, phase.num_old
        got = self.services.views(data.x, lambda xb: teacher_gradcam(old_model, xb, phase.num_old)[:2])
        self.cam, self.b = got if got is not None else (None, None)   # [V, N, h, w], [V, N]

    def teacher_maps(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cam is not None and batch.view is not None:
            return self.cam[batch.view, batch.idx], self.b[batch.view, batch.idx]
        cam, b, _ = teacher_gradcam(self.old_model, batch.x, self.num_old)
        return cam, b

    def batch(self, batch):
        """Before the training forward: the running statistics the student's eval-mode map uses
        (the training forward will have moved them by one batch of momentum)."""
        if self.options.student_bn == "eval":
            self.stats = [(m, m.running_mean.clone(), m.running_var.clone()) for m in self.model.modules()
                          if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None]
        return batch

    def student_map(self, batch, out, b: torch.Tensor) -> torch.Tensor:
        """The student's Grad-CAM ``[B, h, w]`` for classes ``b``, differentiable (create_graph).
        eval: a forward of the student in eval mode with the running statistics it had at the start
        of this step (before the training forward updated them), so that at a phase's first step
        (student == old model) the map is the old model's."""
        if self.options.student_bn == "train":
            return gradcam(out.maps[-1], out.logits, b, create_graph=True)
        model, was = self.model, self.model.training
        now = [(m, m.running_mean, m.running_var) for m, _, _ in self.stats]
        for m, mean, var in self.stats:
            m.running_mean, m.running_var = mean, var
        model.eval()
        try:
            o = model(batch.x)        # BN with those running statistics; parameters keep their gradients
        finally:
            model.train(was)
            for m, mean, var in now:
                m.running_mean, m.running_var = mean, var
        return gradcam(o.maps[-1], o.logits, b, create_graph=True)

    def terms(self, batch, out):
        cam_t, b = self.teacher_maps(batch)
        loss = attention_distillation(self.student_map(batch, out, b), cam_t)
        if self.first is None:
            self.first = float(loss.detach())
        return {"attention": (self.options.weight, loss)}

    def phase_end(self, phase, model, data):
        self.cam = self.b = self.old_model = self.model = None
        self.stats = []

    def state_dict(self):
        return {} if self.first is None else {"first": self.first}     # a resumed phase keeps its first step's

    def load_state_dict(self, state):
        self.first = state.get("first")

    def diagnostics(self):
        v, self.first = self.first, None
        return {"attention_loss_first_step": v}


@dataclass(frozen=True)
class DualTeacherOptions:
    weight: float = 1.0          # w of the new-class block's KD (the old block keeps the method's own KD)
    init: str = "copy"           # copy: the new teacher starts from the old model; scratch: a fresh initialisation
    epochs: int | None = None    # its training epochs; None: the phase's
    temperature: float = 2.0     # T of its KD (the run's --loss.temperature)
    # how the new teacher's logits are distilled (docs/methods/dfgr-dtid.md): blockwise, a softmax
    # over the new-class block only; joint, one softmax over all seen classes with the old
    # teacher's old block and the new teacher's new block calibrated onto it
    rule: str = "blockwise"

    def __post_init__(self):
        if self.rule not in ("blockwise", "joint"):
            raise ConfigError(f"components.dual-teacher.rule must be blockwise or joint, got {self.rule!r}")


@register("term", "dual-teacher")
class DualTeacherDistill(Component):
    """DT-ID's second teacher (Choi et al. 2021): before the phase's main stage, a new-class
    teacher is trained on the phase's new-class images alone (never on exemplars or generated
    samples), starting from a copy of the old model (``init`` copy) or from a fresh initialisation
    (``scratch``), with CE over the new classes, for ``epochs`` (default: the phase's). The student
    then distils its logits from it, by ``rule``:

    * blockwise: ``L = L_cls + beta KL_T(old block | old teacher) + w KL_T(new block | new teacher)``,
      each KL a softmax at temperature T over its own block only (``losses.kd_kl``);
    * joint: ``L = L_cls + beta KL_T(old block | old teacher) + w KL_T(all seen | joint target)``,
      one softmax over all seen classes whose target joins the old teacher's old block and the new
      teacher's new block calibrated onto it (``losses.dual_teacher_joint_target``), so the target
      carries a scale between old and new classes.

    The old-block term is the method's own KD (LwF, iCaRL: ``kd`` at T); the dual-teacher term is
    on every training image of the batch. With a finite augmentation the teachers' logits are
    computed once per image and view. The new teacher's training draws from a generator seeded by
    (seed, phase), apart from the run's."""
    Options = DualTeacherOptions
    needs_old_model = True

    def __init__(self, options, services):
        super().__init__(options, services)
        self.needs_old_outputs = options.rule == "joint"      # the old teacher's logits per batch
        self.old_outputs = None
        self.new_teacher = self.cache = None
        self.seconds: float | None = None
        self.block = (0, 0)

    def phase_start(self, phase, model, old_model, data):
        s, o = self.services, self.options
        self.old_outputs = data.old_outputs
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
        o, new_t = self.options, self.cache(batch).logits          # [B, seen]
        if o.rule == "blockwise":
            value = kd_kl(out.logits[:, a:b], new_t[:, a:b], o.temperature)
        else:
            target = dual_teacher_joint_target(self.old_outputs(batch).logits, new_t[:, :b], a, o.temperature)
            value = kd_kl(out.logits[:, :b], target, o.temperature)
        return {"dual-teacher": (o.weight, value)}

    def phase_end(self, phase, model, data):
        self.new_teacher = self.cache = self.old_outputs = None

    def diagnostics(self):
        s, self.seconds = self.seconds, None
        return {"new_teacher_seconds": s}
