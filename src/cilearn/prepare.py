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
from .components import REGISTRIES
from .config import RunConfig, from_dict, resolve, validate
from .data.augment import Augmenter
from .data.base import DataOptions
from .data.datasets import load_dataset, subsample_per_class
from .data.scenario import class_order
from .errors import ConfigError
from .losses import CLS_LOSSES
from .memory import Budget
from .memory import check_parts as check_memory_parts
from .memory.selection import SELECTIONS
from .methods import METHODS
from .methods.options import check_unused, resolve_options
from .methods.table import training_source, training_words
from .models.backbones import BACKBONES
from .models.heads import HEADS
from .plugins import load_plugins

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

def load_data(cfg: RunConfig):

    d = cfg.data
    ds = load_dataset(d.dataset, DataOptions(data_dir=d.data_dir, image_size=d.image_size, train_list=d.train_list,
                                             test_list=d.test_list, cache_dir=d.cache_dir,
                                             workers=d.workers))
    if d.train_per_class is not None:
        ds.train_x, ds.train_y = subsample_per_class(ds.train_x, ds.train_y, d.train_per_class, cfg.seed)
    return ds


def _compile_supported() -> bool:
    try:
        import torch._dynamo
        return torch._dynamo.is_dynamo_supported()
    except Exception:   # an old or partial PyTorch: any failure means no
        return False


def prepare(cfg: RunConfig, strict: bool = True):
    """Validate everything that can be validated before any output is written; returns the resolved
    configuration (the caller's is not changed), the data set and the recipe. ``strict``: an option
    the run does not use but that was set is an error (``methods.options.check_unused``)."""
    cfg = copy.deepcopy(cfg)
    cfg.plugins = load_plugins(cfg.plugins)      # before any name is looked up: their registrations count
    validate(cfg)
    method_cls = METHODS.get(cfg.method)
    if cfg.model.backbone != "auto":
        BACKBONES.get(cfg.model.backbone)       # raises a ConfigError naming the choices
    HEADS.get(cfg.model.head or method_cls.head)
    SELECTIONS.get(cfg.memory.selection)
    if cfg.loss.cls:
        CLS_LOSSES.get(cfg.loss.cls)
    if cfg.replay.source not in (None, "none") and cfg.replay.source not in REGISTRIES["replay"]:
        raise ConfigError(f"--replay: unknown replay source '{cfg.replay.source}'; expected one of: "
                          f"{', '.join(REGISTRIES['replay'].names() + ['none'])}")
    if cfg.train.compile and not _compile_supported():
        raise ConfigError(f"--train.compile: torch.compile is not supported by this PyTorch ({torch.__version__}) "
                          "and Python; run without --compile")
    budget_given = cfg.memory.total is not None or cfg.memory.per_class is not None
    if method_cls.train_on_seen and budget_given:
        raise ConfigError(f"--method {cfg.method} trains on all data seen so far: a memory budget does not apply")
    method_cls.check_config(cfg, uses_memory(method_cls, cfg))
    cfg.calibration, cfg.components = method_cls.resolve_components(cfg)   # config.yaml says what ran
    cfg.train.weight_align = "weight-align" in cfg.calibration
    cfg.train.balanced_finetune = "balanced-finetune" in cfg.calibration
    if cfg.train.balanced_finetune:
        ft = cfg.components["balanced-finetune"]
        cfg.train.finetune_epochs, cfg.train.finetune_lr, cfg.train.finetune_head_only = ft["epochs"], ft["lr"], ft["head_only"]
    if strict:                                    # (not on --resume: older runs' config.yaml held every option)
        check_unused(cfg, method_cls)             # an option this run does not use, set by the user
    distributed.check_config(cfg, method_cls)
    cfg.memory.optimizer = cfg.memory.optimizer or method_cls.memory_optimizer
    cfg.memory.compressor = cfg.memory.compressor or method_cls.memory_compressor
    check_memory_parts(cfg, uses_memory(method_cls, cfg))
    ds = load_data(cfg)
    cfg = resolve(cfg, ds.num_classes, ds.image_shape[-1], method_cls.training)
    resolve_options(cfg, method_cls, ds.augment)  # the values that run, in place of "the recipe's"
    BACKBONES.get(cfg.model.backbone)
    Augmenter(cfg.data.augment or ds.augment, ds.pad, ds.mean, ds.std)  # validates the policy name
    if uses_memory(method_cls, cfg):
        if cfg.memory.total is None and cfg.memory.per_class is None:
            cfg.memory.total = 20 * ds.num_classes   # 20 per class at the end: 2000 for CIFAR-100
        Budget(cfg.memory.total, cfg.memory.per_class).check(ds.num_classes)
    order = cfg.scenario.class_order or class_order(ds.num_classes, cfg.seed)
    cfg.scenario.class_order = list(order)
    return cfg, ds, method_cls


def uses_memory(method_cls, cfg: RunConfig) -> bool:
    """Methods that keep exemplars, and any other method given a budget (any method given --memory N)."""
    return method_cls.uses_memory or cfg.memory.total is not None or cfg.memory.per_class is not None

def describe_training(cfg: RunConfig, method_cls) -> str:
    """The phase banner's training lines: what each phase trains with (the effective milestones
    included) and where the recipe's defaults come from; ``cilearn list --training`` says the same
    (``methods.table.training_words``)."""
    first, later, other = training_words(method_cls, cfg.train)
    return (f"training: {other}; phase 0: {first}; later phases: {later}\n"
            f"  (defaults of {cfg.method} on {cfg.data.dataset}: {training_source(method_cls, cfg.data.dataset)}; "
            "options given override them, milestones past a phase's epochs do not fire)")

def config_from_dict(d: dict) -> RunConfig:
    d = {k: v for k, v in d.items() if k != "meta"}   # config.yaml's meta section is informational
    return from_dict(RunConfig, d)
