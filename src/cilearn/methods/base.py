"""The method contract. A method is a recipe of components (classification loss, distillation,
memory, head) plus, when its paper needs them, a few hooks; the runner owns the phase loop and
``cilearn.train.fit`` owns the epoch loop.

Hooks, in phase order (see ``cilearn.runner``):
  ``training_set(phase, data)``  -> the (uint8 x, y) this phase trains on
  ``before_phase(phase, x, y)``  -> freeze a teacher, prepare caches, the components' phase
                                    start, grow the head, the components' ``new_classes``
  ``train_phase(phase, x, y)``   -> one or more calls of ``fit`` (default: the main stage, then
                                    ``calibrate`` and, where enabled, class-balanced fine-tuning)
  ``loss(batch)``                -> (loss, terms) for ``fit``; the components' ``constrain`` and
                                    ``batch`` first, the student's ``forward(batch)``, then the
                                    components' terms and the recipe's ``teacher_terms``
                                    (``train_parameters()``: what the main stage trains)
  ``after_phase(phase, data)``   -> memory update
  ``prototypes()``               -> class means for NME prediction, or None
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F

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
from ..losses import DISTILL, classification_loss
from ..registry import Registry
from ..services import Context, SplitData, TeacherCache
from ..train import Batch, FitResult

if TYPE_CHECKING:
    from ..config import RunConfig, TrainingDefaults

METHODS: Registry = Registry("method")


def rows_of(out, a: int, b: int):
    """Rows ``a:b`` of a ``NetOutput`` (logits, embedding, every stage's maps)."""
    return type(out)(out.logits[a:b], out.embedding[a:b], [m[a:b] for m in out.maps])


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
    needs_teacher: ClassVar[bool] = False   # ``teacher_terms`` / ``forward`` read the teacher's cached outputs
    own_terms: ClassVar[tuple[str, ...]] = ()  # names of the recipe's own terms (``teacher_terms``), for tables
    options_used: ClassVar[tuple[str, ...]] = ()  # run options the recipe's own code reads (methods.options)
    adaptive_kd_weight: ClassVar[bool] = False  # loss.kd_weight null means |old| / |seen| (WA, BiC)
    calibration: ClassVar[tuple[str, ...]] = ()  # calibration components (cilearn.calibration), phases > 0
    # head components (cilearn.head_parts): imprint, freeze-old-rows (default of
    # train.freeze_old_head), weight-clip (default of train.weight_clip)
    head_components: ClassVar[tuple[str, ...]] = ()
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
                           "distill": cls.distill or "kd", "temperature": lc.temperature},
                  # the loss section's shorthands of LUCIR's and PODNet's terms
                  "less-forget": {} if lc.less_forget_weight is None else {"weight": lc.less_forget_weight},
                  "margin-ranking": {"margin": lc.margin, "k": lc.margin_k,
                                     **({} if lc.margin_weight is None else {"weight": lc.margin_weight})},
                  "pod": {k: v for k, v in (("spatial_weight", lc.pod_spatial_weight),
                                            ("flat_weight", lc.pod_flat_weight)) if v is not None},
                  "artifacts": {"prob": cfg.memory.compression.artifact_prob}}
        merged = {c.name: {**recipe.get(c.name, {}), **legacy.get(c.name, {})} for c in chosen}
        canonical = {c.name.replace("-", "_"): c.name for c in chosen}   # dotted flags turn - into _
        for n, given in cfg.components.items():
            name = canonical.get(str(n).replace("-", "_"), n)
            if name not in merged:      # effective_options names it in its error (as component names are written)
                merged[str(name).replace("_", "-")] = {}
                continue
            if not isinstance(given, dict):
                raise ConfigError(f"components.{n} must be a mapping of options, got {given!r}")
            merged[name].update({str(k).replace("-", "_"): v for k, v in given.items()})
        return names, effective_options(chosen, merged)

    @classmethod
    def component_classes(cls, cfg: "RunConfig") -> list[type]:
        """The run's contract components in their order: calibration, loss terms, replay, head,
        and the training side of exemplar compression when the run compresses exemplars."""
        replay = cfg.replay.source or cls.replay_source
        compressor = cfg.memory.compressor or cls.memory_compressor
        return [component_class("calibration", n) for n in cls.calibration_names(cfg)] + \
            [component_class("term", n) for n in cls.term_component_names(cfg)] + \
            ([component_class("replay", replay)] if replay not in (None, "none") else []) + \
            [component_class("head", n) for n in cls.head_component_names(cfg)] + \
            ([component_class("compressor", "artifacts")] if compressor not in (None, "none") else []) + \
            ([component_class("compressor", "cim-meta")] if compressor == "cim" else [])

    @classmethod
    def head_component_names(cls, cfg: "RunConfig") -> list[str]:
        """The recipe's head components, with ``--train.weight-clip`` / ``--train.freeze-old-head``
        adding or removing theirs; clipping before freezing (the rows are restored last)."""
        names = [n for n in cls.head_components if n not in ("weight-clip", "freeze-old-rows")]
        t = cfg.train
        for flag, name in (("weight_clip", "weight-clip"), ("freeze_old_head", "freeze-old-rows")):
            on = getattr(t, flag)
            if on is True or (on is None and name in cls.head_components):
                names.append(name)
        return names

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
        self.cls_fn = classification_loss(lc.cls or self.cls_loss, lc, self.net.head)
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
        self.cls_weight = 1.0                 # weight of the classification loss (adaptive: 1 - lambda)
        self.finetune_seconds = 0.0           # this phase's calibration stages

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
        comps = self.components
        comps.start(phase)                   # (idempotent: ``training_set`` started them)
        old_model_terms = any(p.kind in ("term", "replay") and p.needs_old_model for p in comps.active)
        outputs = self.kd_fn is not None or self.needs_teacher or comps.needs("needs_old_outputs")
        if phase.index > 0 and (outputs or old_model_terms):
            self.teacher = self.net.frozen_copy()
            if outputs:
                self.teacher_out = TeacherCache(self.teacher, x, self.ctx, comps.old_output_extra())
            if self.kd_fn is not None:
                self.kd_stats = self.teacher_target_stats(x)
            if self.adaptive_kd_weight and self.ctx.cfg.loss.kd_weight is None:
                self.lam = phase.num_old / phase.seen    # (1 - lambda) CE + lambda KD, lambda = |old| / |seen|
                self.cls_weight = 1.0 - self.lam
        self.counts = torch.bincount(y, minlength=phase.seen).float()
        self.phase_data = PhaseData(x, y, self.counts, self.ctx.memory, self.cls_fn, old_outputs=self.teacher_out,
                                    loss=self.batch_loss)
        # the components' phase start: before the head grows (the old model is the teacher; a
        # generator's or a new teacher's draws come here, in this order, before the new rows')
        comps.phase_start(phase, self.net, self.teacher, self.phase_data)
        self.net.add_classes(phase.num_new)
        comps.new_classes(phase, self.net, self.phase_data)

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
        """The components' projection of the parameters onto their constraints (``weight-clip``,
        ``freeze-old-rows``), run before every training step of the main stage (i.e. after the
        previous optimizer step) and once after the stage: projected SGD."""
        self.components.constrain(self.net)

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
        """A training step's loss: the constraints' projection, the components' batch transforms
        (e.g. CIM's artifact augmentation), then ``batch_loss``."""
        self.constrain()
        return self.batch_loss(self.components.batch(batch))

    def batch_loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of ``batch`` as given: one student forward serves ``objective``, the loss
        terms of the components (every phase), the teacher terms (``--distill attention``, ...)
        and the method's ``teacher_terms``. ``PhaseData.loss`` (a component's step on the full
        training loss, e.g. CIM's inner step; ``batch.view`` None: teacher outputs computed on
        ``batch.x``)."""
        extra = self.components.extra_rows(batch)
        if not extra:
            out = self.forward(batch)
        else:     # one forward over the batch and the components' rows (one BatchNorm batch)
            n = len(batch.x)
            whole = self.forward(batch._replace(x=torch.cat([batch.x] + [r for _, r in extra]), view=None))
            out = rows_of(whole, 0, n)
            for p, r in extra:
                p.extra_output(rows_of(whole, n, n + len(r)))
                n += len(r)
        loss, terms = self.objective(batch, out)
        for name, (w, v) in self.components.terms(batch, out).items():
            terms[name] = v.detach()
            loss = loss + w * v
        if self.teacher is not None:
            for name, w, v in self.teacher_terms(batch, out):
                terms[name] = v.detach()
                loss = loss + w * v
        return loss, terms

    def after_phase(self, phase: Phase, data: SplitData) -> None:
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
