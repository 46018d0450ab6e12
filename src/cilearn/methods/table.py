"""Every registered recipe as a row of its component choices (``cilearn list --recipes
[--markdown]``; the README's table is this, checked by a test)."""
from __future__ import annotations

from .base import METHODS


def recipe_row(name: str) -> tuple[str, ...]:
    m = METHODS.get(name)
    terms = ([f"KD ({m.distill})"] if m.distill else []) + list(m.own_terms) + list(m.terms)
    memory = "herding" if m.uses_memory or m.train_on_seen else "-"
    if m.train_on_seen:
        memory = "all seen data"
    extra = [x for x, on in ((f"optimizer {m.memory_optimizer}", m.memory_optimizer != "none"),
                             (f"compressor {m.memory_compressor}", m.memory_compressor != "none")) if on]
    other = [x for x, on in (("expandable backbone", m.expandable), (f"replay {m.replay_source}", m.replay_source),
                             ("imprinting", m.imprint), ("old head rows frozen", m.freeze_old_head),
                             ("weight clipping", m.weight_clip), ("no last ReLU", not m.last_relu)) if on]
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
