"""The Python API (and what ``cilearn run`` / ``compare`` / ``eval`` / ``predict`` call): runs with
their figures, and a finished run's model (``load_model``, ``evaluate``).

The top layer with ``cilearn.cli``: it hands the engine (``cilearn.runner``) the reporting layer's
observer (``cilearn.report.live.Reporter``: ``accuracy.png``, the pictures of ``--save-*``,
TensorBoard), and runs several seeds or methods and writes their summaries and comparisons.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

from . import runner
from .config import DataConfig, RunConfig, load_yaml
from .errors import ConfigError, DataError
from .model_io import TrainedModel, load_model, read_images, read_spec
from .prepare import config_from_dict, load_data, plan_data, prepare
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
        prepare(copy.deepcopy(c))
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


def evaluate(run_dir: str | Path, device: str = "auto", precision: str | None = None, **data: Any) -> dict[str, Any]:
    """``cilearn eval``: a finished run's model (``load_model``) on the test split of a data set.
    ``data``: ``DataConfig`` fields (``dataset``, ``data_dir``, ``image_size``, ``train_list``,
    ``test_list``, ``test_per_class``, ...), by default the run's own (its ``config.yaml``; another
    ``dataset`` starts from that data set's defaults). Its classes are matched to the model's by
    name. Returns the accuracies of ``cilearn.evaluate.PhaseEval`` (``acc``, ``acc_task``,
    ``acc_nme``, ``top5``, ``task_acc``, ...) with ``images`` and ``dataset``; on the run's own data,
    device and precision they are the run's last phase's."""
    run_dir, data = Path(run_dir), {k: v for k, v in data.items() if v is not None}
    unknown = set(data) - {f.name for f in dataclasses.fields(DataConfig)}
    if unknown:
        raise ConfigError(f"evaluate: unknown data option '{sorted(unknown)[0]}'")
    model = load_model(run_dir, device, precision)
    cfg_file = run_dir / "config.yaml" if run_dir.is_dir() else run_dir.parent / "config.yaml"
    cfg = config_from_dict(load_yaml(str(cfg_file))) if cfg_file.is_file() else RunConfig(seed=model.spec.seed)
    if not cfg_file.is_file() or data.get("dataset", cfg.data.dataset) != cfg.data.dataset:
        cfg.data = DataConfig(dataset=data.get("dataset", model.spec.dataset))
    cfg.data = dataclasses.replace(cfg.data, **data, train_per_class=None)
    ds = load_data(cfg, plan_data(cfg))
    y = ds.test_y
    if list(ds.class_names) != model.class_names:     # the same classes in another order, or a subset of them
        index = {n: i for i, n in enumerate(model.class_names)}
        missing = [n for n in ds.class_names if n not in index]
        if missing:
            raise DataError(f"data set {ds.name}: class '{missing[0]}' is not one of the model's classes "
                            f"({', '.join(model.class_names[:10])}{', ...' if len(model.class_names) > 10 else ''})")
        y = torch.tensor([index[n] for n in ds.class_names], dtype=torch.long)[y]
    ev = model.evaluate(ds.test_x, y)
    return {**dataclasses.asdict(ev), "images": len(y), "dataset": ds.name}


def predict_files(run_dir: str | Path, paths: list[str | Path], device: str = "auto", nme: bool = False
                  ) -> list[tuple[int, str]]:
    """``cilearn predict``: (data set label, class name) of each image file, by a finished run's
    model; the files are decoded as image folders are (``model_io.read_images``)."""
    model = load_model(run_dir, device)
    labels = model.predict(read_images(paths, model.spec.image_shape), nme=nme).tolist() if paths else []
    return [(k, model.class_names[k]) for k in labels]


__all__ = ["run", "resume", "run_seeds", "compare_methods", "compare_dirs", "load_model", "TrainedModel", "evaluate",
           "predict_files", "read_spec"]
