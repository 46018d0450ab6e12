"""What several runs write: a seed directory's summary (``summary.json``, ``summary.md``,
``accuracy.png``) and a comparison (``compare.md``, ``compare.csv``, ``compare.png``,
``compare.json``)."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError
from ..files import atomic_write
from ..results import (COMPARE_INDEX, Comparison, Group, check_protocol, compare_index, csv_table, load_group,
                       load_groups, markdown_table, protocol_title, seed_markdown, seed_summary, unique_labels)
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


def write_compare(groups: list[Group], out: str | Path, title: str = "", notes: list[str] | None = None) -> Comparison:
    """``compare.md`` (the table, then ``notes``: how the runs' protocols differ), ``compare.csv``,
    ``compare.png`` (the overlaid curves) and ``compare.json`` (the rows: ``cilearn report OUT``
    reads them back) in ``out``."""
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    groups, notes = unique_labels(groups), list(notes or [])
    md, table = markdown_table(groups), csv_table(groups)
    atomic_write(d / "compare.md", md + "\n" + "".join(f"\nNote: {n}\n" for n in notes))
    atomic_write(d / "compare.csv", table)
    curves_plot(groups, d / "compare.png", title)
    atomic_write(d / COMPARE_INDEX, json.dumps(compare_index(groups, d), indent=2))
    return Comparison(groups, md, table, d, notes)


def compare_dirs(dirs: list[str | Path], out: str | Path, labels: list[str] | None = None,
                 allow_mixed: bool = False) -> Comparison:
    """``cilearn compare RUN_DIR...``: each run or seed directory is one row, a comparison directory
    its rows. Runs of different data sets are refused unless ``allow_mixed``; other differences of
    protocol are the comparison's notes (``results.check_protocol``)."""
    groups = [g for d in dirs for g in load_groups(d)]
    if labels is not None:
        if len(labels) != len(groups):
            raise ConfigError(f"--labels gives {len(labels)} labels for {len(groups)} rows (run directories)")
        groups = [Group(label, g.runs, g.path) for label, g in zip(labels, groups)]
    notes = check_protocol(groups, allow_mixed)
    return write_compare(groups, out, protocol_title(groups[0].runs[0]), notes)
