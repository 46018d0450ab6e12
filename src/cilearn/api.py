"""The Python API (and what ``cilearn run`` / ``cilearn compare`` call): runs with their figures.

The top layer with ``cilearn.cli``: it hands the engine (``cilearn.runner``) the reporting layer's
observer (``cilearn.report.Reporter``: ``accuracy.png``, the pictures of ``--save-*``,
TensorBoard), and runs several seeds or methods and writes their summaries and comparisons.
"""
from __future__ import annotations

import copy
import time
from pathlib import Path

from . import runner
from .config import RunConfig
from .errors import ConfigError
from .report import Reporter, compare_dirs, write_seed_summary
from .results import SEED_DIR, Comparison, Group, check_free, format_stat, group_stats
from .runner import Results


def run(cfg: RunConfig, echo: bool = True, overwrite: bool = False) -> Results:
    """Run a class-incremental experiment (``cilearn run``) and write its outputs and figures;
    returns the metrics."""
    Reporter.check(cfg)
    return runner.run(cfg, echo=echo, overwrite=overwrite, observer=Reporter())


def resume(run_dir: str | Path, echo: bool = True, device: str | None = None,
           progress: str | bool | None = None) -> Results:
    """Continue an interrupted run from its last complete checkpoint (``cilearn run --resume``);
    ``device`` and ``progress`` (auto, always, never; a bool: auto / never) replace the run's own."""
    return runner.resume(run_dir, echo=echo, device=device, progress=progress, observer=Reporter())


def run_seeds(cfg: RunConfig, seeds: list[int], echo: bool = True, overwrite: bool = False) -> Group:
    """``cilearn run --seeds``: the configuration once per seed (class order, initialisation, data
    order) into ``OUT/seed-<s>/``, then ``OUT/summary.{json,md}`` and ``OUT/accuracy.png``."""
    out = Path(cfg.out) if cfg.out else Path("runs") / f"{cfg.method}-{cfg.data.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    check_free([out / SEED_DIR.format(s) for s in seeds], overwrite)
    for s in seeds:
        c = copy.deepcopy(cfg)
        c.seed, c.out = s, str(out / SEED_DIR.format(s))
        if echo:
            print(f"== seed {s} -> {c.out}", flush=True)
        run(c, echo=echo, overwrite=overwrite)
    group = write_seed_summary(out, seeds)
    if echo:
        st = group_stats(group)
        print(f"{len(seeds)} seeds: average incremental accuracy {format_stat(st['avg_incremental_acc'])}, "
              f"last {format_stat(st['last_acc'])}, forgetting {format_stat(st['forgetting'])} -> {out}/summary.md")
    return group


def compare_methods(cfgs: list[RunConfig], out: str | Path | None = None, seeds: list[int] | None = None,
                    echo: bool = True, overwrite: bool = False) -> Comparison:
    """``cilearn compare --methods``: each configuration (one per method, otherwise identical)
    is run into ``OUT/<method>/`` (with ``seeds``: ``OUT/<method>/seed-<s>/``), then compared."""
    methods = [c.method for c in cfgs]
    if len(set(methods)) != len(methods):
        raise ConfigError(f"--methods {','.join(methods)}: a method is repeated")
    d0 = cfgs[0].data.dataset
    base = Path(out) if out else Path("runs") / f"compare-{d0}-{time.strftime('%Y%m%d-%H%M%S')}"
    dirs = [base / c.method for c in cfgs]
    check_free([d / SEED_DIR.format(s) for d in dirs for s in seeds] if seeds else dirs, overwrite)
    for c in cfgs:      # every configuration is valid before the first run starts
        runner.prepare(copy.deepcopy(c))
        Reporter.check(c)
    for c, d in zip(cfgs, dirs):
        c.out = str(d)
        if echo:
            print(f"== {c.method} -> {d}", flush=True)
        if seeds:
            run_seeds(c, seeds, echo=echo, overwrite=overwrite)
        else:
            run(c, echo=echo, overwrite=overwrite)
    comp = compare_dirs(dirs, base)
    if echo:
        print(f"\n{comp.markdown}\n\n-> {base}/compare.md, compare.csv, compare.png")
    return comp


__all__ = ["run", "resume", "run_seeds", "compare_methods", "compare_dirs"]
