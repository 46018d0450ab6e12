"""The method contract. A method is a recipe of components (classification loss, distillation,
memory, head) plus, when its paper needs them, a few hooks; the runner owns the phase loop and
``cilearn.train.fit`` owns the epoch loop.

Hooks, in phase order (see ``cilearn.runner``):
  ``training_set(phase, data)``  -> the (uint8 x, y) this phase trains on
  ``before_phase(phase, x, y)``  -> grow the head, freeze a teacher, prepare caches
  ``train_phase(phase, x, y)``   -> one or more calls of ``fit`` (default: the main stage, then
                                    ``calibrate`` and, where enabled, class-balanced fine-tuning)
  ``loss(batch)``                -> (loss, terms) for ``fit``; calls ``constrain`` first, the
                                    student's ``forward(batch)``, then adds ``teacher_terms``
                                    (``train_parameters()``: what the main stage trains)
  ``after_phase(phase, data)``   -> memory update
  ``prototypes()``               -> class means for NME prediction, or None
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F

from ..calibration import clip_nonnegative
from ..components import (
    REGISTRIES,
    Components,
    PhaseData,
    build,
    component_class,
    effective_options,
)
from ..data.scenario import Phase
from ..errors import ConfigError
from ..evaluate import kd_target_stats, predict
from ..losses import CLS_LOSSES, DISTILL
from ..memory.compress import random_box_artifacts
from ..registry import Registry
from ..services import Context, SplitData, TeacherCache
from ..train import Batch, FitResult
from .imprint import imprint

if TYPE_CHECKING:
    from ..config import RunConfig, TrainingDefaults

METHODS: Registry = Registry("method")


class Method:
    """Default recipe: classification loss on the phase's data (+ exemplars when the method
    keeps memory) + optional logit distillation from the previous model on the old classes."""

    name: ClassVar[str]
    training: ClassVar["TrainingDefaults"]  # lr, schedule, epochs, ... per data-set family (cilearn.methods.schedules)
    cls_loss: ClassVar[str] = "ce"          # key of CLS_LOSSES
    distill: ClassVar[str | None] = None    # key of DISTILL, on the old-class logits
    kd_weight: ClassVar[float] = 1.0
    terms: ClassVar[tuple[str, ...]] = ()   # loss-term components of the recipe (cilearn.terms, e.g. attention)
    replay_source: ClassVar[str | None] = None   # replay component (cilearn.replay: dfgr), default of --replay
    uses_memory: ClassVar[bool] = False
    memory_optimizer: ClassVar[str] = "none"  # default of memory.optimizer (cilearn.memory.mnemonics)
    memory_compressor: ClassVar[str] = "none"  # default of memory.compressor (cilearn.memory.compress)
    train_on_seen: ClassVar[bool] = False   # joint: all data of the classes seen so far
    head: ClassVar[str] = "linear"
    last_relu: ClassVar[bool] = True        # default of model.last_relu (LUCIR, PODNet: False)
    head_scale: ClassVar[float] = 1.0       # default of model.scale: initial sigma of cosine / lsc heads
    needs_teacher: ClassVar[bool] = False   # ``teacher_terms`` read the teacher's (logits, embedding)
    own_terms: ClassVar[tuple[str, ...]] = ()  # names of the recipe's own terms (``teacher_terms``), for tables
    options_used: ClassVar[tuple[str, ...]] = ()  # run options the recipe's own code reads (methods.options)
    adaptive_kd_weight: ClassVar[bool] = False  # loss.kd_weight null means |old| / |seen| (WA, BiC)
    calibration: ClassVar[tuple[str, ...]] = ()  # calibration components (cilearn.calibration), phases > 0
    weight_clip: ClassVar[bool] = False         # default of train.weight_clip (WA's clipping)
    freeze_old_head: ClassVar[bool] = False     # default of train.freeze_old_head (LUCIR, PODNet)
    imprint: ClassVar[bool] = False             # imprint the new classes' head rows (LUCIR, PODNet)
    expandable: ClassVar[bool] = False          # an ExpandableNet: one extractor per phase (DER, FOSTER)

    @classmethod
    def component_options(cls, dataset: str) -> dict[str, dict]:
        """The recipe's option defaults of its components (``{name: {option: value}}``), where they
        differ from the components' own."""
        return {}

    @classmethod
    def calibration_names(cls, cfg: "RunConfig") -> list[str]:
        """The run's calibration components: ``--calibration``, else the recipe's, with the
        shorthands ``--train.weight-align`` / ``--balanced-finetune`` adding or removing theirs."""
        names = list(cls.calibration if cfg.calibration is None else cfg.calibration)
        for flag, name in ((cfg.train.weight_align, "weight-align"), (cfg.train.balanced_finetune, "balanced-finetune")):
            if flag is True and name not in names:
                names.append(name)
            elif flag is False and name in names:
                names.remove(name)
        for n in names:
            component_class("calibration", n)          # a ConfigError naming the choices
        return names

    @classmethod
    def resolve_components(cls, cfg: "RunConfig") -> tuple[list[str], dict[str, dict]]:
        """(calibration names, effective options of every contract component in the run): the
        components' defaults, the recipe's (``component_options``), the legacy shorthands
        (``--train.finetune-*``), then ``components.<name>`` of the config; an entry of
        ``components`` naming a component that is not in the run is a ConfigError."""
        names = cls.calibration_names(cfg)
        chosen = cls.component_classes(cfg)
        recipe = cls.component_options(cfg.data.dataset)
        t, lc = cfg.train, cfg.loss
        legacy = {"balanced-finetune": {k: v for k, v in (("epochs", t.finetune_epochs), ("lr", t.finetune_lr),
                                                          ("head_only", t.finetune_head_only)) if v is not None},
                  # the loss section's shorthands of the term components
                  "attention": {} if lc.attention_weight is None else {"weight": lc.attention_weight},
                  "dual-teacher": {"weight": lc.dual_teacher_weight, "init": lc.dual_teacher_init,
                                   "temperature": lc.temperature,
                                   **({} if lc.dual_teacher_epochs is None else {"epochs": lc.dual_teacher_epochs})},
                  # the replay section's shorthands, the method's KD and its temperature
                  "dfgr": {**{k: v for k, v in dataclasses.asdict(cfg.replay).items() if k != "source"},
                           "distill": cls.distill or "kd", "temperature": lc.temperature}}
        merged = {c.name: {**recipe.get(c.name, {}), **legacy.get(c.name, {})} for c in chosen}
        canonical = {c.name.replace("-", "_"): c.name for c in chosen}   # dotted flags turn - into _
        for n, given in cfg.components.items():
            name = canonical.get(str(n).replace("-", "_"), n)
            if name not in merged:
                merged[name] = {}       # effective_options names it in its error
                continue
            if not isinstance(given, dict):
                raise ConfigError(f"components.{n} must be a mapping of options, got {given!r}")
            merged[name].update({str(k).replace("-", "_"): v for k, v in given.items()})
        return names, effective_options(chosen, merged)

    @classmethod
    def component_classes(cls, cfg: "RunConfig") -> list[type]:
        """The run's contract components in their order: calibration, loss terms, replay."""
        replay = cfg.replay.source or cls.replay_source
        return [component_class("calibration", n) for n in cls.calibration_names(cfg)] + \
            [component_class("term", n) for n in cls.term_component_names(cfg)] + \
            ([component_class("replay", replay)] if replay not in (None, "none") else [])

    @classmethod
    def term_component_names(cls, cfg: "RunConfig") -> list[str]:
        """The run's loss-term components: the recipe's and ``--distill NAME[,NAME]``'s
        (``cilearn.terms``, or a plugin's); a ConfigError naming the choices for an unknown one."""
        names = list(dict.fromkeys(cls.terms + tuple(cfg.loss.distill)))
        for n in names:
            if n not in REGISTRIES["term"]:
                raise ConfigError(f"--distill: unknown term '{n}'; expected one of: "
                                  f"{', '.join(REGISTRIES['term'].names())}")
        return names

    @classmethod
    def check_config(cls, cfg: "RunConfig", has_memory: bool) -> None:
        """Checks of the method against the configuration, before anything is written."""
        for n in cls.calibration_names(cfg):
            if component_class("calibration", n).needs_memory and not has_memory:
                raise ConfigError(f"--calibration {n} needs exemplars and --method {cfg.method} keeps none here: "
                                  f"give --memory N or --memory-per-class N, or drop {n}")

    def __init__(self, ctx: Context):
        self.ctx, self.net = ctx, ctx.net
        lc = ctx.cfg.loss
        name = lc.cls or self.cls_loss
        self.cls_fn = CLS_LOSSES.get(name)
        if opt := getattr(self.cls_fn, "margin_option", None):   # NCA: margin eta * delta in logit units
            fn, head, delta = self.cls_fn, self.net.head, getattr(lc, opt)
            scale = lambda: head.sigma.detach() if hasattr(head, "sigma") else 1.0   # noqa: E731 (see losses.nca)
            self.cls_fn = lambda logits, y, counts=None: fn(logits, y, counts, margin=scale() * delta)
        elif opt := getattr(self.cls_fn, "beta_option", None):    # FOSTER's la-ce: --loss.la-beta
            fn, beta = self.cls_fn, getattr(lc, opt)
            self.cls_fn = lambda logits, y, counts=None: fn(logits, y, counts, beta=beta)
        self.kd_fn = DISTILL.get(self.distill) if self.distill else None
        self.lam = self.kd_weight if lc.kd_weight is None else lc.kd_weight
        self.T = lc.temperature
        _, options = self.resolve_components(ctx.cfg)             # idempotent on a resolved config
        self.components = Components([build(c, options[c.name], ctx) for c in self.component_classes(ctx.cfg)])
        self.components.attach(self.net)
        self.phase_data: PhaseData | None = None
        self.teacher = None
        self.teacher_out: TeacherCache | None = None
        self.kd_stats: dict[str, float] | None = None   # this phase's ``teacher_target_stats``
        self.counts: torch.Tensor | None = None
        self.phase: Phase | None = None
        self.cls_weight = 1.0                 # weight of the classification loss (WA: 1 - lambda)
        t = ctx.cfg.train
        self.clip = self.weight_clip if t.weight_clip is None else t.weight_clip
        self.finetune_seconds = 0.0           # this phase's calibration stages
        self.freeze = self.freeze_old_head if t.freeze_old_head is None else t.freeze_old_head
        self.frozen_old: list[tuple[torch.Tensor, torch.Tensor]] | None = None   # (parameter, old rows)

    # ---------------------------------------------------------------- hooks
    def training_set(self, phase: Phase, data: SplitData) -> tuple[torch.Tensor, torch.Tensor]:
        self.components.start(phase)
        if self.train_on_seen:
            return self.components.training_set(phase, *data.train_of(range(0, phase.end)), self.ctx.memory)
        x, y = data.train_of(phase.classes)
        mem = self.ctx.memory.data() if self.ctx.memory is not None else None
        if mem is not None:
            x, y = torch.cat([x, mem[0]]), torch.cat([y, mem[1]])
        return self.components.training_set(phase, x, y, self.ctx.memory)

    def before_phase(self, phase: Phase, x: torch.Tensor, y: torch.Tensor) -> None:
        self.phase = phase
        self.finetune_seconds = 0.0
        self.kd_stats = None
        old_model_terms = any(p.kind in ("term", "replay") and p.needs_old_model for p in self.components.active)
        if phase.index > 0 and (self.kd_fn is not None or old_model_terms or self.needs_teacher):
            self.teacher = self.net.frozen_copy()
            if self.kd_fn is not None or self.needs_teacher:
                self.teacher_out = TeacherCache(self.teacher, x, self.ctx, self.teacher_extra())
            if self.kd_fn is not None:
                self.kd_stats = self.teacher_target_stats(x)
        self.counts = torch.bincount(y, minlength=phase.seen).float()
        mem = self.ctx.memory
        self.phase_data = PhaseData(x, y, self.counts, mem, self.cls_fn)
        # the components' phase start: before the head grows (the old model is the teacher; a
        # generator's or a new teacher's draws come here, in this order, before the new rows')
        self.components.phase_start(phase, self.net, self.teacher, self.phase_data)
        self.net.add_classes(phase.num_new)
        comp = mem.compressor if mem is not None else None
        self.artifact_prob = comp.cfg.artifact_prob if comp is not None and phase.index > 0 else 0.0
        self.frozen_old = None
        if phase.index > 0 and self.imprint:
            self.imprint_new(phase, x, y)
        if phase.index > 0 and self.freeze:
            head = self.net.head
            per = head.weight.shape[0] // phase.seen          # rows per class (LSC: proxies)
            self.frozen_old = [(p, p[: phase.num_old * per].detach().clone())
                               for p in (head.weight, getattr(head, "bias", None)) if p is not None]

    def teacher_target_stats(self, x: torch.Tensor) -> dict[str, float]:
        """``evaluate.kd_target_stats`` of the teacher's logits on the unaugmented training images
        ``x`` (from the cache when there is one)."""
        cached = self.teacher_out.cached if self.teacher_out is not None else None
        logits = cached[0][0] if cached is not None else predict(self.teacher, x, self.ctx.augmenter,
                                                                 self.ctx.cfg.train.eval_batch_size,
                                                                 self.ctx.autocast_dtype)[0]
        return kd_target_stats(logits, self.T)

    def diagnostics(self) -> dict[str, float | None]:
        """Per-phase values for the metrics rows beyond the evaluation (null where not defined)."""
        out = {"kd_target_entropy": None, "kd_target_top_share": None, **(self.kd_stats or {}),
               **self.components.diagnostics()}
        return out

    def teacher_extra(self):
        """A function of the teacher's ``NetOutput`` giving ``[B, F]`` more for ``TeacherCache`` to
        keep (PODNet: its pooled feature maps), or None."""
        return None

    def imprint_new(self, phase: Phase, x: torch.Tensor, y: torch.Tensor) -> None:
        """Weight imprinting of the new classes' rows (``cilearn.methods.imprint``) from the
        current model's embeddings of their images: the teacher's cached ones (unflipped view)
        when the augmentation has finite views, else one embedding pass."""
        new = (y >= phase.start).nonzero().flatten()
        emb = self.teacher_out.cached_embeddings(new) if self.teacher_out is not None else None
        if emb is None:
            emb = self.ctx.embed(self.net, x[new])
        imprint(self.net.head, emb, y[new], phase.classes, self.ctx.phase_generator(phase))

    def train_phase(self, phase: Phase, x: torch.Tensor, y: torch.Tensor) -> FitResult:
        """The main stage, then (unless a resumed run continues a later stage of this phase) the
        constraints' projection after its last step."""
        desc = f"phase {phase.index}"
        ckpt = self.ctx.ckpt
        later_stage = ckpt is not None and ckpt.skip_stage(desc)   # resuming e.g. the fine-tuning
        fr = self.ctx.fit(x, y, self.loss, self.ctx.fit_settings(phase), desc=desc, params=self.train_parameters())
        if not later_stage:
            self.constrain()        # the projection after the stage's last optimizer step
        return fr

    def epoch_end(self, stage: str, epoch: int) -> None:
        """After each epoch of a training stage: the components' ``epoch_end`` for the main stage."""
        if self.phase is not None and stage == f"phase {self.phase.index}":
            self.components.epoch_end(self.phase, epoch)

    def train_parameters(self):
        """What the main stage trains: None = all of the net's parameters that have a gradient
        (DER, FOSTER: plus their auxiliary head)."""
        return None

    def constrain(self) -> None:
        """Projection of the parameters onto the method's constraints (``--train.weight-clip``:
        non-negative head weights; LUCIR: old-class rows fixed), run before every training step
        of the main stage (i.e. after the previous optimizer step) and once after the stage:
        projected SGD."""
        if self.clip:
            clip_nonnegative(self.net.head.weight)
        if self.frozen_old is not None:     # --train.freeze-old-head: old classes' rows fixed
            with torch.no_grad():
                for p, rows in self.frozen_old:
                    p[: len(rows)] = rows

    def calibrate(self, phase: Phase) -> FitResult:
        """The phase's calibration components in order (``cilearn.calibration``; phases > 0): the
        seconds and images of the stages they ran (``finetune_seconds`` of the phase's row)."""
        stages = self.components.calibrate(phase, self.net, self.phase_data)
        self.finetune_seconds = sum(s.seconds for s in stages)
        return FitResult(self.finetune_seconds, sum(s.images for s in stages), {})

    def teacher_terms(self, batch: Batch, out) -> list[tuple[str, float, torch.Tensor]]:
        """The method's own teacher-based terms ``(name, weight, value)`` (phases > 0), e.g.
        LUCIR's less-forget and margin ranking. Default: none."""
        return []

    def objective(self, batch: Batch, out) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The classification loss (weighted, WA) + logit distillation on the old classes, from
        the student's output ``out``: the part a recipe may replace (``icarl-bce`` / ``lwf-mc``:
        one sigmoid BCE doing both). Extra teacher terms are added by ``loss``."""
        cls = self.cls_fn(out.logits, batch.y, self.counts)
        terms = {"cls": cls.detach()}
        loss = self.cls_weight * cls
        if self.teacher_out is not None and self.kd_fn is not None and self.lam > 0:
            t_logits = self.teacher_out(batch).logits
            kd = self.kd_fn(out.logits[:, : t_logits.shape[1]], t_logits, self.T)
            terms["kd"] = kd.detach()
            loss = loss + self.lam * kd
        return loss, terms

    def forward(self, batch: Batch):
        """The student's training forward (``NetOutput``); DER/FOSTER take the frozen extractors'
        embedding from the teacher cache instead of running them."""
        return self.net(batch.x)

    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One student forward serves ``objective``, the loss terms of the components (every
        phase), the teacher terms (``--distill attention``, ...) and the method's ``teacher_terms``."""
        self.constrain()
        if self.artifact_prob > 0:
            batch = self.with_artifacts(batch)
        out = self.forward(batch)
        loss, terms = self.objective(batch, out)
        for name, (w, v) in self.components.terms(batch, out).items():
            terms[name] = v.detach()
            loss = loss + w * v
        if self.teacher is not None:
            for name, w, v in self.teacher_terms(batch, out):
                terms[name] = v.detach()
                loss = loss + w * v
        return loss, terms

    def with_artifacts(self, batch: Batch) -> Batch:
        """CIM's artifact augmentation (``--memory.compression.artifact-prob``, phases > 0): new-class
        images compressed around a random box, so that compression artifacts do not tell the old
        classes (the compressed exemplars) from the new. A changed batch is no longer one of the
        teacher cache's views (``view=None``): the teacher then runs on the changed images."""
        x, changed = random_box_artifacts(batch.x, self.artifact_prob, self.ctx.memory.compressor.s, self.ctx.gen,
                                          rows=batch.y >= self.phase.start)
        return batch._replace(x=x, view=None) if bool(changed.any()) else batch

    def after_phase(self, phase: Phase, data: SplitData) -> None:
        self.frozen_old = None
        self.teacher = self.teacher_out = None   # free the teacher's memory
        mem = self.ctx.memory
        pd, self.phase_data = self.phase_data, None
        # the new images' embeddings when a calibration stage computed them on the final model
        cached = pd.new_embeddings if pd is not None else None
        if mem is not None:
            x, y = data.train_of(phase.classes)
            emb = cached if cached is not None else self.ctx.embed(self.net, x)
            originals = mem.update(x, y, phase.classes, emb, phase.seen, self.ctx.gen, self.net,
                                   self.ctx.augmenter.test)
            selected = mem.optimize(self.net, self.ctx.augmenter.test, phase.classes, x, y,
                                    self.ctx.phase_generator(phase))
            self.ctx.events.on_memory(phase, originals, selected)
        if pd is not None:
            self.components.phase_end(phase, self.net, pd)

    def state_dict(self) -> dict:
        """State a method keeps beyond the network and the memory (checkpointed at phase ends and
        inside stages), the state of every component included. Subclasses extend
        ``super().state_dict()``."""
        st = self.components.state_dict()
        return {"components": st} if st else {}

    def load_state_dict(self, state: dict) -> None:
        self.components.load_state_dict(state.get("components", {}))

    def prototypes(self) -> torch.Tensor | None:
        """Nearest-mean-of-exemplars class means ``[seen, D]`` (L2-normalised means of the
        L2-normalised exemplar embeddings, iCaRL Alg. 1), or None without exemplars."""
        mem = self.ctx.memory
        if mem is None or len(mem) == 0:
            return None
        means = []
        for c in range(self.net.num_classes):
            ex = mem.exemplars.get(c)
            if ex is None or len(ex) == 0:
                return None
            means.append(F.normalize(self.ctx.embed(self.net, ex), dim=1).mean(0))
        return F.normalize(torch.stack(means), dim=1)
