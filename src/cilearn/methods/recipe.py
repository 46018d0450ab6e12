"""A recipe is data: a named choice of components and option defaults (``Recipe``), and the one
rule that turns a recipe and the user's configuration into the run's components with their
effective options (``plan``). Nothing here names a component or a paper.

Each kind's choice: the user's (``--backbone``, ``--model.head``, ``--loss``, ``--distill`` adds
terms, ``--replay``, ``--calibration``, ``--constraints``, ``--head-init``, ``--stages``,
``--selection``, ``--memory.optimizer``, ``--compressor``), else the recipe's; a component's
``switch`` key (``--train.weight-clip false``) adds or removes it. Each component's options: its
declared defaults, then the recipe's (by kind, then by component name; on image folders
``image_folder_options`` over them), then the user's short names (``--loss.kd-weight``), then
``components.<name>``; then ``Component.resolve`` fills the values that run where a default
stands for another option (``config.yaml`` holds them as they ran).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..components import KINDS, REGISTRIES, Component, aliases_of, component_class, options_dict, parse_options
from ..config import RunConfig, Schedule, TrainingDefaults
from ..data.datasets import is_image_folder
from ..errors import ConfigError
from ..models.backbones import auto_backbone
from ..registry import Registry

METHODS: Registry = Registry("method", hint="a recipe of your own: --plugin FILE.py (docs/extending.md)")


@dataclass(frozen=True)
class Recipe:
    """A method as data. ``options``: the recipe's option defaults, ``{component or kind name:
    {option: value}}`` (a kind's entry applies to the run's component(s) of that kind that declare
    the option, e.g. ``{"backbone": {"last_relu": False}}``; an entry for a component not in the run
    is not used); ``image_folder_options`` over them on image folders."""
    name: str
    training: TrainingDefaults
    head: str                            # head component
    classification: str                  # classification loss component ("none": the terms alone)
    adapter: str | None = None           # adapter component: what it adds to the backbone and what trains (None: none)
    summary: str = ""                    # what it is, one line (README table)
    paper: str = ""                      # the paper it follows
    terms: tuple[str, ...] = ()          # loss-term components, in order
    replay: str | None = None
    head_init: tuple[str, ...] = ()
    constraints: tuple[str, ...] = ()
    calibration: tuple[str, ...] = ()
    stages: tuple[str, ...] = ()
    exemplars: bool = False              # keeps an exemplar memory (20 per class in total by default)
    optimizer: str = "none"              # exemplar optimizer
    compressor: str = "none"             # exemplar compressor
    expandable: bool = False             # one extractor per phase, the old ones frozen (DER, FOSTER)
    nme: bool = False                    # NME reported without exemplars too (class means of the training images)
    # kinds the user may not choose otherwise in this recipe, with why (e.g. a classification loss
    # that is also the recipe's distillation)
    fixed: dict[str, str] = field(default_factory=dict)
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    image_folder_options: dict[str, dict[str, Any]] = field(default_factory=dict)


def register_recipe(recipe: Recipe) -> Recipe:
    """Makes ``recipe`` a method (``--method NAME``); returns it."""
    METHODS.register(recipe.name)(recipe)
    return recipe


@dataclass
class RunFacts:
    """What ``Component.resolve`` may read: the resolved configuration, the recipe's schedule for
    the data set, whether the data set is a quick one (digits, Fashion-MNIST), whether the user
    gave the epochs and the data set's number of classes (None where no data set is read: ``cilearn
    list``)."""
    cfg: RunConfig
    schedule: Schedule
    quick: bool
    epochs_given: bool
    num_classes: int | None = None


@dataclass
class RunPlan:
    """The run's components in the order their hooks run, with their effective options (plain
    dicts: what ``config.yaml`` holds under ``components``), and the choices per kind."""
    recipe: Recipe
    choices: dict[str, list[str]]
    classes: list[type]
    options: dict[str, dict[str, Any]]
    memory: bool

    def names(self, kind: str) -> list[str]:
        return self.choices.get(kind, [])

    def build(self, services) -> list[Component]:
        return [c(parse_options(c, self.options[c.name]), services) for c in self.classes]

    def factory(self, kind: str) -> Component:
        """The run's component of ``kind`` built without services (the backbone and head, which the
        network is made of before the run's services exist)."""
        c = next(c for c in self.classes if c.kind == kind)
        return c(parse_options(c, self.options[c.name]), None)


# the order of the kinds' hooks within a step and a phase (classification first: the loss is
# summed in this order; head-init before constraints: rows are imprinted, then kept)
ORDER = ("backbone", "adapter", "head", "classification", "compressor", "term", "replay", "head-init", "constraint",
         "calibration", "stage", "selection", "exemplar-optimizer")
assert set(ORDER) == set(KINDS)
# the flag or config key that chooses each kind (for messages)
FLAG = {"backbone": "--backbone", "adapter": "--adapter", "head": "--model.head", "classification": "--loss", "compressor": "--compressor",
        "term": "--distill", "replay": "--replay", "head-init": "--head-init", "constraint": "--constraints",
        "calibration": "--calibration", "stage": "--stages", "selection": "--selection",
        "exemplar-optimizer": "--memory.optimizer"}


def has_memory(recipe: Recipe, cfg: RunConfig) -> bool:
    """Recipes that keep exemplars, and any other recipe given a budget (any method given --memory N)."""
    return recipe.exemplars or cfg.memory.total is not None or cfg.memory.per_class is not None


def _one(name: str | None) -> list[str]:
    return [] if name in (None, "none") else [name]


def choices_of(recipe: Recipe, cfg: RunConfig, image_size: int | None) -> dict[str, list[str]]:
    """The component names per kind (before the switches)."""
    memory = has_memory(recipe, cfg)
    backbone = cfg.model.backbone if cfg.model.backbone != "auto" else (
        auto_backbone(image_size) if image_size is not None else None)

    def listed(given: list[str] | None, default: tuple[str, ...]) -> list[str]:
        return list(default if given is None else given)

    return {
        "backbone": _one(backbone),
        "adapter": _one(cfg.model.adapter or recipe.adapter),
        "head": [cfg.model.head or recipe.head],
        "classification": _one(cfg.loss.cls or recipe.classification),
        "compressor": _one(cfg.memory.compressor or recipe.compressor),
        "term": list(dict.fromkeys(recipe.terms + tuple(cfg.loss.distill))),
        "replay": _one(cfg.replay.source or recipe.replay),
        "head-init": listed(cfg.head_init, recipe.head_init),
        "constraint": listed(cfg.constraints, recipe.constraints),
        "calibration": listed(cfg.calibration, recipe.calibration),
        "stage": listed(cfg.stages, recipe.stages),
        "selection": [cfg.memory.selection] if memory else [],
        "exemplar-optimizer": _one(cfg.memory.optimizer or recipe.optimizer),
    }


def _switches() -> dict[str, type]:
    return {c.switch: c for reg in REGISTRIES.values() for c in (reg.get(n) for n in reg.names()) if c.switch}


def _declared_aliases() -> dict[str, list[type]]:
    """Every short name declared by a registered component -> the components declaring it."""
    out: dict[str, list[type]] = {}
    for reg in REGISTRIES.values():
        for n in reg.names():
            c = reg.get(n)
            for a in aliases_of(c):
                out.setdefault(a, []).append(c)
    return out


def _is_default(key: str, value: Any, owners: list[type]) -> bool:
    """Whether ``value`` is the declared default of option ``key`` of each of its ``owners`` (setting
    an option of a component not in the run to its default changes nothing: not refused)."""
    for c in owners:
        f = next(f for f in dataclasses.fields(c.Options) if f.name == aliases_of(c)[key])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if default != value:
            return False
    return True


def _apply_switches(choices: dict[str, list[str]], aliases: dict[str, Any]) -> None:
    for key, cls in _switches().items():
        if key not in aliases or aliases[key] is None:
            continue
        on = aliases[key]
        if not isinstance(on, bool):
            raise ConfigError(f"config key '{key}' must be true or false, got {on!r}")
        names = choices[cls.kind]
        if on and cls.name not in names:
            names.append(cls.name)
        elif not on and cls.name in names:
            names.remove(cls.name)


def _given_options(cfg: RunConfig, run: list[type], strict: bool, open_kinds: set[str]) -> dict[str, dict[str, Any]]:
    """The user's options per run component: short names first, then ``components.<name>`` (which
    may also use a component's legacy short names of the form ``components.<old>.<option>``).
    ``open_kinds``: kinds whose component is not chosen yet (an ``auto`` backbone before the data
    set is read): their options are checked later."""
    by_name = {c.name: c for c in run}
    declared = _declared_aliases()
    switches = _switches()
    given: dict[str, dict[str, Any]] = {c.name: {} for c in run}
    entries = dict(cfg.aliases)
    own: list[tuple[str, dict]] = []
    canonical = {n.replace("-", "_"): n for reg in REGISTRIES.values() for n in reg.names()}  # dotted flags turn - into _
    for n, opts in cfg.components.items():
        name = canonical.get(str(n).replace("-", "_"), str(n))
        if not isinstance(opts, dict):
            raise ConfigError(f"components.{n} must be a mapping of options, got {opts!r}")
        if name in by_name:
            own.append((name, {str(k).replace("-", "_"): v for k, v in opts.items()}))
            continue
        legacy = {f"components.{name}.{str(k).replace('-', '_')}": v for k, v in opts.items()}
        if strict and not all(k in declared for k in legacy):
            raise ConfigError(f"components.{name}: {name!r} is not a component of this run "
                              f"(its components: {', '.join(by_name) or 'none'})")
        entries.update(legacy)
    for key, value in entries.items():
        if key in switches:
            continue
        owners = declared.get(key)
        if owners is None:
            if strict:
                section = key.rsplit(".", 1)[0]
                near = sorted(a for a in declared if a.startswith(section + "."))
                raise ConfigError(f"unknown config key '{key}'"
                                  + (f"; short names of component options in '{section}': {', '.join(near)}" if near else ""))
            continue
        hit = [c for c in run if key in aliases_of(c)]       # (a family member, timm:NAME, declares its family's)
        if not hit:
            if strict and not all(c.kind in open_kinds for c in owners) and not _is_default(key, value, owners):
                raise ConfigError(f"--{key.replace('_', '-')} {value!r} is not used by this run (--method {cfg.method}); "
                                  f"it applies to the {', '.join(sorted({f'{c.kind} component {c.name}' for c in owners}))}")
            continue
        for c in hit:
            given[c.name][aliases_of(c)[key]] = value
    for name, opts in own:                 # components.<name> over the short names
        given[name].update(opts)
    return given


def _recipe_options(recipe: Recipe, cls: type, image_folder: bool) -> dict[str, Any]:
    fields = {f.name for f in dataclasses.fields(cls.Options)}
    out: dict[str, Any] = {}
    for table in (recipe.options, recipe.image_folder_options if image_folder else {}):
        for key in (cls.kind, cls.name):
            out.update({k: v for k, v in table.get(key, {}).items() if key == cls.name or k in fields})
    return out


def plan(cfg: RunConfig, image_size: int | None = None, strict: bool = True, facts: RunFacts | None = None) -> RunPlan:
    """The run's components and their effective options. ``image_size`` None: before the data set
    is known (an ``auto`` backbone is then left out); ``facts``: after, to fill the values that
    run (``Component.resolve``). ``strict``: an option the run does not use is an error (not on
    ``--resume``, whose older ``config.yaml`` may hold options of components since renamed)."""
    recipe = METHODS.get(cfg.method)
    choices = choices_of(recipe, cfg, image_size)
    _apply_switches(choices, cfg.aliases)
    own = choices_of(recipe, RunConfig(method=cfg.method), image_size)
    for kind, why in recipe.fixed.items():
        if choices[kind] != own[kind]:
            raise ConfigError(f"--method {cfg.method} {why}; {FLAG[kind]} {','.join(choices[kind]) or 'none'} "
                              "does not apply")
    memory = has_memory(recipe, cfg)
    classes: list[type] = []
    for kind in ORDER:
        for name in choices[kind]:
            classes.append(component_class(kind, name, FLAG[kind]))
    for c in classes:
        if c.needs_memory and not memory:
            raise ConfigError(f"{FLAG[c.kind]} {c.name} needs exemplars and --method {cfg.method} keeps none here: "
                              f"give --memory N or --memory-per-class N, or drop {c.name}")
        if c.excludes_memory and (cfg.memory.total is not None or cfg.memory.per_class is not None):
            raise ConfigError(f"--method {cfg.method} trains on all data seen so far ({FLAG[c.kind]} {c.name}): "
                              "a memory budget does not apply")
    given = _given_options(cfg, classes, strict, {k for k in ORDER if k == "backbone" and not choices[k]})
    image_folder = is_image_folder(cfg.data.dataset)
    options = {}
    for c in classes:
        opts = {**_recipe_options(recipe, c, image_folder), **given[c.name]}
        opts = options_dict(parse_options(c, opts))              # unknown keys, types, the Options' checks
        if facts is not None:
            opts = options_dict(parse_options(c, c.resolve(opts, facts)))
        options[c.name] = opts
    return RunPlan(recipe, choices, classes, options, memory)


def resolved_config(cfg: RunConfig, p: RunPlan) -> None:
    """``cfg`` in place with the choices that run (what ``config.yaml`` holds)."""
    one = lambda kind: (p.names(kind) or ["none"])[0]    # noqa: E731
    cfg.model.backbone, cfg.model.head, cfg.model.adapter = one("backbone"), one("head"), one("adapter")
    cfg.loss.cls = one("classification")
    cfg.loss.distill = [t for t in p.names("term") if t not in p.recipe.terms]
    cfg.replay.source = one("replay")
    cfg.memory.optimizer = one("exemplar-optimizer")
    cfg.memory.compressor = one("compressor")
    cfg.head_init, cfg.constraints = p.names("head-init"), p.names("constraint")
    cfg.calibration, cfg.stages = p.names("calibration"), p.names("stage")
    cfg.components = dict(p.options)
    cfg.aliases = {}
