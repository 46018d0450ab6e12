"""Loss-term components (kind ``term`` of ``cilearn.components``): logit distillation (``kd``),
LUCIR's less-forget constraint and margin ranking, PODNet's pooled-output distillation, LwM's
attention distillation, DT-ID's second teacher and the auxiliary classifier of an expandable
network (DER, FOSTER). A recipe lists its own (``Recipe.terms``); a user adds more to any method
with ``--distill NAME[,NAME]``. Each term gets the step (the batch, the phase's context, the old
model's outputs) and the student's output of the training forward (one forward serves the
classification loss and every term) and adds ``weight * value``; they run in phases > 0.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .attention import attention_distillation, gradcam, teacher_gradcam
from .components import Component, option, register
from .errors import ConfigError
from .evaluate import kd_target_stats, predict
from .losses import (dual_teacher_joint_target, kd_kl, less_forget, local_cross_entropy, lucir_lambda,
                     margin_ranking, pod_distance, pod_flat, pod_vectors)
from .models.heads import LinearHead
from .models.net import freeze
from .services import OldOutputs
from .train import fit


def _non_negative(name: str, **values: float) -> None:
    for k, v in values.items():
        if v < 0:
            raise ConfigError(f"components.{name}.{k} must be >= 0, got {v}")


@dataclass(frozen=True)
class KDOptions:
    # lambda; null: |old| / |seen|, with the classification loss weighted 1 - that (BiC Sec. 4.1, WA Sec. 3)
    weight: float | None = option(1.0, alias="loss.kd_weight")
    temperature: float = option(2.0, alias="loss.temperature")   # T (LwF, iCaRL: 2)

    def __post_init__(self):
        if (self.weight is not None and self.weight < 0) or not self.temperature > 0:
            raise ConfigError(f"components.kd: weight must be >= 0 (or null) and temperature > 0, "
                              f"got {self.weight}, {self.temperature}")


@register("term", "kd")
class KD(Component):
    """Logit distillation of the old classes' logits (Hinton et al.; LwF, iCaRL): ``KL_T`` of the
    student's old-class logits to the old model's (``losses.kd_kl``, T = 2, no T^2 factor), weight
    lambda (1; null: ``|old| / |seen|``). The old model's logits come from the old-output cache.
    ``kd_target_entropy`` / ``kd_target_top_share`` per phase (``evaluate.kd_target_stats``): how much
    the old model's targets on the phase's training images say about the old classes."""
    Options = KDOptions
    from_phase = 1
    needs_old_outputs = True

    def __init__(self, options, services):
        super().__init__(options, services)
        self.stats: dict[str, float] | None = None

    def phase_start(self, ctx):
        cached = ctx.old_outputs.cached
        s = self.services
        logits = cached[0][0] if cached is not None else predict(ctx.old_model, ctx.x, s.augmenter, s.eval_batch_size,
                                                                 s.autocast_dtype)[0]
        self.stats = kd_target_stats(logits, self.options.temperature)

    def weight(self, phase) -> float:
        w = self.options.weight
        return phase.num_old / phase.seen if w is None else w

    def terms(self, step, out):
        w = self.weight(step.ctx.phase)
        if w <= 0:
            return {}
        t_logits = step.old.logits
        return {"kd": (w, kd_kl(out.logits[:, : t_logits.shape[1]], t_logits, self.options.temperature))}

    def diagnostics(self):
        st, self.stats = self.stats or {}, None
        return {"kd_target_entropy": st.get("kd_target_entropy"), "kd_target_top_share": st.get("kd_target_top_share")}


@dataclass(frozen=True)
class LessForgetOptions:
    # lambda_base (LUCIR Sec. 4: 5 on CIFAR-100, 10 on ImageNet; the recipes set 10 on image folders)
    weight: float = option(5.0, alias="loss.less_forget_weight")

    def __post_init__(self):
        _non_negative("less-forget", weight=self.weight)


@register("term", "less-forget")
class LessForget(Component):
    """LUCIR's less-forget constraint (Hou et al. 2019, Sec. 3.2, Eq. 6): ``1 - cos(f_old(x), f(x))``
    on every training sample's embedding, weight ``lambda = lambda_base sqrt(|old| / |new|)``
    (``losses.lucir_lambda``), the old model's embedding from the old-output cache."""
    Options = LessForgetOptions
    from_phase = 1
    needs_old_outputs = True

    def terms(self, step, out):
        p = step.ctx.phase
        return {"less_forget": (lucir_lambda(self.options.weight, p.num_old, p.num_new),
                                less_forget(out.embedding, step.old.embedding))}


@dataclass(frozen=True)
class MarginRankingOptions:
    weight: float = option(1.0, alias="loss.margin_weight")   # LUCIR Sec. 3.3: weight 1 (official code: lw_mr = 1)
    margin: float = option(0.5, alias="loss.margin")          # m (Sec. 4.1)
    k: int = option(2, alias="loss.margin_k")                 # the K hardest new classes (Sec. 4.1)

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
    from_phase = 1

    def terms(self, step, out):
        o, ctx = self.options, step.ctx
        if o.weight == 0:
            return {}
        scores = ctx.model.head.similarity(out.embedding)
        return {"margin": (o.weight, margin_ranking(scores, step.batch.y, ctx.phase.num_old, o.k, o.margin))}


@dataclass(frozen=True)
class PODOptions:
    # lambda_c (official options/podnet/podnet_cnn_cifar100.yaml: 3; ImageNet: 8)
    spatial_weight: float = option(3.0, alias="loss.pod_spatial_weight")
    # lambda_f (same files: 1; ImageNet: 10)
    flat_weight: float = option(1.0, alias="loss.pod_flat_weight")

    def __post_init__(self):
        _non_negative("pod", spatial_weight=self.spatial_weight, flat_weight=self.flat_weight)


@register("term", "pod")
class PODDistill(Component):
    """PODNet's pooled outputs distillation (Douillard et al. 2020, Sec. 3.1): POD-spatial on every
    stage's output maps (width and height poolings, Eq. 2-3, ``losses.pod_distance``) and POD-flat
    on the embedding (``losses.pod_flat``), weights ``lambda sqrt(seen / new)`` (the official
    code's adaptive factor). The old model's pooled maps are kept in the old-output cache."""
    Options = PODOptions
    from_phase = 1
    needs_old_outputs = True

    def __init__(self, options, services):
        super().__init__(options, services)
        self.sizes: list[int] | None = None   # POD vector sizes per stage

    def old_outputs_extra(self):
        def pooled(out):
            vs = pod_vectors(out.maps)
            self.sizes = [v.shape[1] for v in vs]
            return torch.cat(vs, dim=1)        # [B, sum_s C_s (H_s + W_s)]
        return pooled

    def terms(self, step, out):
        t = step.old
        p = step.ctx.phase
        adapt = math.sqrt(p.seen / p.num_new)
        spatial = pod_distance(pod_vectors(out.maps), list(t.extra.split(self.sizes, dim=1)))
        flat = pod_flat(out.embedding, t.embedding)
        o = self.options
        return {"pod_spatial": (o.spatial_weight * adapt, spatial), "pod_flat": (o.flat_weight * adapt, flat)}


@dataclass(frozen=True)
class AttentionOptions:
    # gamma of Eq. 3 (Dhar et al. 2019); Sec. 4 gives no value (FACIL notes the same)
    weight: float = option(1.0, alias="loss.attention_weight")
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
    per_phase = ("cam", "b", "stats")
    reports = ("save_attention",)

    def __init__(self, options, services):
        super().__init__(options, services)
        self.cam = self.b = None   # cached maps [V, N, h, w] and classes [V, N]
        self.stats: list | None = None    # (BatchNorm layer, running mean, running var) at the step's start
        self.first: float | None = None   # L_AD at the phase's first step

    def phase_start(self, ctx):
        old, k = ctx.old_model, ctx.phase.num_old
        got = self.services.views(ctx.x, lambda xb: teacher_gradcam(old, xb, k)[:2])
        self.cam, self.b = got if got is not None else (None, None)   # [V, N, h, w], [V, N]

    def teacher_maps(self, step) -> tuple[torch.Tensor, torch.Tensor]:
        batch = step.batch
        if self.cam is not None and batch.view is not None:
            return self.cam[batch.view, batch.idx], self.b[batch.view, batch.idx]
        cam, b, _ = teacher_gradcam(step.ctx.old_model, batch.x, step.ctx.phase.num_old)
        return cam, b

    def before_step(self, step):
        """Before the training forward: the running statistics the student's eval-mode map uses
        (the training forward will have moved them by one batch of momentum)."""
        if self.options.student_bn == "eval":
            self.stats = [(m, m.running_mean.clone(), m.running_var.clone()) for m in step.ctx.model.modules()
                          if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None]

    def student_map(self, step, out, b: torch.Tensor) -> torch.Tensor:
        """The student's Grad-CAM ``[B, h, w]`` for classes ``b``, differentiable (create_graph).
        eval: a forward of the student in eval mode with the running statistics it had at the start
        of this step (before the training forward updated them), so that at a phase's first step
        (student == old model) the map is the old model's."""
        if self.options.student_bn == "train":
            return gradcam(out.maps[-1], out.logits, b, create_graph=True)
        model, was = step.ctx.model, step.ctx.model.training
        stats = self.stats or []
        now = [(m, m.running_mean, m.running_var) for m, _, _ in stats]
        for m, mean, var in stats:
            m.running_mean, m.running_var = mean, var
        model.eval()
        try:
            o = model(step.batch.x)        # BN with those running statistics; parameters keep their gradients
        finally:
            model.train(was)
            for m, mean, var in now:
                m.running_mean, m.running_var = mean, var
        return gradcam(o.maps[-1], o.logits, b, create_graph=True)

    def terms(self, step, out):
        cam_t, b = self.teacher_maps(step)
        loss = attention_distillation(self.student_map(step, out, b), cam_t)
        if self.first is None:
            self.first = float(loss.detach())
        return {"attention": (self.options.weight, loss)}

    def state_dict(self):
        return {} if self.first is None else {"first": self.first}     # a resumed phase keeps its first step's

    def load_state_dict(self, state):
        self.first = state.get("first")

    def diagnostics(self):
        v, self.first = self.first, None
        return {"attention_loss_first_step": v}


@dataclass(frozen=True)
class DualTeacherOptions:
    weight: float = option(1.0, alias="loss.dual_teacher_weight")   # w of the new-class block's KD
    # copy: the new teacher starts from the old model; scratch: a fresh initialisation
    init: str = option("copy", alias="loss.dual_teacher_init")
    epochs: int | None = option(None, alias="loss.dual_teacher_epochs")   # its training epochs; null: the phase's
    temperature: float = option(2.0, alias="loss.temperature")           # T of its KD
    # how the new teacher's logits are distilled (docs/methods/dfgr-dtid.md): blockwise, a softmax
    # over the new-class block only; joint, one softmax over all seen classes with the old
    # teacher's old block and the new teacher's new block calibrated onto it
    rule: str = "blockwise"

    def __post_init__(self):
        _non_negative("dual-teacher", weight=self.weight, epochs=self.epochs or 0)
        if self.init not in ("copy", "scratch") or self.rule not in ("blockwise", "joint") \
                or not self.temperature > 0:
            raise ConfigError(f"components.dual-teacher: init must be copy or scratch, rule blockwise or joint, "
                              f"temperature > 0; got {self.init!r}, {self.rule!r}, {self.temperature}")


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
    per_phase = ("cache",)

    def __init__(self, options, services):
        super().__init__(options, services)
        self.needs_old_outputs = options.rule == "joint"      # the old teacher's logits per batch
        self.cache = None
        self.seconds: float | None = None

    @classmethod
    def resolve(cls, options, run):
        return {**options, "epochs": run.cfg.train.epochs if options.get("epochs") is None else options["epochs"]}

    def phase_start(self, ctx):
        s, o, phase = self.services, self.options, ctx.phase
        new = ctx.y >= phase.start
        xn, yn = ctx.x[new], ctx.y[new]
        seed = s.seed * 1_000_003 + phase.index * 7919 + 17      # apart from the run's RNG stream
        with torch.random.fork_rng(devices=[s.device] if s.device.type == "cuda" else []):
            torch.manual_seed(seed)
            teacher = copy.deepcopy(ctx.old_model)         # the old model (head not grown)
            if o.init == "scratch":
                for mod in teacher.modules():
                    if mod is not teacher and hasattr(mod, "reset_parameters"):
                        mod.reset_parameters()
            teacher.add_classes(phase.num_new)
        for p in teacher.parameters():
            p.requires_grad_(True)
        counts = torch.bincount(yn, minlength=phase.seen).float()

        def loss(batch):
            v = local_cross_entropy(teacher(batch.x).logits, batch.y, counts)
            return v, {"ce": v.detach()}

        over = {} if o.epochs is None else {"epochs": o.epochs}
        gen = torch.Generator(device=s.device).manual_seed(seed)
        fr = fit(teacher, xn, yn, loss, s.fit_settings(phase, **over), s.augmenter, gen,
                 desc=f"phase {phase.index} new-class teacher")
        freeze(teacher)
        self.seconds = fr.seconds
        self.cache = OldOutputs(teacher, ctx.x, s)     # its outputs once per image and view (finite views)

    def terms(self, step, out):
        p = step.ctx.phase
        a, b = p.start, p.end
        o, new_t = self.options, self.cache(step.batch).logits          # [B, seen]
        if o.rule == "blockwise":
            value = kd_kl(out.logits[:, a:b], new_t[:, a:b], o.temperature)
        else:
            target = dual_teacher_joint_target(step.old.logits, new_t[:, :b], a, o.temperature)
            value = kd_kl(out.logits[:, :b], target, o.temperature)
        return {"dual-teacher": (o.weight, value)}

    def diagnostics(self):
        s, self.seconds = self.seconds, None
        return {"new_teacher_seconds": s}


@dataclass(frozen=True)
class AuxiliaryOptions:
    weight: float = option(1.0, alias="loss.aux_weight")   # DER's lambda_a, FOSTER's feature enhancement: 1
    # the auxiliary classifier's classes: old-bucket, the new classes + one class for all old ones
    # (DER's auxiliary loss); seen, every seen class (FOSTER's feature enhancement)
    targets: str = "old-bucket"

    def __post_init__(self):
        _non_negative("aux-ce", weight=self.weight)
        if self.targets not in ("old-bucket", "seen"):
            raise ConfigError(f"components.aux-ce.targets must be old-bucket or seen, got {self.targets!r}")


@register("term", "aux-ce")
class AuxiliaryCE(Component):
    """The auxiliary classifier of an expandable network (DER's auxiliary loss, FOSTER's feature
    enhancement): in each phase > 0, a linear head on the newest extractor's embedding (the last
    ``model.new_dim`` coordinates) over ``targets``, trained with the net by CE, weight ``weight``
    (1), and dropped after the phase. Its parameters are what ``train_parameters`` adds to the
    main stage; its state is checkpointed inside the phase."""
    Options = AuxiliaryOptions
    from_phase = 1
    per_phase = ("head",)

    def __init__(self, options, services):
        super().__init__(options, services)
        self.head: LinearHead | None = None

    def phase_start(self, ctx):
        p = ctx.phase
        self.head = LinearHead(ctx.model.new_dim).to(self.services.device)
        self.head.add_classes(p.num_new + 1 if self.options.targets == "old-bucket" else p.seen)

    def train_parameters(self, ctx):
        return list(self.head.parameters()) if self.head is not None else []

    def targets(self, y: torch.Tensor, phase) -> torch.Tensor:
        """old-bucket: 0 for every old class, 1..num_new for the new ones; seen: the labels."""
        return (y - phase.num_old + 1).clamp_min(0) if self.options.targets == "old-bucket" else y

    def terms(self, step, out):
        if self.head is None or self.options.weight == 0:
            return {}
        logits = self.head(out.embedding[:, -step.ctx.model.new_dim:])      # [B, aux classes]
        return {"aux": (self.options.weight, F.cross_entropy(logits.float(), self.targets(step.batch.y, step.ctx.phase)))}

    def state_dict(self):
        return {} if self.head is None else {"head": {k: v.cpu() for k, v in self.head.state_dict().items()}}

    def load_state_dict(self, state):
        if self.head is not None and "head" in state:        # resumed inside a phase
            self.head.load_state_dict(state["head"])
