"""Which of the run's own options a run uses (the components' options are the run's components'
own: ``cilearn.methods.recipe.plan``).

The config says what ran: ``config.yaml`` keeps only the options the run uses (``prune``), and an
option that the run does not use but the user set (a value other than its default) is a
ConfigError naming it and what it applies to (``check_unused``): ``--method lwf --memory.selection
random``. A run uses every option except: ``memory.selection`` (runs with exemplars),
``model.weights_sha256`` (runs whose weights are a file), a ``data.*`` option of a data set's
loader (used when the run's data set reads it, ``data.base.reads``), and a ``report.*`` option that
a component declares in its ``reports`` (used when that component is in the run).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from ..components import REGISTRIES
from ..config import RunConfig
from ..data.base import LOADER_OPTIONS
from ..data.datasets import DATASETS
from ..errors import ConfigError
from ..models.weights import RANDOM
from .recipe import Recipe, RunPlan, plan


def _read_by(option: str) -> tuple[Callable[[RunConfig, RunPlan], bool], str]:
    """``data.<option>``: used when the run's data set's loader reads it (``data.base.reads``)."""
    readers = sorted(n for n in DATASETS.names() if option in getattr(DATASETS.get(n), "reads", ()))
    return (lambda c, p: option in getattr(DATASETS.get(c.data.dataset), "reads", ()),
            f"the data sets {', '.join(readers)}")


# option (dotted) -> (used by this run?, what it applies to)
CONDITIONAL: dict[str, tuple[Callable[[RunConfig, RunPlan], bool], str]] = {
    "memory.selection": (lambda c, p: p.memory, "runs with exemplars"),
    "model.weights_sha256": (lambda c, p: c.model.weights != RANDOM, "runs with a weights file (--weights)"),
    **{f"data.{o}": _read_by(o) for o in LOADER_OPTIONS},
}
INTERNAL = {"aliases"}      # never written (folded into the components' options)


def _reports() -> dict[str, set[str]]:
    """``report.<option>`` -> the components that use it."""
    out: dict[str, set[str]] = {}
    for reg in REGISTRIES.values():
        for n in reg.names():
            for r in reg.get(n).reports:
                out.setdefault(f"report.{r}", set()).add(n)
    return out


def _rule(key: str):
    if key in CONDITIONAL:
        return CONDITIONAL[key]
    users = _reports().get(key)
    if users:
        return (lambda c, p: any(u in p.options for u in users), ", ".join(sorted(users)))
    return None


def used(cfg: RunConfig, p: RunPlan, key: str) -> bool:
    r = _rule(key)
    return r is None or r[0](cfg, p)


def _leaves(obj: Any, prefix: str = "") -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            out.update(_leaves(v, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = v
    return out


def check_unused(cfg: RunConfig, p: RunPlan) -> None:
    """A ConfigError for the first run option the user set (not its default) that this run does not use."""
    defaults = _leaves(RunConfig())
    for key, value in _leaves(cfg).items():
        r = _rule(key)
        if r is not None and value != defaults[key] and not r[0](cfg, p):
            raise ConfigError(f"--{key.replace('_', '-')} {value!r} is not used by this run (--method {cfg.method}); "
                              f"it applies to {r[1]}")


def prune(d: dict, cfg: RunConfig, p: RunPlan, prefix: str = "") -> dict:
    """``to_dict(cfg)`` without the options the run does not use (what ``config.yaml`` holds)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if key in INTERNAL:
            continue
        if isinstance(v, dict) and key != "components" and not key.startswith("meta"):
            sub = prune(v, cfg, p, key + ".")
            if sub:                  # a section none of whose options the run uses is left out
                out[k] = sub
        elif used(cfg, p, key):
            out[k] = v
    return out


def cheap_extra_stages(recipe: Recipe, replay_steps: int, iterations: int) -> dict[str, dict]:
    """A config section that makes a recipe's extra stages cheap, each only where the recipe has
    the component (a run refuses options of components it does not have): a replay component's
    ``steps`` (a generator's training steps), every component's ``iterations`` (an exemplar
    optimizer's or a compressor's extra steps), and the options a component declares in its class
    attribute ``cheap`` (the ridge head's projection size). For quick runs (tests,
    benchmarks/behaviour_matrices.py)."""
    out: dict[str, dict] = {}
    for c in plan(RunConfig(method=recipe.name), None, strict=False).classes:
        fields = {f.name for f in dataclasses.fields(c.Options)}
        o = {**({"steps": replay_steps} if c.kind == "replay" and "steps" in fields else {}),
             **({"iterations": iterations} if "iterations" in fields else {}), **getattr(c, "cheap", {})}
        if o:
            out[c.name] = o
    return {"components": out} if out else {}
