"""Results of finished runs: loading run directories, mean ± std over seeds, the comparison table
(markdown and CSV) and the accuracy curves overlaid with std bands.

Everything here reads ``metrics.json`` (and ``config.yaml``) and is a pure function of them. The
writers of summaries and comparisons (with their plots) are ``cilearn.report``'s; the drivers that
run experiments (``run_seeds``, ``compare_methods``) are ``cilearn.api``'s.

Directory layouts:
* a run: ``DIR/metrics.json`` (+ ``config.yaml``), as written by ``cilearn run``;
* several seeds: ``DIR/seed-<s>/`` (one run each), ``DIR/summary.json``, ``DIR/summary.md``,
  ``DIR/accuracy.png`` (``cilearn run --seeds``);
* a comparison: ``DIR/compare.md``, ``DIR/compare.csv``, ``DIR/compare.png`` and ``DIR/compare.json``
  (its rows: label and directory of each), with ``cilearn compare --methods`` the runs in
  ``DIR/<method>/`` (a run or a seed directory); ``load_groups`` reads it back.
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from .errors import ConfigError, ResultsError

SEED_DIR = "seed-{}"
REQUIRED = ("avg_incremental_acc", "last_acc", "forgetting", "accuracy_matrix", "phases")


# ---------------------------------------------------------------- loading
@dataclass
class Run:
    """One finished run: its directory, ``metrics.json`` and ``config.yaml`` ({} when absent)."""
    path: Path
    metrics: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return str(self.config.get("method") or self.path.name)

    @property
    def seed(self) -> int | None:
        return self.config.get("seed")


@dataclass
class Group:
    """Runs of one method (or variant) over one or more seeds, shown as one row / curve."""
    label: str
    runs: list[Run]
    path: Path | None = None


def read_json(path: Path) -> Any:
    """A JSON file, or a ResultsError naming it and what is wrong."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ResultsError(f"{path}: missing") from None
    except OSError as e:
        raise ResultsError(f"{path}: cannot be read ({e.strerror or e})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ResultsError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                           "expected the metrics.json that cilearn run writes") from None


def load_run(path: str | Path) -> Run:
    """A finished run directory, checked: ``metrics.json`` must exist and hold the summary keys."""
    d = Path(path)
    if not d.is_dir():
        raise ResultsError(f"{d}: no such run directory")
    if not (d / "metrics.json").is_file():
        hint = f" (an interrupted run is continued with cilearn run --resume {d})" if (d / "config.yaml").is_file() else ""
        raise ResultsError(f"{d}: no metrics.json, not a finished cilearn run{hint}")
    m = read_json(d / "metrics.json")
    if not isinstance(m, dict) or any(k not in m for k in REQUIRED) or not isinstance(m["phases"], list) \
            or not m["phases"]:
        missing = [k for k in REQUIRED if not isinstance(m, dict) or k not in m]
        raise ResultsError(f"{d / 'metrics.json'}: not a cilearn metrics file; expected the keys "
                           f"{', '.join(REQUIRED)} (missing: {', '.join(missing) or 'a non-empty phases list'})")
    cfg: dict[str, Any] = {}
    if (d / "config.yaml").is_file():
        import yaml
        try:
            cfg = yaml.safe_load((d / "config.yaml").read_text()) or {}
        except yaml.YAMLError as e:
            raise ResultsError(f"{d / 'config.yaml'}: not valid YAML ({' '.join(str(e).split())})") from None
        if not isinstance(cfg, dict):
            raise ResultsError(f"{d / 'config.yaml'}: expected a mapping of config keys")
    return Run(d, m, cfg)


def seed_dirs(d: Path, seeds: list[int] | None = None) -> list[Path]:
    """``d/seed-<s>`` sub-directories, in the order of ``seeds`` or of ``summary.json``'s seeds,
    else by seed."""
    found = {p.name: p for p in d.glob(SEED_DIR.format("*")) if p.is_dir()}
    if seeds is None and (d / "summary.json").is_file():
        summary = read_json(d / "summary.json")
        seeds = summary.get("seeds", []) if isinstance(summary, dict) else []
    if seeds:
        ordered = [found.pop(SEED_DIR.format(s)) for s in seeds if SEED_DIR.format(s) in found]
        return ordered + sorted(found.values())
    return sorted(found.values(), key=_seed_key)


def _seed_key(p: Path) -> tuple[int, int, str]:
    """``seed-2`` before ``seed-10`` before ``seed-x``."""
    s = p.name[len(SEED_DIR.format("")):]
    return (0, int(s), "") if re.fullmatch(r"-?\d+", s) else (1, 0, p.name)


def load_group(path: str | Path, label: str | None = None, seeds: list[int] | None = None) -> Group:
    """A run directory (one run) or a seed directory (``seed-*/`` runs, in the order of ``seeds``
    when given) as a Group."""
    d = Path(path)
    if not d.is_dir():
        raise ResultsError(f"{d}: no such run directory")
    if (d / "metrics.json").exists():
        runs = [load_run(d)]
    else:
        subs = seed_dirs(d, seeds)
        if not subs:
            raise ResultsError(f"{d}: no metrics.json (not a finished run), no seed-*/ directories "
                               f"(not a multi-seed run) and no {COMPARE_INDEX} (not a comparison)")
        runs = [load_run(s) for s in subs]
    return Group(label or runs[0].method, runs, d)


COMPARE_INDEX = "compare.json"


def load_groups(path: str | Path) -> list[Group]:
    """What ``cilearn report`` and ``cilearn compare`` read: a run directory or a seed directory
    (one group), or a comparison directory (``cilearn compare --out``: one group per row, named as
    in its table: the rows of its ``compare.json``, paths relative to it or absolute)."""
    d = Path(path)
    if not d.is_dir() or (d / "metrics.json").exists() or seed_dirs(d) or not (d / COMPARE_INDEX).is_file():
        return [load_group(d)]                   # (its errors name what a directory should hold)
    index = read_json(d / COMPARE_INDEX)
    rows = index.get("rows") if isinstance(index, dict) else None
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) and isinstance(r.get("label"), str)
                                                         and isinstance(r.get("path"), str) for r in rows):
        raise ResultsError(f"{d / COMPARE_INDEX}: expected {{\"rows\": [{{\"label\": ..., \"path\": ...}}, ...]}} "
                           "as cilearn compare writes it")
    return [load_group(d / r["path"], r["label"]) for r in rows]


def compare_index(groups: list[Group], out: Path) -> dict[str, Any]:
    """``compare.json``: the rows of a comparison, each group's label and directory (relative to
    ``out`` when inside it, else absolute), so that the comparison directory can be read back."""
    def where(p: Path) -> str:
        p, o = p.resolve(), out.resolve()
        return str(p.relative_to(o)) if p.is_relative_to(o) else str(p)
    return {"rows": [{"label": g.label, "path": where(g.path if g.path is not None else g.runs[0].path)}
                     for g in groups]}


# ---------------------------------------------------------------- protocol of runs compared
# (config key, words): what runs compared in one table should share; those in DATA: the data set itself
PROTOCOL = (("data.dataset", "data set"), ("classes", "number of classes"), ("data.image_size", "image size"),
            ("data.input_size", "network input size"),
            ("data.data_dir", "data directory"), ("data.train_per_class", "training images per class"),
            ("scenario.base", "base classes"), ("scenario.increment", "increment"))
DATA = {"data.dataset", "classes", "data.image_size"}


def protocol_of(run: Run) -> dict[str, Any]:
    """The ``PROTOCOL`` values of a run (from config.yaml; the number of classes from metrics.json)."""
    out: dict[str, Any] = {"classes": len(run.metrics.get("class_order") or []) or None}
    for key, _ in PROTOCOL:
        if key != "classes":
            section, name = key.split(".")
            out[key] = (run.config.get(section) or {}).get(name)
    return out


def protocol_differences(groups: list[Group]) -> list[tuple[str, str]]:
    """(key, what differs in words) for each ``PROTOCOL`` entry on which the runs disagree; runs
    without a config.yaml are left out."""
    runs = [r for g in groups for r in g.runs if r.config]
    found = []
    for key, words in PROTOCOL:
        seen: dict[str, list[str]] = {}
        for r in runs:
            seen.setdefault(str(protocol_of(r)[key]), []).append(str(r.path))
        if len(seen) > 1:
            where = lambda p: ", ".join(p[:2]) + (" ..." if len(p) > 2 else "")  # noqa: E731
            found.append((key, f"{words} differs: " + "; ".join(f"{v} ({where(p)})" for v, p in seen.items())))
    return found


def check_protocol(groups: list[Group], allow_mixed: bool = False) -> list[str]:
    """Runs of different data sets are refused (a ResultsError naming them) unless ``allow_mixed``;
    other differences of protocol (scenario, subset, data directory) come back as notes."""
    diffs = protocol_differences(groups)
    data = [text for key, text in diffs if key in DATA]
    if data and not allow_mixed:
        raise ResultsError(f"the runs are on different data sets ({data[0]}); compare runs of one data set, or "
                           "pass --allow-mixed")
    return [text for _, text in diffs]


def unique_labels(groups: list[Group]) -> list[Group]:
    """Groups whose labels repeat (the same method twice) get their directory name appended."""
    counts: dict[str, int] = {}
    for g in groups:
        counts[g.label] = counts.get(g.label, 0) + 1
    return [Group(f"{g.label} ({g.path.name})" if counts[g.label] > 1 and g.path is not None else g.label,
                  g.runs, g.path) for g in groups]


# ---------------------------------------------------------------- metrics of a run
def _phase_mean(m: dict, key: str) -> float | None:
    """Mean of a per-phase value over the phases > 0 (None if a phase lacks it)."""
    vals = [r.get(key) for r in m["phases"][1:]]
    return sum(vals) / len(vals) if vals and None not in vals else None


def _last(m: dict, key: str) -> float | None:
    return m["phases"][-1].get(key)


@dataclass(frozen=True)
class Metric:
    """A scalar of a run: ``key`` (summary.json, CSV), ``label`` (tables), ``get`` (from
    metrics.json; None: not recorded by that run), ``digits`` shown."""
    key: str
    label: str
    get: Callable[[dict], float | None]
    digits: int = 2


METRICS: tuple[Metric, ...] = (
    Metric("avg_incremental_acc", "avg inc. acc", lambda m: m["avg_incremental_acc"]),
    Metric("avg_incremental_acc_nme", "avg inc. acc NME", lambda m: m.get("avg_incremental_acc_nme")),
    Metric("last_acc", "last acc", lambda m: m["last_acc"]),
    Metric("last_acc_nme", "last acc NME", lambda m: m.get("last_acc_nme")),
    Metric("avg_incremental_acc_task", "avg inc. acc task-aware", lambda m: m.get("avg_incremental_acc_task")),
    Metric("last_acc_task", "last acc task-aware", lambda m: m.get("last_acc_task")),
    Metric("forgetting", "forgetting", lambda m: m["forgetting"]),
    Metric("old_last", "old acc (last phase)", lambda m: _last(m, "acc_old")),
    Metric("new_last", "new acc (last phase)", lambda m: _last(m, "acc_new")),
    Metric("old_among_old", "old among old (mean of phases > 0)", lambda m: _phase_mean(m, "acc_old_among_old")),
    Metric("top5_last", "top-5 (last phase)", lambda m: _last(m, "top5")),
    Metric("train_seconds", "train s (all stages)", lambda m: sum(r["train_seconds"] for r in m["phases"]), 1),
    Metric("finetune_seconds", "of which fine-tuning s",
           lambda m: sum(r.get("finetune_seconds", 0.0) for r in m["phases"]), 1),
    Metric("wall_seconds", "wall s", lambda m: m.get("wall_seconds"), 1),
    Metric("memory_images", "memory (images)", lambda m: m.get("memory", {}).get("total_images"), 0),
    Metric("memory_bytes", "memory (bytes)", lambda m: m.get("memory", {}).get("total_bytes"), 0),
    Metric("params_m", "params (M, last phase)",
           lambda m: _last(m, "params") / 1e6 if _last(m, "params") is not None else None),
)
METRIC = {mt.key: mt for mt in METRICS}
# the comparison table's columns (the issue's: average incremental accuracy, last, forgetting,
# old/new, time, memory bytes)
COMPARE_KEYS = ("avg_incremental_acc", "avg_incremental_acc_nme", "last_acc", "forgetting", "old_last", "new_last",
                "train_seconds", "wall_seconds", "memory_bytes")


def run_summary(m: dict) -> dict[str, float | None]:
    """Every scalar of ``METRICS`` from one run's metrics.json (None: not recorded)."""
    out: dict[str, float | None] = {}
    for mt in METRICS:
        try:
            v = mt.get(m)
        except (KeyError, TypeError, IndexError):
            v = None
        out[mt.key] = float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None
    return out


# ---------------------------------------------------------------- mean ± std
@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation (n - 1) of one metric over runs; ``mean`` is None when
    a run lacks the value, ``std`` is None for fewer than two runs."""
    mean: float | None
    std: float | None
    values: tuple[float | None, ...]


def mean_std(values: Iterable[float | None]) -> Stat:
    vals = tuple(None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v) for v in values)
    if not vals or None in vals:
        return Stat(None, None, vals)
    return Stat(statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else None, vals)


def format_stat(s: Stat, digits: int = 2) -> str:
    """``"-"`` (not recorded), ``"x"`` (one run) or ``"x ± y"``."""
    if s.mean is None:
        return "-"
    if s.std is None:
        return f"{s.mean:.{digits}f}"
    return f"{s.mean:.{digits}f} ± {s.std:.{digits}f}"


def group_stats(group: Group) -> dict[str, Stat]:
    """``Stat`` of every metric over the group's runs."""
    sums = [run_summary(r.metrics) for r in group.runs]
    return {mt.key: mean_std(s[mt.key] for s in sums) for mt in METRICS}


@dataclass(frozen=True)
class Curve:
    """Accuracy after each phase, mean and std over runs (std: zeros for one run)."""
    classes_seen: list[int]
    mean: list[float]
    std: list[float]


def curve(group: Group, key: str = "acc") -> Curve | None:
    """The group's per-phase ``key`` (``acc``, ``acc_nme``) curve, or None when a run lacks it.
    Runs must have the same phases (a ResultsError names the odd one)."""
    first = group.runs[0]
    seen = [r["classes_seen"] for r in first.metrics["phases"]]
    for r in group.runs[1:]:
        if [p["classes_seen"] for p in r.metrics["phases"]] != seen:
            raise ResultsError(f"{r.path}: its phases ({len(r.metrics['phases'])}) differ from those of "
                               f"{first.path}; runs of one group must share the scenario")
    cols = [[p.get(key) for p in r.metrics["phases"]] for r in group.runs]
    if any(v is None for c in cols for v in c):
        return None
    stats = [mean_std(vals) for vals in zip(*cols)]
    return Curve(seen, [s.mean for s in stats], [s.std or 0.0 for s in stats])   # type: ignore[misc]


# ---------------------------------------------------------------- tables
def table_rows(groups: list[Group], keys: Iterable[str] = COMPARE_KEYS,
               first: str = "method") -> tuple[list[str], list[list[str]]]:
    """(header, rows): one row per group, one column per metric, ``mean ± std`` over its runs."""
    keys = list(keys)
    head = [first, "runs"] + [METRIC[k].label for k in keys]
    rows = []
    for g in groups:
        st = group_stats(g)
        rows.append([g.label, str(len(g.runs))] + [format_stat(st[k], METRIC[k].digits) for k in keys])
    return head, rows


def markdown_table(groups: list[Group], keys: Iterable[str] = COMPARE_KEYS, first: str = "method") -> str:
    head, rows = table_rows(groups, keys, first)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def csv_table(groups: list[Group], keys: Iterable[str] = COMPARE_KEYS) -> str:
    """Machine-readable: ``label,runs,<key>_mean,<key>_std,...`` (empty cells: not recorded)."""
    keys = list(keys)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["label", "runs"] + [f"{k}_{s}" for k in keys for s in ("mean", "std")])
    for g in groups:
        st = group_stats(g)
        w.writerow([g.label, len(g.runs)] + [("" if v is None else repr(v)) for k in keys
                                               for v in (st[k].mean, st[k].std)])
    return buf.getvalue()


# ---------------------------------------------------------------- several seeds
def parse_seeds(text: str) -> list[int]:
    """``"1993,1,2"`` -> [1993, 1, 2]; a ConfigError naming ``--seeds`` otherwise."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    bad = [p for p in parts if not re.fullmatch(r"[+-]?\d+", p)]
    if not parts or bad:
        raise ConfigError(f"--seeds expects a comma-separated list of integers such as 1993,1,2; got "
                          f"'{bad[0] if bad else text}'")
    seeds = [int(p) for p in parts]
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text}: a seed is repeated")
    return seeds


def default_seeds(first: int, k: int) -> list[int]:
    """``--num-seeds K``: the run's seed, then 1, 2, 3, ... (skipping it): 1993, 1, 2 by default,
    the seeds of benchmarks/RESULTS.md."""
    if k < 1:
        raise ConfigError(f"--num-seeds must be a positive integer, got {k}")
    seeds, s = [first], 1
    while len(seeds) < k:
        if s != first:
            seeds.append(s)
        s += 1
    return seeds


def seed_summary(group: Group) -> dict[str, Any]:
    """summary.json's content: the seeds, every metric's mean/std/values, the mean curves."""
    st = group_stats(group)
    curves = {k: asdict(c) for k in ("acc", "acc_nme") if (c := curve(group, k)) is not None}
    return {"label": group.label, "seeds": [r.seed for r in group.runs], "runs": [r.path.name for r in group.runs],
            "metrics": {k: {"mean": s.mean, "std": s.std, "values": list(s.values)} for k, s in st.items()},
            "curves": curves}


def seed_markdown(group: Group) -> str:
    """summary.md: metric | mean ± std | one column per seed."""
    st = group_stats(group)
    seeds = [str(r.seed if r.seed is not None else r.path.name) for r in group.runs]
    lines = [f"# {group.label}: {len(group.runs)} seeds ({', '.join(seeds)})", "",
             "| metric | mean ± std | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|---|---|" + "---|" * len(seeds)]
    for mt in METRICS:
        s = st[mt.key]
        cells = ["-" if v is None else f"{v:.{mt.digits}f}" for v in s.values]
        lines.append(f"| {mt.label} | {format_stat(s, mt.digits)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def check_free(dirs: list[Path], overwrite: bool) -> None:
    """Before any run starts: none of ``dirs`` may hold a run (unless ``overwrite``)."""
    if overwrite:
        return
    for d in dirs:
        if any((d / f).exists() for f in ("config.yaml", "metrics.json", "checkpoint-phase.pt")):
            raise ConfigError(f"--out: {d} already holds a run; choose another --out or pass --overwrite")


# ---------------------------------------------------------------- comparisons
@dataclass
class Comparison:
    groups: list[Group]
    markdown: str
    csv: str
    out_dir: Path
    notes: list[str] = field(default_factory=list)   # how the runs' protocols differ (``check_protocol``)


def protocol_title(run: Run) -> str:
    """``"digits B0-Inc2"`` from a run's config.yaml (empty when it has none)."""
    c = run.config
    if not c:
        return ""
    sc = c.get("scenario", {})
    return f"{c.get('data', {}).get('dataset', '?')} B{sc.get('base', 0)}-Inc{sc.get('increment', '?')}"


__all__ = ["Run", "Group", "Metric", "METRICS", "Stat", "Comparison", "load_run", "load_group", "run_summary",
           "mean_std", "format_stat", "markdown_table", "csv_table", "table_rows", "parse_seeds", "default_seeds",
           "check_free", "protocol_title", "load_groups", "check_protocol", "protocol_differences"]
