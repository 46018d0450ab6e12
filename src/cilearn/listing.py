"""``cilearn list --options``: every option a run takes, with its default and a line of help, read
from where each option is declared (the run's own options in ``cilearn.config``, each component's
in its ``Options``): the comment on a field's line, else the comment lines just above it. Nothing
is written twice, so the listing cannot go stale."""
from __future__ import annotations

import dataclasses
import inspect
import io
import re
import tokenize
import typing
from typing import Any

from .components import KINDS, REGISTRIES, aliases_of
from .config import RunConfig


def field_docs(cls: type) -> dict[str, str]:
    """``{field: help}`` of a dataclass from its source's comments (trailing, else just above)."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):          # a subclass's comment wins
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        try:
            src, _ = inspect.getsourcelines(klass)
        except (OSError, TypeError):
            continue
        comments: dict[int, str] = {}
        for tok in tokenize.generate_tokens(io.StringIO("".join(src)).readline):
            if tok.type == tokenize.COMMENT:
                comments[tok.start[0]] = tok.string.lstrip("#").strip()
        lines = [ln.rstrip("\n") for ln in src]
        for i, line in enumerate(lines, start=1):
            m = re.match(r"\s+(\w+)\s*:", line)
            if not m or m.group(1) not in {f.name for f in dataclasses.fields(klass)}:
                continue
            if i in comments and not line.lstrip().startswith("#"):
                out[m.group(1)] = comments[i]
                continue
            above, j = [], i - 1
            while j >= 1 and lines[j - 1].lstrip().startswith("#"):
                above.insert(0, comments.get(j, ""))
                j -= 1
            if above:
                out[m.group(1)] = " ".join(above)
    return out


def _default(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _show(v: Any) -> str:
    return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


def run_options() -> list[tuple[str, str, str]]:
    """``(--section.key, default, help)`` of every run option (``RunConfig`` and its sections)."""
    rows = []

    def walk(cls: type, prefix: str) -> None:
        docs = field_docs(cls)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in ("aliases", "components"):
                continue
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], f"{prefix}{f.name}.")
                continue
            rows.append((f"--{prefix}{f.name}".replace("_", "-"), _show(_default(f)), docs.get(f.name, "")))
    walk(RunConfig, "")
    return rows


def component_options(kinds: tuple[str, ...] = KINDS, names: set[str] | None = None) -> list[tuple[str, str, str]]:
    """``(--components.NAME.OPTION [short names], default, help)`` of every registered component's
    options (``names``: only those)."""
    rows = []
    for kind in kinds:
        for name in REGISTRIES[kind].names():
            if names is not None and name not in names:
                continue
            cls = REGISTRIES[kind].get(name)
            docs, short = field_docs(cls.Options), aliases_of(cls)
            for f in dataclasses.fields(cls.Options):
                alias = [f"--{a}".replace("_", "-") for a, o in short.items() if o == f.name]
                flag = f"--components.{name}.{f.name}".replace("_", "-") + (f" [{', '.join(alias)}]" if alias else "")
                rows.append((flag, _show(_default(f)), docs.get(f.name, "")))
    return rows


def table(rows: list[tuple[str, str, str]]) -> str:
    width = min(max((len(a) for a, _, _ in rows), default=0), 60)
    return "\n".join(f"  {a:<{width}} {b:<10} {c}".rstrip() for a, b, c in rows)


def options_listing(plan=None) -> str:
    """Every run option, then the component options: of ``plan``'s components (a run's
    ``RunPlan``: with the recipe's defaults), else of every registered component."""
    out = ["run options (--section.key VALUE on the command line, section: key: VALUE in a --config file):",
           table(run_options()), ""]
    if plan is None:
        out += ["component options, by kind (--components.NAME.OPTION VALUE; short names in brackets; a run "
                "refuses options of components it does not have):", table(component_options())]
    else:
        rows = []
        for c in plan.classes:
            docs, short = field_docs(c.Options), aliases_of(c)
            for k, v in plan.options[c.name].items():
                alias = [f"--{a}".replace("_", "-") for a, o in short.items() if o == k]
                flag = f"--components.{c.name}.{k}".replace("_", "-") + (f" [{', '.join(alias)}]" if alias else "")
                rows.append((flag, _show(v), docs.get(k, "")))
        out += [f"component options of --method {plan.recipe.name} (its defaults; --components.NAME.OPTION VALUE, "
                "short names in brackets):", table(rows)]
    return "\n".join(out)
