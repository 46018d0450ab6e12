"""Every registered recipe as a row: its component choices (``cilearn list --recipes [--markdown]``;
the README's table is this) and what it trains with on each data set, with the sources
(``cilearn list --training [--markdown]``; docs/training-defaults.md is this). Tests keep both
documents equal to the code."""
from __future__ import annotations

from ..config import QUICK_EPOCHS, RunConfig, TrainConfig, describe_stage, resolve_training
from ..data.datasets import DATASETS
from .recipe import METHODS, Recipe, RunFacts, plan


def recipe_row(name: str) -> tuple[str, ...]:
    r = METHODS.get(name)
    off = {n for n, o in r.options.items() if o.get("weight") == 0}       # in the recipe, switched off
    cls = r.classification + (", old-class targets" if r.options.get(r.classification, {}).get("old_targets") else "")
    memory = "all seen data" if r.replay == "all-data" else ("herding" if r.exemplars else "-")
    extra = [x for x, on in ((f"optimizer {r.optimizer}", r.optimizer != "none"),
                             (f"compressor {r.compressor}", r.compressor != "none")) if on]
    other = [x for x, on in ((f"adapter {r.adapter}", r.adapter is not None), ("expandable backbone", r.expandable),
                             (f"replay {r.replay}", r.replay not in (None, "all-data")),
                             ("no last ReLU", r.options.get("backbone", {}).get("last_relu") is False)) if on]
    other += list(r.head_init) + list(r.constraints) + list(r.stages)
    return (name, r.head, cls, ", ".join(t for t in r.terms if t not in off) or "-", ", ".join([memory] + extra),
            ", ".join(r.calibration) or "-", ", ".join(other) or "-")


def recipes_table(markdown: bool = False) -> str:
    rows = [recipe_row(n) for n in METHODS.names()]
    head = ("recipe", "head", "classification", "terms", "exemplars", "calibration", "other")
    if markdown:
        return "\n".join([f"| {' | '.join(head)} |", "|" + "---|" * len(head)]
                         + [f"| `{r[0]}` | " + " | ".join(r[1:]) + " |" for r in rows])
    width = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, width)).rstrip() for r in [head] + rows)


def summaries_table(markdown: bool = True) -> str:
    """Every registered recipe with what it is and its paper (the README's second table is the
    markdown form; ``cilearn list --summaries``)."""
    if not markdown:
        return "\n".join(f"{name}: {METHODS.get(name).summary or '-'}\n    paper: {METHODS.get(name).paper or '-'}"
                         for name in METHODS.names())
    rows = ["| method | recipe | paper |", "|---|---|---|"]
    for name in METHODS.names():
        r = METHODS.get(name)
        rows.append(f"| `{name}` | {r.summary or '-'} | {r.paper or '-'} |")
    return "\n".join(rows)


def optimizer_words(t: TrainConfig) -> str:
    """The optimiser in words: ``SGD momentum 0.9``, ``Adam``, ``AdamW``."""
    name = {"adam": "Adam", "adamw": "AdamW"}.get(t.optim or "sgd", f"SGD momentum {t.momentum:g}")
    return name + (f", gradient norm clipped to {t.clip_grad:g}" if t.clip_grad else "")


def training_words(t: TrainConfig, stages: dict[str, dict]) -> tuple[str, str, str]:
    """A run's resolved training options ``t`` in words: the first phase, the later phases, and the
    rest (batch, momentum, warm-up, each extra stage's epochs: ``stages``, the run's stage
    components' options). The phase banner (``prepare.describe_training``) and ``cilearn list
    --training`` both print these."""
    first = describe_stage(t.base_epochs, t.base_lr, t.schedule, t.base_milestones, t.base_weight_decay, t.gamma)
    later = describe_stage(t.epochs, t.lr, t.schedule, t.milestones, t.weight_decay, t.gamma)
    other = [f"batch {t.batch_size}", optimizer_words(t)] \
        + ([f"{t.warmup_epochs} warm-up epochs"] if t.warmup_epochs else []) \
        + [f"{name} {o['epochs']} epochs" for name, o in stages.items() if o.get("epochs") is not None]
    return first, later, ", ".join(other)


def training_source(recipe: Recipe, dataset: str) -> str:
    """Where a recipe's training defaults on ``dataset`` come from."""
    ref, quick = recipe.training.for_dataset(dataset), QUICK_EPOCHS.get(dataset)
    which = {(True, True): "every phase", (True, False): "in the first phase", (False, True): "in phases > 0"}.get(
        (ref.base_epochs > 0, ref.epochs > 0))           # (phases whose schedule trains nothing train nothing)
    return ref.source if quick is None or which is None else \
        f"{ref.source}; {quick} epochs {which} on {dataset} (cilearn's: no reference code)"


def stage_options(recipe: Recipe, dataset: str, train: TrainConfig) -> dict[str, dict]:
    """The options of a recipe's stage components on ``dataset`` (``train``: resolved), as a run resolves them."""
    cfg = RunConfig(method=recipe.name)
    cfg.data.dataset, cfg.train = dataset, train
    p = plan(cfg, None, strict=False, facts=RunFacts(cfg, recipe.training.for_dataset(dataset), dataset in QUICK_EPOCHS,
                                                    False))
    return {n: p.options[n] for n in p.names("stage")}


def training_table(markdown: bool = False) -> str:
    """What a run of every registered recipe trains with on every data set, unless told otherwise:
    its options resolved for the data set by ``config.resolve_training`` as a run resolves them,
    data sets with the same schedule on one row, with the source of the values (``cilearn list
    --training [--markdown]``; docs/training-defaults.md)."""
    rows = []
    for name in METHODS.names():
        m = METHODS.get(name)
        groups: dict[tuple[str, ...], list[str]] = {}
        for dataset in DATASETS.names():
            t = resolve_training(TrainConfig(), dataset, m.training)
            groups.setdefault((*training_words(t, stage_options(m, dataset, t)), training_source(m, dataset)),
                              []).append(dataset)
        rows += [(name, ", ".join(datasets), *words) for words, datasets in groups.items()]
    if markdown:
        head = ["| recipe | data sets | first phase | later phases | other | source |", "|---|---|---|---|---|---|"]
        return "\n".join(head + [f"| `{r[0]}` | " + " | ".join(r[1:]) + " |" for r in rows])
    return "\n".join(f"{r[0]:<16} {r[1]}\n{'':<16} first: {r[2]}; later: {r[3]}; {r[4]}\n{'':<16} source: {r[5]}"
                     for r in rows)
