"""Every registered recipe as a row: its component choices (``cilearn list --recipes [--markdown]``;
the README's table is this) and what it trains with on each data set, with the sources
(``cilearn list --training [--markdown]``; docs/training-defaults.md is this). Tests keep both
documents equal to the code."""
from __future__ import annotations

from ..config import QUICK_EPOCHS, TrainConfig, describe_stage, resolve_training
from ..data.datasets import DATASETS
from .base import METHODS


def recipe_row(name: str) -> tuple[str, ...]:
    m = METHODS.get(name)
    off = {n for n, o in m.component_options("cifar100").items() if o.get("weight") == 0}   # in the recipe, switched off
    terms = ([f"KD ({m.distill})"] if m.distill else []) + list(m.own_terms) + [t for t in m.terms if t not in off]
    memory = "herding" if m.uses_memory or m.train_on_seen else "-"
    if m.train_on_seen:
        memory = "all seen data"
    extra = [x for x, on in ((f"optimizer {m.memory_optimizer}", m.memory_optimizer != "none"),
                             (f"compressor {m.memory_compressor}", m.memory_compressor != "none")) if on]
    other = [x for x, on in (("expandable backbone", m.expandable), (f"replay {m.replay_source}", m.replay_source),
                             ("no last ReLU", not m.last_relu)) if on] + list(m.head_components)
    return (name, m.head, m.cls_loss, ", ".join(terms) or "-", ", ".join([memory] + extra),
            ", ".join(m.calibration) or "-", ", ".join(other) or "-")


def recipes_table(markdown: bool = False) -> str:
    rows = [recipe_row(n) for n in METHODS.names()]
    head = ("recipe", "head", "classification", "distillation / terms", "exemplars", "calibration", "other")
    if markdown:
        return "\n".join([f"| {' | '.join(head)} |", "|" + "---|" * len(head)]
                         + [f"| `{r[0]}` | " + " | ".join(r[1:]) + " |" for r in rows])
    width = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, width)).rstrip() for r in [head] + rows)


def training_words(method_cls, t: TrainConfig) -> tuple[str, str, str]:
    """A recipe's resolved training options ``t`` in words: the first phase, the later phases, and
    the rest (batch, momentum, warm-up, a compression stage's epochs). The phase banner
    (``prepare.describe_training``) and ``cilearn list --training`` both print these."""
    first = describe_stage(t.base_epochs, t.base_lr, t.schedule, t.base_milestones, t.base_weight_decay, t.gamma)
    later = describe_stage(t.epochs, t.lr, t.schedule, t.milestones, t.weight_decay, t.gamma)
    compression = t.compression_epochs if t.compression_epochs is not None else t.epochs   # None: the phase's
    other = [f"batch {t.batch_size}", f"SGD momentum {t.momentum:g}"] \
        + ([f"{t.warmup_epochs} warm-up epochs"] if t.warmup_epochs else []) \
        + ([f"compression {compression} epochs"] if "train.compression_epochs" in method_cls.options_used else [])
    return first, later, ", ".join(other)


def training_source(method_cls, dataset: str) -> str:
    """Where a recipe's training defaults on ``dataset`` come from."""
    src, quick = method_cls.training.for_dataset(dataset).source, QUICK_EPOCHS.get(dataset)
    return src if quick is None else f"{src}; {quick} epochs every phase on {dataset} (cilearn's: no reference code)"


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
            groups.setdefault((*training_words(m, t), training_source(m, dataset)), []).append(dataset)
        rows += [(name, ", ".join(datasets), *words) for words, datasets in groups.items()]
    if markdown:
        head = ["| recipe | data sets | first phase | later phases | other | source |", "|---|---|---|---|---|---|"]
        return "\n".join(head + [f"| `{r[0]}` | " + " | ".join(r[1:]) + " |" for r in rows])
    return "\n".join(f"{r[0]:<16} {r[1]}\n{'':<16} first: {r[2]}; later: {r[3]}; {r[4]}\n{'':<16} source: {r[5]}"
                     for r in rows)
