"""Every registered recipe as a row: its component choices (``cilearn list --recipes [--markdown]``;
the README's table is this) and its training defaults with their sources (``cilearn list --training
[--markdown]``; docs/training-defaults.md is this). Tests keep both documents equal to the code."""
from __future__ import annotations

from ..config import describe_stage
from .recipe import METHODS


def recipe_row(name: str) -> tuple[str, ...]:
    r = METHODS.get(name)
    off = {n for n, o in r.options.items() if o.get("weight") == 0}       # in the recipe, switched off
    cls = r.classification + (", old-class targets" if r.options.get(r.classification, {}).get("old_targets") else "")
    memory = "all seen data" if r.replay == "all-data" else ("herding" if r.exemplars else "-")
    extra = [x for x, on in ((f"optimizer {r.optimizer}", r.optimizer != "none"),
                             (f"compressor {r.compressor}", r.compressor != "none")) if on]
    other = [x for x, on in (("expandable backbone", r.expandable),
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


def summaries_table() -> str:
    """Every registered recipe with what it is and its paper (the README's second table is this)."""
    rows = ["| method | recipe | paper |", "|---|---|---|"]
    for name in METHODS.names():
        r = METHODS.get(name)
        rows.append(f"| `{name}` | {r.summary or '-'} | {r.paper or '-'} |")
    return "\n".join(rows)


def training_table(markdown: bool = False) -> str:
    """Every registered recipe's training defaults on small images (CIFAR) and image folders, with
    the source of the values (``cilearn list --training [--markdown]``; docs/training-defaults.md)."""
    rows = []
    for name in METHODS.names():
        td = METHODS.get(name).training
        families = [("all", td.small)] if td.imagenet is None else \
            [("CIFAR, F-MNIST, digits", td.small), ("image folders", td.imagenet)]
        for family, s in families:
            extra = [f"batch {s.batch_size}"] + ([f"{s.warmup_epochs} warm-up epochs"] if s.warmup_epochs else []) \
                + ([f"compression {s.compression_epochs} epochs"] if s.compression_epochs else [])
            rows.append((name, family, describe_stage(s.base_epochs, s.base_lr, s.schedule, s.base_milestones, s.base_weight_decay),
                         describe_stage(s.epochs, s.lr, s.schedule, s.milestones, s.weight_decay), ", ".join(extra), s.source))
    if markdown:
        head = ["| recipe | data sets | first phase | later phases | other | source |", "|---|---|---|---|---|---|"]
        return "\n".join(head + [f"| `{r[0]}` | " + " | ".join(r[1:]) + " |" for r in rows])
    return "\n".join(f"{r[0]:<16} {r[1]:<22} first: {r[2]}; later: {r[3]}; {r[4]}\n{'':<16} source: {r[5]}"
                     for r in rows)
