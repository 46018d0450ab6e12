"""The component contract: the kinds of parts a run is made of, one registry per kind, and the
lifecycle that every phase goes through, phase 0 included. This module names no paper; it imports
only the core (config, registry, errors) so that every layer can register components.

A component is a class registered under its **kind** and a **name** (``@register("term", "kd")``).
It declares

* ``Options``: a frozen dataclass of typed options, the **one place their defaults live**
  (paper section or reference file next to each non-obvious one). A recipe's option defaults
  override them by name; the user's override the recipe's. The run's ``config.yaml`` holds the
  effective options of every component in the run under ``components.<name>``
  (``--components.<name>.<option> VALUE``). A field may declare short names
  (``option(5.0, alias="loss.less_forget_weight")``): ``--loss.less-forget-weight 3`` then sets
  that option of whichever component of the run declares it; short names are never written back.
* class flags: ``from_phase`` (the first phase its hooks run in; 1 for parts that act on old
  classes; an option ``first_phase`` overrides it), ``needs_old_model`` (it uses the frozen old
  model: phases > 0), ``needs_old_outputs`` (it reads the old model's outputs
  on the training batches, ``Step.old``), ``needs_memory`` (refused in a run without exemplars),
  ``excludes_memory`` (refused in a run with a memory budget), ``switch`` (a boolean config key
  that adds or removes the component from its recipe, e.g. ``train.weight_clip``), ``per_phase``
  (attributes that hold one phase's state, reset to None when the phase ends), ``reports``
  (``report.*`` options that only this component uses), ``single_process`` (why it cannot run
  under torchrun yet).
* only the hooks it needs, in this order within a phase:

  ``attach(model)``                              once, when the run's model is built (before any
                                                 state is restored): modules it adds to the model
                                                 (an ``adapter``'s modules are part of the network's
                                                 architecture instead: its ``adapt(backbone)``)
  ``training_set(phase, x, y, memory, data)``    -> (x, y) the phase trains on (a held-out split,
                                                 all data seen so far)
  ``phase_start(ctx)``                           the model has grown by the phase's classes (new
                                                 head rows, a new extractor): teachers, caches,
                                                 new rows' initialisation
  ``train_parameters(ctx)``                      -> parameters the main stage trains beyond the
                                                 model's own (an auxiliary head; adapters, prompts)
  ``constrain(ctx)``                             before every step of the main stage and once after
                                                 its last one (projected SGD)
  ``before_step(step)``                          each training step of the main stage, before the
                                                 forward: change the batch, add rows to the forward
  ``terms(step, out) -> {name: (weight, value)}`` the loss terms of one step (classification,
                                                 distillation, replay, ...)
  ``epoch_end(ctx, epoch)``                      after each epoch of the main stage
  ``after_training(ctx) -> FitResult | None``    after the main stage, in the run's order:
                                                 calibration, extra stages
  ``phase_end(ctx)``                             after the phase's evaluation
  ``state_dict() / load_state_dict(state)``      checkpointed with the run, inside a phase too
  ``diagnostics() -> {name: value}``             per-phase values for metrics.json

Hooks get narrow arguments: the phase's ``PhaseContext`` (the phase, the model, the frozen old
model, the training set, the memory, the old model's cached outputs) and, per step, a ``Step``;
the engine's facilities (the one training loop, embeddings, views, seeded generators) come
through ``Services``, never the whole run, so a component can be tested alone on a tiny model.
Parts that the memory or the network builder call have the methods of their kind besides
(a backbone's ``create``, a selection rule's ``select``, a compressor's ``boxes``, ...).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Protocol

import torch

from .config import from_dict
from .errors import ConfigError
from .registry import Registry

if TYPE_CHECKING:
    from .data.scenario import Phase
    from .train import Batch, FitResult, FitSettings

# Every kind has registered components (tests/test_components.py); a recipe chooses among them.
KINDS = ("backbone", "adapter", "head", "classification", "term", "replay", "head-init", "constraint", "calibration",
         "stage", "selection", "exemplar-optimizer", "compressor")
PLUGIN_HINT = "a component of your own: --plugin FILE.py (docs/extending.md)"
REGISTRIES: dict[str, Registry] = {k: Registry(f"{k} component", hint=PLUGIN_HINT) for k in KINDS}


def option(default: Any = dataclasses.MISSING, *, alias: str | tuple[str, ...] = (),
           factory: Callable[[], Any] | None = None) -> Any:
    """A field of an ``Options`` dataclass with its short names (dotted config keys such as
    ``"loss.kd_weight"``, also command-line flags ``--loss.kd-weight``)."""
    aliases = (alias,) if isinstance(alias, str) else tuple(alias)
    if factory is not None:
        return field(default_factory=factory, metadata={"alias": aliases})
    return field(default=default, metadata={"alias": aliases})


@dataclass(frozen=True)
class NoOptions:
    """The options of a component that has none."""


def aliases_of(cls: type) -> dict[str, str]:
    """``{short name: option}`` declared by ``cls.Options``."""
    return {a: f.name for f in dataclasses.fields(cls.Options) for a in f.metadata.get("alias", ())}


def parse_options(cls: type, given: dict[str, Any] | None) -> Any:
    """``cls.Options`` from a mapping (unknown keys and wrong types: a ConfigError naming
    ``components.<name>.<key>``; the Options' own checks in ``__post_init__``)."""
    return from_dict(cls.Options, given or {}, f"components.{cls.name}.")


def options_dict(options: Any) -> dict[str, Any]:
    return dataclasses.asdict(options)


class Services(Protocol):
    """The engine's facilities a component may use (``cilearn.services.RunServices``)."""
    device: torch.device
    augmenter: Any                      # cilearn.data.augment.Augmenter: the run's augmentation
    seed: int                           # the run's seed
    gen: torch.Generator                # the run's generator (a component drawing from it is part of the run's stream)
    events: Any                         # cilearn.events.Observer: figures for the reporting layer
    autocast_dtype: torch.dtype | None
    progress: bool                      # draw progress bars (cilearn.progress)
    log: Callable[[str], None] | None   # where a finished training stage's line goes (cilearn.progress.stage_line)
    eval_batch_size: int
    class_order: list[int]

    def fit_settings(self, phase: "Phase", **over: Any) -> "FitSettings": ...

    def fit(self, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable, settings: "FitSettings", desc: str,
            params=None, model: torch.nn.Module | None = None) -> "FitResult": ...

    def embed(self, net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor: ...

    def views(self, x: torch.Tensor, fn: Callable) -> tuple[torch.Tensor, ...] | None: ...

    def phase_generator(self, phase: "Phase") -> torch.Generator: ...

    def test_view(self, x: torch.Tensor) -> torch.Tensor: ...

    def resuming_later_stage(self) -> bool: ...

    def evaluate(self, net: torch.nn.Module, phase: "Phase") -> dict[str, float | None]: ...


@dataclass
class PhaseContext:
    """One phase as its components see it. ``x`` uint8 ``[N, C, H, W]`` and incremental labels
    ``y`` ``[N]``: what the phase trains on (new-class images and, with a memory, the stored
    exemplars); ``counts`` ``[seen]`` its images per class; ``old_model`` the frozen model of the
    previous phase (None in phase 0 or when no component needs it); ``old_outputs`` its outputs
    per training batch (``services.OldOutputs``, computed once per image and view where the
    augmentation allows), when a component or the model needs them; ``cls_loss(logits, y,
    counts) -> scalar`` the run's classification loss; ``loss(batch) -> (scalar, terms)`` the
    main stage's training loss of a batch as given (no batch changes), for a component that takes
    a differentiable step on it."""
    phase: "Phase"
    model: torch.nn.Module
    old_model: torch.nn.Module | None
    x: torch.Tensor
    y: torch.Tensor
    counts: torch.Tensor
    memory: Any
    old_outputs: Any = None
    cls_loss: Callable | None = None
    loss: Callable | None = None
    new_embeddings: torch.Tensor | None = None   # [N_new, D] of the new images, when a stage computed them on the final model


@dataclass
class Step:
    """One training step of the main stage: the batch (``Batch``: normalised ``x [B, C, H, W]``,
    ``y [B]``, ``idx [B]``, ``view``), the phase's context, the rows components add to the
    student's forward (one forward, one BatchNorm batch) and, after it, their outputs."""
    batch: "Batch"
    ctx: PhaseContext
    rows: list[tuple["Component", torch.Tensor]] = field(default_factory=list)
    outputs: dict[int, Any] = field(default_factory=dict)      # id(component) -> its rows' NetOutput
    _old: Any = None

    @property
    def old(self):
        """The old model's outputs on this batch (``services.OldOutput``: logits ``[B, K_old]``,
        embedding ``[B, D]``, extra), looked up in the cache or computed once per step."""
        if self._old is None:
            self._old = self.ctx.old_outputs(self.batch)
        return self._old

    def add_rows(self, component: "Component", rows: torch.Tensor) -> None:
        """Rows ``[n, C, H, W]`` (normalised) appended to the student's forward of this step."""
        self.rows.append((component, rows))

    def output_of(self, component: "Component"):
        """The student's output on ``component``'s rows (``NetOutput``), or None."""
        return self.outputs.get(id(component))


class Component:
    kind: ClassVar[str]
    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    from_phase: ClassVar[int] = 0            # the first phase its hooks run in (an Options' first_phase overrides)
    needs_old_model: ClassVar[bool] = False
    needs_old_outputs: ClassVar[bool] = False
    needs_memory: ClassVar[bool] = False
    excludes_memory: ClassVar[bool] = False
    switch: ClassVar[str | None] = None
    per_phase: ClassVar[tuple[str, ...]] = ()
    reports: ClassVar[tuple[str, ...]] = ()
    single_process: ClassVar[str | None] = None     # why it cannot run under torchrun yet (None: it can)

    def __init__(self, options: Any, services: Services | None):
        self.options, self.services = options, services

    @classmethod
    def resolve(cls, options: dict[str, Any], run: Any) -> dict[str, Any]:
        """The options with the values that run where a default stands for another option of the
        run (``run``: the resolved ``RunConfig``), so that ``config.yaml`` says what ran."""
        return options

    def first_phase(self) -> int:
        """The first phase whose hooks this component runs in: its options' ``first_phase`` if it
        has one, else 1 when it needs the old model, else ``from_phase``."""
        given = getattr(self.options, "first_phase", None)
        return int(given) if given is not None else (1 if self.needs_old_model else self.from_phase)

    def old_outputs_extra(self) -> Callable | None:
        """A function of the old model's ``NetOutput`` giving ``[B, F]`` to keep in the old-output
        cache (its ``extra``), or None. One cache serves every component, so at most one component
        of a run keeps an extra output (today only pooled feature maps need it)."""
        return None

    # ---------------------------------------------------------------- the lifecycle (all optional)
    def attach(self, model: torch.nn.Module) -> None:
        pass

    def training_set(self, phase: "Phase", x: torch.Tensor, y: torch.Tensor, memory: Any,
                     data: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return x, y

    def phase_start(self, ctx: PhaseContext) -> None:
        pass

    def train_parameters(self, ctx: PhaseContext) -> list[torch.nn.Parameter]:
        return []

    def constrain(self, ctx: PhaseContext) -> None:
        pass

    def before_step(self, step: Step) -> None:
        pass

    def terms(self, step: Step, out: Any) -> dict[str, tuple[float, torch.Tensor]]:
        return {}

    def epoch_end(self, ctx: PhaseContext, epoch: int) -> None:
        pass

    def after_training(self, ctx: PhaseContext) -> "FitResult | None":
        return None

    def phase_end(self, ctx: PhaseContext) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def diagnostics(self) -> dict[str, Any]:
        return {}


def register(kind: str, name: str) -> Callable[[type], type]:
    """Class decorator: ``cls`` becomes the ``kind`` component called ``name``."""
    if kind not in REGISTRIES:
        raise ValueError(f"unknown component kind {kind!r}; kinds: {', '.join(KINDS)}")

    def deco(cls: type) -> type:
        cls.kind, cls.name = kind, name
        return REGISTRIES[kind].register(name)(cls)
    return deco


def component_class(kind: str, name: str, flag: str | None = None) -> type:
    """The registered class; a ConfigError naming ``flag`` (or the kind), the choices and
    ``--plugin`` when there is none."""
    reg = REGISTRIES[kind]
    if name not in reg:
        what = flag or f"unknown {kind} component"
        raise ConfigError(f"{what}: unknown {kind} component '{name}'; expected one of: {', '.join(reg.names())}; "
                          f"{PLUGIN_HINT}")
    return reg.get(name)


def build(cls: type, options: dict[str, Any] | None, services: Services | None) -> Component:
    return cls(parse_options(cls, options), services)


class Components:
    """The components of a run in order, and the lifecycle calls over all of them (each in the
    phases from its ``first_phase()`` on). State is collected by name."""

    def __init__(self, parts: list[Component]):
        self.parts = parts
        self.active: list[Component] = []

    def of_kind(self, kind: str) -> list[Component]:
        return [p for p in self.parts if p.kind == kind]

    def attach(self, model) -> None:
        for p in self.parts:
            p.attach(model)

    def start(self, phase) -> None:
        """The phase's components: those whose first phase has come."""
        self.active = [p for p in self.parts if phase.index >= p.first_phase()]

    def training_set(self, phase, x, y, memory, data):
        for p in self.active:
            x, y = p.training_set(phase, x, y, memory, data)
        return x, y

    def needs(self, flag: str) -> bool:
        """Whether an active component sets ``flag`` (``needs_old_model`` / ``needs_old_outputs``)."""
        return any(getattr(p, flag) for p in self.active)

    def old_outputs_extra(self) -> Callable | None:
        """The one ``old_outputs_extra`` of the phase's components (a ConfigError when two ask)."""
        got = [(p.name, f) for p in self.active if (f := p.old_outputs_extra()) is not None]
        if len(got) > 1:
            raise ConfigError(f"components {', '.join(n for n, _ in got)} each keep an extra output of the old "
                              f"model; at most one can")
        return got[0][1] if got else None

    def phase_start(self, ctx: PhaseContext) -> None:
        for p in self.active:
            p.phase_start(ctx)

    def train_parameters(self, ctx: PhaseContext) -> list[torch.nn.Parameter]:
        return [q for p in self.active for q in p.train_parameters(ctx)]

    def constrain(self, ctx: PhaseContext) -> None:
        for p in self.active:
            p.constrain(ctx)

    def before_step(self, step: Step) -> None:
        for p in self.active:
            p.before_step(step)

    def terms(self, step: Step, out) -> list[tuple[str, float, torch.Tensor]]:
        """``(name, weight, value)`` of every active component's terms, in the run's order."""
        return [(n, w, v) for p in self.active for n, (w, v) in p.terms(step, out).items()]

    def epoch_end(self, ctx: PhaseContext, epoch: int) -> None:
        for p in self.active:
            p.epoch_end(ctx, epoch)

    def after_training(self, ctx: PhaseContext) -> list["FitResult"]:
        """Each active component's stage after the main one, in order; the stages they ran."""
        return [fr for p in self.active if (fr := p.after_training(ctx)) is not None]

    def phase_end(self, ctx: PhaseContext) -> None:
        for p in self.active:
            p.phase_end(ctx)
        for p in self.parts:            # one phase's state is not kept beyond it
            for attr in p.per_phase:
                setattr(p, attr, None)
        self.active = []

    def state_dict(self) -> dict[str, Any]:
        return {p.name: st for p in self.parts if (st := p.state_dict())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for p in self.parts:
            if p.name in state:
                p.load_state_dict(state[p.name])

    def diagnostics(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for p in self.parts:
            out.update(p.diagnostics())
        return out
