"""The recipes' training defaults (cilearn.methods.schedules): every recipe has them, ``resolve``
fills exactly the options left unset, an epoch override keeps the milestones as absolute epochs,
and the shipped reference configs agree with the recipes' defaults."""
from pathlib import Path

import pytest
import yaml

from cilearn.config import (QUICK_EPOCHS, RunConfig, Schedule, TrainingDefaults, effective_milestones, from_dict,
                            load_yaml, resolve)
from cilearn.methods import METHODS
from cilearn.methods.recipe import RunFacts, plan, resolved_config
from cilearn.methods.schedules import DER, FOSTER, ICARL, LUCIR, PODNET

# the run options a recipe's Schedule fills (config.yaml holds the resolved values)
SCHEDULED = ("epochs", "base_epochs", "lr", "base_lr", "batch_size", "weight_decay", "base_weight_decay",
             "schedule", "milestones", "base_milestones", "warmup_epochs")
# and FOSTER's compression stage's epochs: the feature-compression component's option (short name
# train.compression_epochs), resolved from the Schedule with the run's components
COMPRESSION = "compression_epochs"
CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def resolved(d: dict, num_classes: int = 100, image_size: int = 32) -> RunConfig:
    """The configuration as ``prepare`` resolves it: the run options and the components' effective
    options (``components``)."""
    cfg = from_dict(RunConfig, d)
    recipe = METHODS.get(cfg.method)
    epochs_given = cfg.train.epochs is not None
    cfg = resolve(cfg, num_classes, image_size, recipe.training)
    facts = RunFacts(cfg, recipe.training.for_dataset(cfg.data.dataset), cfg.data.dataset in QUICK_EPOCHS, epochs_given)
    resolved_config(cfg, plan(cfg, image_size, True, facts))
    return cfg


def compression_epochs(cfg: RunConfig) -> int | None:
    """The feature-compression stage's epochs of a resolved run (None: the run has no such stage)."""
    return cfg.components.get("feature-compression", {}).get("epochs")


@pytest.mark.parametrize("name", METHODS.names())
def test_every_recipe_has_a_valid_schedule_with_its_source(name):
    td = METHODS.get(name).training
    assert isinstance(td, TrainingDefaults)
    for s in (td.small, td.for_dataset("imagefolder")):
        assert isinstance(s, Schedule) and s.source and s.schedule in ("step", "cosine")
        assert s.epochs >= 0 and s.base_epochs >= 0 and s.lr > 0 and s.batch_size > 0   # (0: the phases train nothing)
        assert list(s.milestones) == sorted(s.milestones) and all(0 < m < s.epochs for m in s.milestones)
        assert all(0 < m < s.base_epochs for m in s.base_milestones)
        assert s.schedule == "step" or not (s.milestones or s.base_milestones)


def test_cifar_takes_the_reference_schedule():
    t = resolved({"method": "icarl", "data": {"dataset": "cifar100"}, "scenario": {"increment": 10}}).train
    assert (t.epochs, t.base_epochs, t.milestones, t.base_milestones) == (170, 200, [80, 120], [60, 120, 170])
    assert (t.lr, t.base_lr, t.weight_decay, t.base_weight_decay, t.batch_size) == (0.1, 0.1, 2e-4, 5e-4, 128)
    assert t.schedule == "step" and t.warmup_epochs == 0
    d = resolved({"method": "der", "data": {"dataset": "cifar100"}, "scenario": {"increment": 10}}).train
    assert (d.epochs, d.milestones, d.base_milestones, d.warmup_epochs, d.weight_decay) == \
        (170, [100, 120], [60, 120, 160], 10, 5e-4)
    fc = resolved({"method": "foster", "data": {"dataset": "cifar100"}, "scenario": {"increment": 10}})
    f = fc.train
    assert (f.schedule, f.epochs, f.base_epochs, compression_epochs(fc), f.milestones) == ("cosine", 170, 200, 130, [])


def test_image_folders_take_the_imagenet_schedule():
    t = resolved({"method": "lucir", "data": {"dataset": "imagefolder"}, "scenario": {"base": 50, "increment": 10}},
                 image_size=224).train
    assert (t.epochs, t.base_epochs, t.milestones, t.weight_decay, t.base_weight_decay) == (90, 90, [30, 60], 1e-4, 1e-4)
    p = resolved({"method": "podnet", "data": {"dataset": "imagefolder"}, "scenario": {"increment": 10}},
                 image_size=224).train
    assert (p.lr, p.base_lr, p.batch_size, p.schedule) == (0.05, 0.05, 64, "cosine")
    assert resolved({"method": "icarl", "data": {"dataset": "imagefolder"}, "scenario": {"increment": 10}},
                    image_size=224).train.epochs == 170          # PyCIL: one schedule for every data set


@pytest.mark.parametrize("dataset", sorted(QUICK_EPOCHS))
def test_quick_data_sets_keep_milestones_absolute(dataset):
    """Fashion-MNIST and digits train every phase QUICK_EPOCHS epochs; the recipe's milestones are
    absolute epochs, so none of iCaRL's (60.. / 80..) fires: the lr stays constant, as in PyCIL."""
    t = resolved({"method": "icarl", "data": {"dataset": dataset}}, num_classes=10).train
    assert t.epochs == t.base_epochs == QUICK_EPOCHS[dataset]
    assert t.milestones == [] and t.base_milestones == [] and t.schedule == "step"
    assert (t.weight_decay, t.base_weight_decay) == (2e-4, 5e-4)       # the per-phase decay stays
    long = resolved({"method": "icarl", "data": {"dataset": dataset}, "train": {"epochs": 100}}, num_classes=10).train
    assert long.milestones == [80] and long.base_milestones == [60] and long.base_epochs == 100
    assert effective_milestones((30, 60), 10) == [] and effective_milestones((3, 10, 12), 10) == [3]


def test_given_options_win_and_carry_to_the_first_phase():
    t = resolved({"method": "icarl", "data": {"dataset": "cifar100"}, "scenario": {"increment": 10},
                  "train": {"epochs": 5, "lr": 0.05, "weight_decay": 1e-3, "milestones": [2], "batch_size": 32}}).train
    assert (t.epochs, t.base_epochs, t.lr, t.base_lr, t.weight_decay, t.base_weight_decay) == (5, 5, 0.05, 0.05, 1e-3, 1e-3)
    assert (t.milestones, t.base_milestones, t.batch_size) == ([2], [2], 32)
    c = resolved({"method": "icarl", "data": {"dataset": "cifar100"}, "scenario": {"increment": 10},
                  "train": {"schedule": "cosine", "base_epochs": 3}}).train
    assert (c.schedule, c.milestones, c.base_milestones, c.base_epochs, c.epochs) == ("cosine", [], [], 3, 170)
    f = resolved({"method": "foster", "data": {"dataset": "cifar100"}, "scenario": {"increment": 10},
                  "train": {"epochs": 4}})
    assert compression_epochs(f) == 4                                     # follows --epochs


def test_config_yaml_holds_the_resolved_schedule_and_the_banner_shows_it(tmp_path):
    import cilearn
    from cilearn.config import to_dict
    res = cilearn.run(from_dict(RunConfig, {"method": "icarl", "out": str(tmp_path / "r"),
                                            "train": {"epochs": 2, "progress": False}}), echo=False)
    saved = yaml.safe_load((res.out_dir / "config.yaml").read_text())["train"]
    assert all(saved[k] is not None for k in SCHEDULED)
    assert "compression_epochs" not in saved and "finetune_epochs" not in saved     # options of components icarl has not
    assert not {"feature-compression", "balanced-finetune"} & set(res.config.components)
    from cilearn.methods.options import prune
    assert saved == prune(to_dict(res.config), res.config, plan(res.config, 8))["train"]
    log = (res.out_dir / "log.txt").read_text()
    assert "training: batch 128" in log and "phase 0: 2 epochs, lr 0.1 constant, weight decay 0.0005" in log
    assert "PyCIL models/icarl.py" in log


def _num_classes(path: Path, d: dict) -> tuple[int, int]:
    from cilearn.data.released import RELEASES
    data, released = d.get("data") or {}, {r.name: r.classes for r in RELEASES}
    if data.get("dataset") in released:                 # the released splits: their classes, the input side
        return released[data["dataset"]], data.get("input_size") or data.get("image_size") or 256
    if data.get("dataset") != "imagefolder":
        return (10 if data.get("dataset") in ("cifar10", "digits", "fashion-mnist") else 100), 32
    name = path.stem
    return (1000 if "imagenet-b" in name else 101 if "food101" in name else 100), data.get("image_size") or 224


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_reference_configs_agree_with_the_recipe_defaults(path):
    """A reference config that sets a scheduled option sets the recipe's own value: resolving it
    with and without its train options gives the same schedule (the protocol configs of quick data
    sets, which set epochs and batch size on purpose, excepted)."""
    d = load_yaml(str(path))
    if (d.get("data") or {}).get("dataset") in QUICK_EPOCHS:
        pytest.skip("a quick-data-set protocol, not a paper's reference config")
    k, size = _num_classes(path, d)
    full = resolved(d, k, size)
    bare = resolved({**d, "train": {key: v for key, v in (d.get("train") or {}).items()
                                    if key not in SCHEDULED + (COMPRESSION,)}}, k, size)
    differ = {key: (getattr(full.train, key), getattr(bare.train, key)) for key in SCHEDULED
              if getattr(full.train, key) != getattr(bare.train, key)}
    if compression_epochs(full) != compression_epochs(bare):
        differ[COMPRESSION] = (compression_epochs(full), compression_epochs(bare))
    assert not differ, f"{path.name} sets (config, recipe default): {differ}"


def test_named_schedules_are_the_reference_values():
    """The numbers as read from the reference code (cited in cilearn.methods.schedules)."""
    assert (ICARL.small.epochs, ICARL.small.milestones, ICARL.small.weight_decay) == (170, (80, 120), 2e-4)
    assert (LUCIR.small.epochs, LUCIR.small.milestones, LUCIR.imagenet.milestones) == (160, (80, 120), (30, 60))
    assert (PODNET.small.schedule, PODNET.imagenet.lr, PODNET.imagenet.batch_size) == ("cosine", 0.05, 64)
    assert (DER.small.milestones, DER.imagenet.batch_size, DER.small.warmup_epochs) == ((100, 120), 256, 10)
    assert (FOSTER.small.compression_epochs, FOSTER.small.weight_decay) == (130, 5e-4)


def test_docs_table_is_the_code():
    from cilearn.methods.table import training_table
    doc = (Path(__file__).parent.parent / "docs" / "training-defaults.md").read_text()
    assert training_table(markdown=True) in doc, "docs/training-defaults.md is stale: paste `cilearn list --training --markdown`"


def _stand_in(name: str):
    """A data set of ten 3x32x32 images, one per class, for ``prepare`` without data files (the
    training options a run resolves depend on the data set's name only)."""
    import torch

    from cilearn.data.base import ImageDataset
    x, y = torch.zeros(10, 3, 32, 32, dtype=torch.uint8), torch.arange(10)
    return ImageDataset(name, x, y, x.clone(), y.clone(), 10, [str(i) for i in range(10)], (0.5,) * 3, (0.25,) * 3)


@pytest.mark.parametrize("name", METHODS.names())
def test_list_training_says_what_the_run_banner_says_on_every_data_set(name, monkeypatch):
    """`cilearn list --training` and the phase banner of a run agree, for every recipe and data set:
    the run's configuration goes through ``prepare`` (a stand-in data set of the same name, no files)."""
    from cilearn import prepare
    from cilearn.data.datasets import DATASETS
    from cilearn.methods.table import training_table
    rows = {}
    for line in training_table(markdown=True).splitlines():
        cells = line.strip("| ").split(" | ")
        if cells[0] == f"`{name}`":
            rows.update({d: cells[2:] for d in cells[1].split(", ")})
    assert sorted(rows) == sorted(DATASETS.names())
    from cilearn.data.base import DataPlan
    monkeypatch.setattr(prepare, "plan_data", lambda cfg: DataPlan.of(_stand_in(cfg.data.dataset)))
    for dataset in DATASETS.names():
        cfg, _, plan = prepare.prepare(from_dict(RunConfig, {"method": name, "data": {"dataset": dataset}}))
        banner = prepare.describe_training(cfg, plan)
        first, later, other, source = rows[dataset]
        assert f"training: {other}; phase 0: {first}; later phases: {later}\n" in banner, (dataset, banner)
        assert f"(defaults of {name} on {dataset}: {source};" in banner, (dataset, banner)


def test_list_training_shows_the_quick_data_sets_own_epochs():
    """The quick data sets' rows show their QUICK_EPOCHS (not the recipe's CIFAR epochs) and the
    schedule that follows from them (iCaRL at 10 epochs: no milestone fires, constant lr)."""
    from cilearn.methods.table import training_table
    row = next(r for r in training_table(markdown=True).splitlines() if r.startswith("| `icarl` | fashion-mnist |"))
    assert "| 10 epochs, lr 0.1 constant, weight decay 0.0005 | 10 epochs, lr 0.1 constant, weight decay 0.0002 |" in row
    foster = next(r for r in training_table(markdown=True).splitlines() if r.startswith("| `foster` | digits |"))
    assert "feature-compression 30 epochs" in foster and "30 epochs every phase on digits" in foster
