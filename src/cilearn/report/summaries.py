"""What several runs write: a seed directory's summary (``summary.json``, ``summary.md``,
``accuracy.png``) and a comparison (``compare.md``, ``compare.csv``, ``compare.png``)."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError
from ..files import atomic_write
from ..results import (Comparison, Group, csv_table, load_group, markdown_table, protocol_title, seed_markdown,
                       seed_summary, unique_labels)
from .figures import curves_plot


def write_seed_summary(path: str | Path, seeds: list[int] | None = None) -> Group:
    """(Re)write ``summary.json``, ``summary.md`` and ``accuracy.png`` (mean ± std band) of a seed
    directory from its ``seed-*/`` runs; returns the group."""
    d = Path(path)
    group = load_group(d, seeds=seeds)
    atomic_write(d / "summary.md", seed_markdown(group))
    curves_plot([group], d / "accuracy.png", f"{group.label}, mean ± std over {len(group.runs)} seeds")
    atomic_write(d / "summary.json", json.dumps(seed_summary(group), indent=2))
    return group


def write_compare(groups: list[Group], out: str | Path, title: str = "") -> Comparison:
    """``compare.md``, ``compare.csv`` and ``compare.png`` (the overlaid curves) in ``out``."""
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    groups = unique_labels(groups)
    md, table = markdown_table(groups), csv_table(groups)
    atomic_write(d / "compare.md", md + "\n")
    atomic_write(d / "compare.csv", table)
    curves_plot(groups, d / "compare.png", title)
    return Comparison(groups, md, table, d)


def compare_dirs(dirs: list[str | Path], out: str | Path, labels: list[str] | None = None) -> Comparison:
    """``cilearn compare RUN_DIR...``: each directory (a run or a seed directory) is one row."""
    if labels is not None and len(labels) != len(dirs):
        raise ConfigError(f"--labels gives {len(labels)} labels for {len(dirs)} run directories")
    groups = [load_group(d, labels[i] if labels else None) for i, d in enumerate(dirs)]
    return write_compare(groups, out, protocol_title(groups[0].runs[0]))
