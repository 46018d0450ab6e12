"""The component contract: one lifecycle that every phase goes through, phase 0 included.

A component is a small class registered under its **kind** and a **name**
(``@register("calibration", "weight-align")``). It declares

* ``Options``: a dataclass of typed options with defaults in code. The run's ``config.yaml`` holds
  the effective options of each component in the run under ``components.<name>``
  (``--components.<name>.<option> VALUE`` on the command line); options of a component that is
  not in the run are an error;
* ``needs_old_model``: its hooks run only in phases that have an old model (phases > 0);
* ``needs_old_outputs``: it reads the old model's outputs on the training batches
  (``PhaseData.old_outputs``, computed once per image and view where the augmentation allows);
  ``old_output_extra()`` may name one more quantity of the old model to keep there;
* only the hooks it needs, in this order within a phase:

  ``attach(model)``                              once, when the run's model is built (before any
                                                 state is restored): modules the component adds to it
  ``training_set(phase, x, y, memory) -> (x, y)`` what the phase trains on (e.g. hold out a split)
  ``phase_start(phase, model, old_model, data)``  the phase's data is known, before training and
                                                 before the model grows by the new classes
  ``new_classes(phase, model, data)``            the model has grown by the new classes (their
                                                 head rows exist), before training
  ``constrain(model)``                           before every training step of the main stage and
                                                 once after its last one (projected SGD)
  ``batch(batch) -> batch``                      each training batch of the main stage, before the
                                                 forward (change its samples)
  ``extra_rows(batch) -> x | None``              rows ``[n, C, H, W]`` (normalised) to append to the
                                                 student's forward of the batch: one forward, one
                                                 BatchNorm batch; their output comes back through
  ``extra_output(out)``                          (the rows' part of the ``NetOutput``) before ``terms``
  ``terms(batch, out) -> {name: (weight, value)}`` loss terms of one training step
  ``epoch_end(phase, epoch)``                    after each epoch of the main stage
  ``calibrate(phase, model, data) -> FitResult``  after training (calibration components)
  ``phase_end(phase, model, data)``              after calibration and the memory update
  ``state_dict() / load_state_dict(state)``      collected by the runner for every component
  ``diagnostics() -> {name: value}``             per-phase values for metrics.json

Hooks get narrow arguments: the phase, the model (and the frozen old model), and ``PhaseData``
(the phase's training images and labels, the exemplar memory when there is one); the engine's
facilities (the one training loop, embeddings, views, seeded generators) come through
``Services``, never the method or the whole run context, so a component can be tested alone on a
tiny model. This module names no paper.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Protocol

import torch

from .config import from_dict
from .errors import ConfigError
from .registry import Registry

if TYPE_CHECKING:
    from .data.scenario import Phase
    from .train import Batch, FitResult, FitSettings

KINDS = ("classification", "term", "replay", "calibration", "selection", "optimizer", "compressor", "head",
         "backbone")
REGISTRIES: dict[str, Registry] = {k: Registry(f"{k} component") for k in KINDS}


@dataclass(frozen=True)
class NoOptions:
    """The options of a component that has none."""


class Services(Protocol):
    """The engine's facilities a component may use (``cilearn.services.Context`` provides
    them)."""
    device: torch.device
    augmenter: Any                      # cilearn.data.augment.Augmenter: the run's augmentation
    seed: int                           # the run's seed
    gen: torch.Generator                # the run's generator (a component that draws from it is part of the run's stream)
    events: Any                         # cilearn.events.Observer: figures for the reporting layer
    autocast_dtype: torch.dtype | None
    progress: bool                      # draw progress bars (cilearn.progress)
    log: Callable[[str], None] | None   # where a finished training stage's line goes (cilearn.progress.stage_line)
    eval_batch_size: int
    class_order: list[int]

    def fit_settings(self, phase: "Phase", **over: Any) -> "FitSettings": ...

    def fit(self, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable, settings: "FitSettings", desc: str,
            params=None) -> "FitResult": ...

    def embed(self, net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor: ...

    def views(self, x: torch.Tensor, fn: Callable) -> tuple[torch.Tensor, ...] | None: ...

    def phase_generator(self, phase: "Phase") -> torch.Generator: ...

    def test_view(self, x: torch.Tensor) -> torch.Tensor: ...

    def resuming_later_stage(self) -> bool: ...


@dataclass
class PhaseData:
    """What a phase trains on: ``x`` uint8 ``[N, C, H, W]`` and incremental labels ``y`` ``[N]``
    (new-class images and, with a memory, the stored exemplars), the per-class counts ``[seen]``,
    the memory (None without exemplars), and the classification loss of the run
    (``cls_loss(logits, y, counts) -> scalar``)."""
    x: torch.Tensor
    y: torch.Tensor
    counts: torch.Tensor
    memory: Any
    cls_loss: Callable
    new_embeddings: torch.Tensor | None = None   # [N_new, D] of the phase's new images, when a stage computed them
    # the frozen old model's outputs per training batch (``services.TeacherCache``: called with a
    # ``Batch``; ``cached_embeddings(idx)``), when a component or the recipe needs them (phases > 0)
    old_outputs: Any = None
    # the phase's training loss of a ``Batch`` as the main stage computes it (the method's
    # objective, teacher and component terms; no batch transforms): ``loss(batch) -> (scalar,
    # terms)``, for a component that takes a differentiable step on it; None outside a method
    loss: Callable | None = None


class Component:
    kind: ClassVar[str]
    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    needs_old_model: ClassVar[bool] = False
    needs_old_outputs: ClassVar[bool] = False

    def __init__(self, options: Any, services: Services):
        self.options, self.services = options, services

    def old_output_extra(self) -> Callable | None:
        """A function of the old model's ``NetOutput`` giving ``[B, F]`` to keep in
        ``PhaseData.old_outputs`` (its ``extra``), or None. At most one component of a run."""
        return None

    # ---------------------------------------------------------------- the lifecycle (all optional)
    def attach(self, model: torch.nn.Module) -> None:
        pass

    def phase_start(self, phase: "Phase", model: torch.nn.Module, old_model: torch.nn.Module | None,
                    data: PhaseData) -> None:
        pass

    def training_set(self, phase: "Phase", x: torch.Tensor, y: torch.Tensor,
                     memory: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        return x, y

    def new_classes(self, phase: "Phase", model: torch.nn.Module, data: PhaseData) -> None:
        pass

    def constrain(self, model: torch.nn.Module) -> None:
        pass

    def batch(self, batch: "Batch") -> "Batch":
        return batch

    def extra_rows(self, batch: "Batch") -> torch.Tensor | None:
        return None

    def extra_output(self, out: Any) -> None:
        pass

    def terms(self, batch: "Batch", out: Any) -> dict[str, tuple[float, torch.Tensor]]:
        return {}

    def epoch_end(self, phase: "Phase", epoch: int) -> None:
        pass

    def calibrate(self, phase: "Phase", model: torch.nn.Module, data: PhaseData) -> "FitResult | None":
        return None

    def phase_end(self, phase: "Phase", model: torch.nn.Module, data: PhaseData) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def diagnostics(self) -> dict[str, float | None]:
        return {}


def register(kind: str, name: str) -> Callable[[type], type]:
    """Class decorator: ``cls`` becomes the ``kind`` component called ``name``."""
    if kind not in REGISTRIES:
        raise ValueError(f"unknown component kind {kind!r}; kinds: {', '.join(KINDS)}")

    def deco(cls: type) -> type:
        cls.kind, cls.name = kind, name
        return REGISTRIES[kind].register(name)(cls)
    return deco


def component_class(kind: str, name: str) -> type:
    """The registered class (a ConfigError naming the choices when there is none)."""
    return REGISTRIES[kind].get(name)


def parse_options(cls: type, given: dict[str, Any] | None) -> Any:
    """``cls.Options`` from the user's mapping (unknown keys and wrong types: a ConfigError naming
    ``components.<name>.<key>``)."""
    return from_dict(cls.Options, given or {}, f"components.{cls.name}.")


def effective_options(chosen: list[type], given: dict[str, dict]) -> dict[str, dict]:
    """The options of every component in ``chosen`` with the user's ``given`` applied, as plain
    dicts (what ``config.yaml`` holds); a name in ``given`` that is not in ``chosen`` is an error."""
    names = [c.name for c in chosen]
    for name in given:
        if name not in names:   # (``given`` is keyed by the components' own names: see resolve_components)
            raise ConfigError(f"components.{name}: {name!r} is not a component of this run "
                              f"(its components: {', '.join(names) or 'none'})")
    return {c.name: dataclasses.asdict(parse_options(c, given.get(c.name))) for c in chosen}


def build(cls: type, options: dict[str, Any] | None, services: Services) -> Component:
    return cls(parse_options(cls, options), services)


class Components:
    """The components of a run in order, and the lifecycle calls over all of them (those that
    need the old model skip phases without one). State is collected by name."""

    def __init__(self, parts: list[Component]):
        self.parts = parts
        self.active: list[Component] = []

    def attach(self, model) -> None:
        for p in self.parts:
            p.attach(model)

    def start(self, phase) -> None:
        """The phase's components: those that need an old model only in phases > 0."""
        self.active = [p for p in self.parts if phase.index > 0 or not p.needs_old_model]

    def training_set(self, phase, x, y, memory=None):
        for p in self.active:
            x, y = p.training_set(phase, x, y, memory)
        return x, y

    def phase_start(self, phase, model, old_model, data: PhaseData) -> None:
        for p in self.active:
            p.phase_start(phase, model, old_model, data)

    def old_output_extra(self) -> Callable | None:
        """The one ``old_output_extra`` of the phase's components (a ConfigError when two ask)."""
        got = [(p.name, f) for p in self.active if (f := p.old_output_extra()) is not None]
        if len(got) > 1:
            raise ConfigError(f"components {', '.join(n for n, _ in got)} each keep an extra output of the old "
                              f"model; at most one can")
        return got[0][1] if got else None

    def needs(self, flag: str) -> bool:
        """Whether an active component sets ``flag`` (``needs_old_model`` / ``needs_old_outputs``)."""
        return any(getattr(p, flag) for p in self.active)

    def new_classes(self, phase, model, data: PhaseData) -> None:
        for p in self.active:
            p.new_classes(phase, model, data)

    def constrain(self, model) -> None:
        for p in self.active:
            p.constrain(model)

    def batch(self, batch):
        for p in self.active:
            batch = p.batch(batch)
        return batch

    def extra_rows(self, batch) -> list[tuple[Component, torch.Tensor]]:
        """The rows the phase's components append to the student's forward of ``batch``."""
        return [(p, r) for p in self.active if (r := p.extra_rows(batch)) is not None]

    def terms(self, batch, out) -> dict[str, tuple[float, torch.Tensor]]:
        got: dict[str, tuple[float, torch.Tensor]] = {}
        for p in self.active:
            got.update(p.terms(batch, out))
        return got

    def epoch_end(self, phase, epoch: int) -> None:
        for p in self.active:
            p.epoch_end(phase, epoch)

    def calibrate(self, phase, model, data: PhaseData) -> list["FitResult"]:
        """Each calibration component of the phase in order; the stages they ran."""
        done = []
        for p in self.active:
            if p.kind == "calibration" and (fr := p.calibrate(phase, model, data)) is not None:
                done.append(fr)
        return done

    def phase_end(self, phase, model, data: PhaseData) -> None:
        for p in self.active:
            p.phase_end(phase, model, data)
        self.active = []

    def state_dict(self) -> dict[str, Any]:
        return {p.name: st for p in self.parts if (st := p.state_dict())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for p in self.parts:
            if p.name in state:
                p.load_state_dict(state[p.name])

    def diagnostics(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for p in self.parts:
            out.update(p.diagnostics())
        return out
