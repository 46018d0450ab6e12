"""Everything settled before a run writes anything: the configuration validated and resolved
(recipe and data-set defaults filled in, so that ``config.yaml`` says what ran), the data set
loaded, the device and precision chosen. ``prepare`` is called by ``cilearn.runner`` (and by
``cilearn.api`` to check every configuration of a comparison before the first run starts).
"""
from __future__ import annotations

import copy
import os
import subprocess
from pathlib import Path

import torch

from . import distributed
from .config import QUICK_EPOCHS, DataConfig, RunConfig, from_dict, resolve, validate
from .data.augment import Augmenter, InputSpec, format_mean_std, normalization
from .data.base import DataOptions, DataPlan
from .data.datasets import plan_dataset, subsample_per_class
from .data.scenario import class_order
from .errors import ConfigError
from .memory import Budget
from .methods import METHODS
from .methods.options import check_unused
from .methods.recipe import RunFacts, RunPlan, plan, resolved_config
from .methods.table import training_source, training_words
from .models.weights import resolve_weights
from .plugins import load_plugins
from .threads import resolve_threads
from .steps import describe_steps
from .progress import bars as progress_bars

def resolve_device(name: str) -> torch.device:
    """Under torchrun, ``cuda`` (or ``auto`` with CUDA) is this process's ``cuda:LOCAL_RANK``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} asked for, but no CUDA device is available; use --device cpu")
    if distributed.launched() and name.startswith("cuda"):
        if name != "cuda":
            raise ConfigError(f"--device {name}: under torchrun each process uses cuda:LOCAL_RANK; "
                              "give --device cuda (or auto)")
        return torch.device("cuda", distributed.local_rank())
    return torch.device(name)


def cpu_has_fast_bf16(cpuinfo: str | None = None) -> bool:
    """AMX or AVX512-BF16 among the CPU flags (``cpuinfo``: the text of /proc/cpuinfo, read when
    None): there bf16 autocast is faster than fp32. On other CPUs (e.g. AVX2 only) PyTorch falls
    back to slow bf16 kernels (measured ~10x slower, benchmarks/RESULTS.md)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = set(cpuinfo.split())
    return "amx_bf16" in flags or "avx512_bf16" in flags


# Pins what ``--precision auto`` means (fp32 or bf16) for every run of this process and its children,
# e.g. a test suite whose accuracy thresholds must not depend on the CPU (tests/conftest.py).
PRECISION_ENV = "CILEARN_PRECISION"


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """None means fp32. ``auto``: ``$CILEARN_PRECISION`` when set, else bf16 on CUDA devices that
    support it and on CPUs with AMX or AVX512-BF16, else fp32."""
    if name == "auto" and (pinned := os.environ.get(PRECISION_ENV, "").strip()):
        if pinned not in ("fp32", "bf16"):
            raise ConfigError(f"environment variable {PRECISION_ENV} must be fp32 or bf16, got {pinned!r}")
        name = pinned
    if name == "fp32":
        return None
    if name == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_has_fast_bf16() else None


def git_commit() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def plan_data(cfg: RunConfig) -> DataPlan:
    """What the run's data set holds, read before anything is written (``cilearn.data.base.DataPlan``)."""
    d = cfg.data
    return plan_dataset(d.dataset, DataOptions(data_dir=d.data_dir, image_size=d.image_size, train_list=d.train_list,
                                               test_list=d.test_list, cache_dir=d.cache_dir, workers=d.workers,
                                               progress=progress_bars(cfg.train.progress)))


def load_data(cfg: RunConfig, plan: DataPlan):
    """The run's data set, as planned (an image folder's images decoded, or read from its cache),
    subsampled with ``--train-per-class``."""
    d = cfg.data
    ds = plan.load()
    if d.train_per_class is not None:
        ds.train_x, ds.train_y = subsample_per_class(ds.train_x, ds.train_y, d.train_per_class, cfg.seed)
    if d.test_per_class is not None:
        ds.test_x, ds.test_y = subsample_per_class(ds.test_x, ds.test_y, d.test_per_class, cfg.seed,
                                                   "--test-per-class")
    return ds


def input_side(cfg: RunConfig, image_shape) -> int:
    """The network input's side: ``--input-size`` (at most ``--data.resize`` when given: the crop is
    taken from the resized images), else the resized side, else the stored images' side
    (``image_shape`` ``[C, H, W]``)."""
    d = cfg.data
    size = d.input_size if d.input_size is not None else d.resize if d.resize is not None else image_shape[-1]
    if d.resize is not None and size > d.resize:
        raise ConfigError(f"--input-size {size} must be at most --data.resize {d.resize}: the input is a crop of the "
                          "resized images")
    return size


def resolve_view(cfg: RunConfig, data: DataPlan, spec: InputSpec | None) -> None:
    """Fills the input view's defaults in ``cfg.data`` (config.yaml records them) from the
    backbone's ``spec`` (what its pre-trained weights expect; None: the data set's own view):
    ``input_size`` (the model's side), ``interpolation`` (the model's, else bilinear),
    ``normalize`` (``model``, written as its values, else ``dataset``); checks the channels."""
    d, channels = cfg.data, data.image_shape[0]
    if spec is not None and channels not in (1, spec.channels):
        raise ConfigError(f"--backbone {cfg.model.backbone} takes {spec.channels}-channel images and {data.name}'s "
                          f"have {channels} (a 1-channel image is repeated; other counts are not converted)")
    if d.input_size is None and spec is not None:
        d.input_size = spec.size
    if spec is not None and spec.fixed and d.input_size != spec.size:
        raise ConfigError(f"--input-size {d.input_size}: the backbone {cfg.model.backbone} takes {spec.size} px inputs "
                          "only (a timm ViT is built for another side with --model.img-size)")
    if d.interpolation is None:
        d.interpolation = spec.interpolation if spec is not None else "bilinear"
    if d.normalize is None:
        d.normalize = "model" if spec is not None else "dataset"
    mean, std = normalization(d.normalize, (data.mean, data.std), spec)
    if d.normalize == "model":
        d.normalize = format_mean_std(mean, std)
    wants = spec.channels if spec is not None else channels
    if len(mean) not in (1, wants):
        raise ConfigError(f"--normalize {d.normalize}: {len(mean)} values per statistic, the network takes "
                          f"{wants}-channel images (give one value, or one per channel)")


def make_augmenter(cfg: RunConfig, data, spec: InputSpec | None) -> Augmenter:
    """The run's augmentation and input view (``cfg`` resolved; ``data``: its ``DataPlan`` or
    ``ImageDataset``; ``spec``: its backbone's ``input_spec()``)."""
    d = cfg.data
    mean, std = normalization(d.normalize or "dataset", (data.mean, data.std), spec)
    return Augmenter(d.augment or data.augment, data.pad, mean, std, cfg.train.channels_last, d.input_size,
                     resize=d.resize, interpolation=d.interpolation or "bilinear",
                     channels=spec.channels if spec is not None else None, rrc_scale=d.rrc_scale)


def _compile_supported() -> bool:
    try:
        import torch._dynamo
        return torch._dynamo.is_dynamo_supported()
    except Exception:   # an old or partial PyTorch: any failure means no
        return False


def prepare(cfg: RunConfig, strict: bool = True):
    """Validate everything that can be validated before any output is written; returns the resolved
    configuration (the caller's is not changed; ``config.yaml`` is it), the data set and the run's
    plan (its components and their options). ``strict``: an option the run does not use but that
    was set is an error (not on ``--resume``: older runs' ``config.yaml`` held every option)."""
    cfg = copy.deepcopy(cfg)
    cfg.plugins = load_plugins(cfg.plugins)      # before any name is looked up: their registrations count
    validate(cfg)
    cfg.train.threads = resolve_threads(cfg.train.threads)   # the number that runs (config.yaml records it)
    recipe = METHODS.get(cfg.method)
    if cfg.train.compile and not _compile_supported():
        raise ConfigError(f"--train.compile: torch.compile is not supported by this PyTorch ({torch.__version__}) "
                          "and Python; run without --compile")
    early = plan(cfg, None, strict)               # names, options and their use, before the data set is read
    if strict:
        check_unused(cfg, early)                  # a run option this run does not use, set by the user
    distributed.check_config(cfg, early.classes)
    data = plan_data(cfg)                         # the data set's classes and size; nothing written yet
    epochs_given = cfg.train.epochs is not None
    chosen = early.factory("backbone") if early.names("backbone") else None   # (auto: chosen by the input side)
    spec = chosen.input_spec() if chosen is not None else None
    resolve_view(cfg, data, spec)
    side = input_side(cfg, data.image_shape)
    cfg = resolve(cfg, data.num_classes, side, recipe.training)
    facts = RunFacts(cfg, recipe.training.for_dataset(cfg.data.dataset), cfg.data.dataset in QUICK_EPOCHS, epochs_given,
                     data.num_classes)
    p = plan(cfg, side, strict, facts)
    resolved_config(cfg, p)                       # the choices and options that run, in place of "the recipe's"
    resolve_weights(cfg, p.factory("backbone"), data.image_shape[0])   # the file checked against the backbone
    cfg.data.augment = cfg.data.augment or data.augment
    if strict and cfg.data.rrc_scale != DataConfig.rrc_scale and cfg.data.augment != "rrc-flip":
        raise ConfigError(f"--data.rrc-scale {cfg.data.rrc_scale} is not used by this run (--augment {cfg.data.augment}); "
                          "it applies to --augment rrc-flip")
    cfg.eval.nme = p.memory or recipe.nme if cfg.eval.nme is None else cfg.eval.nme
    make_augmenter(cfg, data, spec)               # validates the policy name
    if p.memory:
        if cfg.memory.total is None and cfg.memory.per_class is None:
            cfg.memory.total = 20 * data.num_classes   # 20 per class at the end: 2000 for CIFAR-100
        Budget(cfg.memory.total, cfg.memory.per_class).check(data.num_classes)
    order = cfg.scenario.class_order or data.class_order or class_order(data.num_classes, cfg.seed)
    cfg.scenario.class_order = list(order)
    return cfg, load_data(cfg, data), p           # every check passed: an image folder's cache may be built


def describe_training(cfg: RunConfig, plan: RunPlan, train_counts: list[int] | None = None) -> str:
    """The phase banner's training lines: what each phase trains with (the effective milestones
    included), where the recipe's defaults come from (``cilearn list --training`` says the same:
    ``methods.table.training_words``) and, given the training images of each label
    (``train_counts``), the optimisation steps the run will take (``cilearn.steps``)."""
    stages = {n: plan.options[n] for n in plan.names("stage")}
    first, later, other = training_words(cfg.train, stages)
    steps = f"\n{describe_steps(cfg, plan, train_counts)}" if train_counts else ""
    return (f"training: {other}; phase 0: {first}; later phases: {later}\n"
            f"  (defaults of {cfg.method} on {cfg.data.dataset}: {training_source(plan.recipe, cfg.data.dataset)}; "
            f"options given override them, milestones past a phase's epochs do not fire){steps}")

def config_from_dict(d: dict) -> RunConfig:
    """The ``RunConfig`` of a YAML / CLI mapping; keys of its sections that are no run option
    (component options' short names) go to ``aliases``, resolved with the run's components."""
    d = {k: v for k, v in d.items() if k != "meta"}   # config.yaml's meta section is informational
    return from_dict(RunConfig, d)
