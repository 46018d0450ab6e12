"""How many optimisation steps a run will take, counted before it starts (the phase banner says
it, so that a long schedule on a small data set is seen before it runs).

A stage of ``E`` epochs over ``N`` images at batch ``B`` takes ``E * ceil(N / min(B, N))`` steps
(``cilearn.train.fit``). Counted per phase: the main stage (phase 0 at ``base_epochs``, the
others at ``epochs``) over the new classes' images plus the exemplars kept (all seen classes'
images for a recipe that trains on them); and the run's components that train on their own in
every phase > 0: a stage component with ``epochs`` over the same images, a calibration component with ``epochs`` over ``share`` images of
every seen class (``val_fraction`` of them when it has that option), a component with ``epochs``
over the new classes' images, one with ``steps`` (a generator) those steps. The exemplars kept are
the budget's share per class (``Budget.share``) capped by the images a class has: exact without
an exemplar compressor or other stage, else "about".
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from typing import TYPE_CHECKING

from .config import QUICK_EPOCHS, RunConfig
from .data.scenario import Scenario
from .memory import Budget

if TYPE_CHECKING:
    from .methods.recipe import RunPlan

LONG_RUN_STEPS = 20_000     # a run this long gets a hint how to shorten it
FEW_PER_CLASS = 100         # fewer training images a class than this, on a reference schedule: a hint


@dataclass
class StepCount:
    stages: dict[str, int]  # stage -> optimisation steps over the whole run
    approximate: bool       # the exemplars kept (or another stage's images) are estimated

    @property
    def total(self) -> int:
        return sum(self.stages.values())


def stage_steps(epochs: int, images: int, batch: int) -> int:
    return epochs * math.ceil(images / min(batch, images)) if images > 0 and epochs > 0 else 0


def count_steps(cfg: RunConfig, plan: "RunPlan", train_counts: list[int]) -> StepCount:
    """The run's optimisation steps by stage; ``train_counts[label]``: training images of each label
    (after ``--train-per-class``); ``cfg``: resolved, ``plan`` its components (``cilearn.prepare``)."""
    t, s = cfg.train, cfg.scenario
    counts = [train_counts[label] for label in s.class_order]           # by incremental id
    scenario = Scenario.make(len(counts), s.base, s.increment, s.class_order)
    keeps = cfg.memory.total is not None or cfg.memory.per_class is not None
    budget = Budget(cfg.memory.total, cfg.memory.per_class)
    kinds = {c.name: c.kind for c in plan.classes}
    seen_all = any(c.excludes_memory for c in plan.classes)          # trains on all data seen so far
    own = {name: opts for name, opts in plan.options.items() if kinds[name] not in ("backbone", "head")}
    stages: dict[str, int] = {}
    add = lambda name, n: stages.__setitem__(name, stages.get(name, 0) + n)  # noqa: E731
    for p in scenario.phases:
        new = sum(counts[p.start:p.end])
        kept = sum(min(c, budget.share(p.start)) for c in counts[:p.start]) if keeps and p.index else 0
        n = sum(counts[:p.end]) if seen_all else new + kept
        add("main", stage_steps(t.base_epochs if p.index == 0 else t.epochs, n, t.batch_size))
        if p.index == 0:
            continue
        for name, o in own.items():
            if kinds[name] == "stage" and isinstance(o.get("epochs"), int):      # over the phase's training set
                add(name, stage_steps(o["epochs"], n, t.batch_size))
            elif kinds[name] == "calibration" and isinstance(o.get("epochs"), int):
                share = budget.share(p.end) if keeps else 0
                share = math.ceil(share * o["val_fraction"]) if "val_fraction" in o else share
                add(name, stage_steps(o["epochs"], sum(min(share, c) for c in counts[:p.end]), t.batch_size))
            elif isinstance(o.get("epochs"), int):
                add(name, stage_steps(o["epochs"], new, t.batch_size))
            elif isinstance(o.get("steps"), int):
                add(name, o["steps"])
    stages = {k: v for k, v in stages.items() if v or k == "main"}
    return StepCount(stages, keeps or len(stages) > 1)


def describe_steps(cfg: RunConfig, plan: "RunPlan", train_counts: list[int]) -> str:
    """The banner's line (and hints): the optimisation steps of the run, by stage."""
    c = count_steps(cfg, plan, train_counts)
    parts = ", ".join(f"{k} {v:,}" for k, v in c.stages.items())
    text = f"optimisation steps: {'about ' if c.approximate else ''}{c.total:,} ({parts}) at batch {cfg.train.batch_size}"
    t, ref = cfg.train, plan.recipe.training.for_dataset(cfg.data.dataset)
    per_class = sum(train_counts) / max(1, len(train_counts))
    if (t.epochs, t.base_epochs) == (ref.epochs, ref.base_epochs) and cfg.data.dataset not in QUICK_EPOCHS \
            and per_class < FEW_PER_CLASS:
        text += (f"\n  hint: {ref.base_epochs} and {ref.epochs} epochs are {cfg.method}'s reference schedule, set for "
                 f"hundreds of images per class (CIFAR, ImageNet); this data set has {per_class:.0f} per class: "
                 "--epochs E (--base-epochs E0) sets fewer")
    elif c.total >= LONG_RUN_STEPS:
        text += "\n  hint: a long run; --epochs E (--base-epochs E0) shortens every phase"
    return text
