"""Typed run configuration: dataclasses with defaults in code, loaded from YAML and CLI overrides.

These are the run's own options (data, scenario, training schedule, memory budget, reporting) and
its choice of components by kind; each component's options are declared by the component itself
(``cilearn.components``) and live under ``components.<name>``. A key that is none of these
(``loss.kd_weight``, a component option's short name) is kept in ``RunConfig.aliases`` and resolved
with the run's components (``cilearn.methods.recipe.plan``), which refuses it if no component of
the run declares it. Every key is validated (unknown keys and wrong types are a ``ConfigError``
naming the key); ``resolve`` fills the data-set dependent ``None`` defaults so that the
``config.yaml`` saved next to the results is exactly what ran.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any

from .data.augment import INTERPOLATIONS, normalization
from .data.datasets import is_image_folder
from .data.rows import RESIDENT_MODES
from .errors import ConfigError
from .progress import mode as progress_mode


@dataclass
class DataConfig:
    dataset: str = "digits"
    data_dir: str | None = None
    train_per_class: int | None = None   # keep a seeded subset of N training images per class
    test_per_class: int | None = None    # evaluate on a seeded subset of N test images per class
    image_size: int | None = None        # image folders: decoded images are resized to this (px)
    # the network input's side (px); smaller than the stored images: training crops from them
    # (crop-flip, rrc-flip), evaluation takes their centre crop; larger: the images are resized to it;
    # None: a pre-trained backbone's input size (timm: its pretrained config), else the stored images' size
    input_size: int | None = None
    # the side (px) the stored images are resized to before the input's crop (e.g. 256 for 224, as
    # Resize(256) + CenterCrop(224)); None: the input side when larger than the stored images, else no resize
    resize: int | None = None
    interpolation: str | None = None     # of the resize: bilinear | bicubic | nearest; None: the backbone's (timm: its pretrained config), else bilinear
    # mean/std of the inputs: dataset | imagenet | model (the backbone's pretrained config) | none (inputs
    # in [0, 1]) | MEAN1,MEAN2,MEAN3/STD1,STD2,STD3; None: the backbone's (timm: model), else dataset
    normalize: str | None = None
    train_list: str | None = None
    test_list: str | None = None
    cache_dir: str | None = None
    workers: int | None = None           # image folders: decoding processes; None: the CPUs, at most 32
    resident: str = "auto"               # auto | device | host: where the uint8 images live (cilearn.data.rows)
    augment: str | None = None           # None: the data set's default (crop-flip, flip, none, rrc-flip)
    # rrc-flip: the smallest crop, a fraction of the image's area (the largest is 1); 0.08: torchvision's
    # RandomResizedCrop default; PILOT's and RanPAC's build_transform (utils/data.py) use 0.05
    rrc_scale: float = 0.08
    embedding_cache: str | None = None   # a directory keeping a frozen backbone's embeddings across runs (cilearn.embeddings)


@dataclass
class ScenarioConfig:
    base: int = 0                        # classes of the first phase; 0 means "increment" (B0)
    increment: int = 2
    class_order: list[int] | None = None  # None: RandomState(seed).permutation(num_classes)


@dataclass
class ModelConfig:
    backbone: str = "auto"               # auto: convnet <= 16 px, resnet32 <= 32 px, else resnet18
    head: str | None = None              # None: the recipe's head
    adapter: str | None = None           # what is added to the backbone and trains (adaptformer, ssf, vpt, ...); None: the recipe's
    # the backbone's initial weights: FILE (.safetensors, a PyTorch state dict, a cilearn run's
    # model.safetensors) | random (seeded) | pretrained (the backbone's own, from the local cache);
    # None: the backbone's (cilearn's own: random; timm: pretrained)
    weights: str | None = None
    weights_sha256: str | None = None    # the SHA-256 the weights file must have; None: filled in with the file's


OPTIMS = ("sgd", "adam", "adamw")


@dataclass
class TrainConfig:
    # None: the recipe's default for the data set (its ``Schedule``, cilearn.methods.schedules),
    # filled in by ``resolve``: config.yaml holds the values that ran.
    epochs: int | None = None            # phases > 0 (quick data sets: QUICK_EPOCHS, every phase)
    base_epochs: int | None = None       # first phase; None: --epochs when given, else the recipe's
    lr: float | None = None
    base_lr: float | None = None         # None: --lr when given, else the recipe's
    batch_size: int | None = None
    # sgd (momentum: --train.momentum) | adam | adamw (betas 0.9, 0.999; adam's weight decay is an L2 term in the
    # gradient, adamw's decoupled); None: the recipe's (sgd but for the prompt methods, whose code uses Adam)
    optim: str | None = None
    # the gradient's global L2 norm clipped to this before each step (0: no clipping); None: the recipe's
    clip_grad: float | None = None
    momentum: float = 0.9
    weight_decay: float | None = None
    base_weight_decay: float | None = None  # first phase; None: --train.weight-decay when given, else the recipe's
    schedule: str | None = None          # cosine (per step, to 0) | step (x gamma at milestones)
    milestones: list[int] | None = None  # epochs, for schedule=step (see ``resolve`` for --epochs overrides)
    base_milestones: list[int] | None = None  # first phase
    warmup_epochs: int | None = None     # linear warm-up of the lr over the first epochs of every stage (DER)
    gamma: float = 0.1
    precision: str = "auto"              # auto | bf16 | fp32
    threads: int | str = "auto"          # CPU threads; auto: the CPUs this process may use (cilearn.threads)
    channels_last: bool = True
    compile: bool = False                # torch.compile the backbone(s) on the first training step (train.py)
    device: str = "auto"                 # auto | cpu | cuda | cuda:N
    eval_batch_size: int = 512
    progress: str | bool = "auto"        # auto (bars when stderr is a terminal) | always | never (cilearn.progress);
                                         # true / false (config.yaml of older runs): auto / never
    checkpoint_every: int = 10           # epochs between checkpoints inside a phase (0: only at phase ends)
    keep_checkpoint: bool = False        # a finished run keeps checkpoint-phase.pt (else deleted; model.safetensors stays)


@dataclass
class MemoryConfig:
    total: int | None = None             # fixed total budget, shared by all seen classes
    per_class: int | None = None         # fixed per class, total grows with the classes
    selection: str = "herding"           # herding | random | closest (cilearn.memory.selection)
    optimizer: str | None = None         # none | mnemonics | mnemonics-single; None: the recipe's
    compressor: str | None = None        # none | full | cam-threshold | cim; None: the recipe's (foster-cim, der-cim: cim)


@dataclass
class LossConfig:
    cls: str | None = None               # classification loss (cilearn.classification); None: the recipe's
    distill: list[str] = field(default_factory=list)   # loss terms added to the recipe's (cilearn.terms): attention, ...


@dataclass
class ReplayConfig:
    source: str | None = None            # replay component (cilearn.replay); None: the recipe's; "none" turns it off


@dataclass
class EvalConfig:
    # nearest-mean-of-exemplars accuracy (NME); None: for runs with exemplars or recipes that say so
    # (true: also for classes without exemplars, from the mean embedding of their training images at
    # the end of the phase that learnt them)
    nme: bool | None = None


@dataclass
class ReportConfig:
    save_attention: int = 0              # after each phase, a PNG of N test images' Grad-CAMs (teacher, student)
    save_samples: int = 0                # DF-GR: after each generator training, a PNG of N samples per old class
    save_tsne: bool = False              # after each phase, a t-SNE PNG of test embeddings and exemplars
    save_exemplars: int = 0              # after each phase, compressed-phase<i>.png: N exemplars, original vs stored
    tensorboard: bool = False            # scalars per epoch and phase in RUN_DIR/tensorboard (cilearn.tblog)


@dataclass
class RunConfig:
    method: str = "icarl"
    seed: int = 1993                     # class order, init, data order, augmentation
    out: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    scenario: ScenarioConfig = field(default_factory=ScenarioConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # component lists, each in order; None: the recipe's (cilearn.methods.recipe)
    head_init: list[str] | None = None      # new head rows' initialisation (imprint)
    constraints: list[str] | None = None    # freeze-old-rows, weight-clip, freeze-backbone
    calibration: list[str] | None = None    # after each phase > 0: weight-align, balanced-finetune, bic
    stages: list[str] | None = None         # extra stages after the main one (feature-compression)
    # options of the run's components by name (cilearn.components): {"bic": {"epochs": 50}}; the
    # resolved config holds every option of every component in the run
    components: dict = field(default_factory=dict)
    plugins: list[str] = field(default_factory=list)   # Python files whose registrations the run uses (cilearn.plugins)
    # keys that are no run option: short names of component options and switches (``loss.kd_weight``,
    # ``train.weight_clip``), resolved with the run's components; never written to config.yaml
    aliases: dict = field(default_factory=dict)


# The small data sets for quick runs train every phase for this many epochs (no reference code
# exists for them); the recipe's milestones then follow ``effective_milestones``.
QUICK_EPOCHS: dict[str, int] = {"digits": 30, "fashion-mnist": 10}


@dataclass(frozen=True)
class Schedule:
    """A recipe's training defaults on one family of data sets, as its paper or reference code
    sets them (``source`` says which file). Recipes (cilearn.methods) hold one for small images
    (CIFAR, and with QUICK_EPOCHS Fashion-MNIST and digits) and one for image folders (ImageNet)."""
    source: str
    epochs: int                          # phases > 0
    base_epochs: int                     # the first phase
    milestones: tuple[int, ...] = ()     # step schedule, epochs (phases > 0)
    base_milestones: tuple[int, ...] = ()
    schedule: str = "step"               # step | cosine
    lr: float = 0.1
    base_lr: float = 0.1
    weight_decay: float = 5e-4           # phases > 0
    base_weight_decay: float = 5e-4
    batch_size: int = 128
    warmup_epochs: int = 0
    optim: str = "sgd"                    # sgd (momentum 0.9) | adam | adamw (TrainConfig.optim)
    clip_grad: float = 0.0               # the gradient norm's clip (0: none; TrainConfig.clip_grad)
    compression_epochs: int | None = None  # FOSTER's compression stage (feature-compression); None: the phase's epochs


@dataclass(frozen=True)
class TrainingDefaults:
    small: Schedule                      # CIFAR-10/100, Fashion-MNIST, digits
    imagenet: Schedule | None = None     # image folders (data.datasets.is_image_folder); None: the same as ``small``

    def for_dataset(self, dataset: str) -> Schedule:
        return self.imagenet if is_image_folder(dataset) and self.imagenet is not None else self.small


def describe_stage(epochs: int, lr: float, schedule: str, milestones, weight_decay: float, gamma: float = 0.1) -> str:
    """One training stage in words (the phase banner, ``cilearn list --training``)."""
    if schedule == "cosine":
        how = "cosine to 0"
    elif milestones:
        how = f"x{gamma:g} at epochs {', '.join(map(str, milestones))}"
    else:
        how = "constant"
    return f"{epochs} epochs, lr {lr:g} {how}, weight decay {weight_decay:g}"


def effective_milestones(milestones, epochs: int) -> list[int]:
    """The recipe's milestones for a stage of ``epochs`` epochs (whatever its reference epochs): kept
    as absolute epochs, as PyCIL does when its epochs are changed, and only those that fire
    (``m < epochs``; on Fashion-MNIST at 10 epochs none of iCaRL's does: the lr stays constant).
    Chosen by measurement over scaling them by epochs / reference epochs (benchmarks/RESULTS.md,
    "Baselines against the reference")."""
    return [int(m) for m in milestones if m < epochs]


# ---------------------------------------------------------------- dict <-> dataclass
def _type_ok(value: Any, tp: Any) -> tuple[bool, Any]:
    """Check (and gently coerce: int -> float) ``value`` against the annotation ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, v = _type_ok(value, arg)
            if ok:
                return True, v
        return False, value
    if tp is type(None):
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        return False, value
    if tp is str:
        return isinstance(value, str), value
    if tp is dict:     # a mapping checked by its owner (``components``: each component's Options)
        return isinstance(value, dict), value
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            return False, value
        out = []
        for v in value:
            ok, v = _type_ok(v, item)
            if not ok:
                return False, value
            out.append(v)
        return True, out
    raise TypeError(f"unsupported config type {tp}")  # a bug in cilearn, not user input


def _type_name(tp: Any) -> str:
    return str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _flat(d: dict, prefix: str, out: dict) -> None:
    for k, v in d.items():
        key = f"{prefix}{str(k).replace('-', '_')}"
        if isinstance(v, dict):
            _flat(v, key + ".", out)
        else:
            out[key] = v


def from_dict(cls: type, data: dict, prefix: str = "", rest: dict | None = None) -> Any:
    """Build dataclass ``cls`` from a nested dict; wrong types are ConfigErrors, and so are unknown
    keys, unless ``rest`` is given: then the unknown keys of sections (dotted, ``loss.kd_weight``)
    go there. A ``RunConfig`` keeps them in its ``aliases`` (a run's component options by short
    name, resolved with its components: ``cilearn.methods.recipe.plan``)."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {type(data).__name__}")
    if cls is RunConfig and rest is None:      # a whole run's config: short names of component options kept
        rest = {}
        cfg = from_dict(cls, data, prefix, rest)
        cfg.aliases = {**cfg.aliases, **rest}
        return cfg
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            if rest is not None and prefix:
                _flat({name: value}, prefix, rest)
                continue
            raise ConfigError(f"unknown config key '{prefix}{key}'; expected one of: {', '.join(sorted(known))}")
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(tp, value or {}, f"{prefix}{name}.", rest)
            continue
        ok, coerced = _type_ok(value, tp)
        if not ok:
            raise ConfigError(f"config key '{prefix}{name}' must be {_type_name(tp)}, got {value!r}")
        kwargs[name] = coerced
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def section_keys(dotted: str) -> list[str]:
    """The option names of the ``RunConfig`` section ``dotted`` (``"loss"``), [] if it is none."""
    cls: Any = RunConfig
    for part in dotted.split("."):
        hints = typing.get_type_hints(cls)
        if part not in hints or not dataclasses.is_dataclass(hints[part]):
            return []
        cls = hints[part]
    return sorted(f.name for f in fields(cls))


def merge(base: dict, override: dict) -> dict:
    """Recursive dict merge; ``override`` wins."""
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def set_dotted(d: dict, dotted: str, value: Any) -> None:
    """``set_dotted(d, "train.lr", 0.1)`` -> ``d["train"]["lr"] = 0.1``."""
    keys = dotted.replace("-", "_").split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
        if not isinstance(d, dict):
            raise ConfigError(f"config key '{dotted}': '{k}' is not a section")
    d[keys[-1]] = value


def load_yaml(path: str) -> dict:
    """The mapping of options in the YAML file ``path`` (empty for an empty file). A file that is
    missing, unreadable, not text (random bytes, a binary given by mistake), not valid YAML, or
    whose top level is not a mapping is a one-line ConfigError naming the file."""
    import yaml

    try:
        # as bytes: YAML's reader decodes them (UTF-8, or UTF-16 with a BOM) and reports a byte
        # that is not text as a ReaderError, instead of a UnicodeDecodeError from open()
        with open(path, "rb") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except yaml.reader.ReaderError as e:
        raise ConfigError(f"config file {path} is not YAML text ({str(e).splitlines()[0]}, "
                          f"at position {e.position})") from None
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    except RecursionError:
        raise ConfigError(f"config file {path} is nested too deeply to be a configuration") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of options at its top level, "
                          f"got a {type(data).__name__}")
    return data


# ---------------------------------------------------------------- validation
def validate(cfg: RunConfig) -> None:
    """Checks that need no data set (numbers, names). Data-set checks are in ``resolve``; the
    components check their own options."""
    def positive(name: str, v: Any, allow_none: bool = True, zero: bool = False) -> None:
        if v is None and allow_none:
            return
        if v is None or v < 0 or (v == 0 and not zero) or not math.isfinite(v):
            raise ConfigError(f"--{name} must be a {'non-negative' if zero else 'positive'} number, got {v}")

    t, s, m = cfg.train, cfg.scenario, cfg.memory
    positive("epochs", t.epochs, zero=True)
    positive("base-epochs", t.base_epochs, zero=True)
    positive("lr", t.lr)
    positive("base-lr", t.base_lr)
    positive("batch-size", t.batch_size)
    positive("eval-batch-size", t.eval_batch_size)
    positive("checkpoint-every", t.checkpoint_every, zero=True)
    positive("train.momentum", t.momentum, zero=True)
    positive("train.weight-decay", t.weight_decay, zero=True)
    positive("train.base-weight-decay", t.base_weight_decay, zero=True)
    positive("save-attention", cfg.report.save_attention, zero=True)
    positive("save-samples", cfg.report.save_samples, zero=True)
    positive("save-exemplars", cfg.report.save_exemplars, zero=True)
    positive("base", s.base, zero=True)
    positive("increment", s.increment)
    positive("memory", m.total)
    positive("memory-per-class", m.per_class)
    positive("train-per-class", cfg.data.train_per_class)
    positive("test-per-class", cfg.data.test_per_class)
    positive("data.workers", cfg.data.workers)
    positive("input-size", cfg.data.input_size)
    positive("data.resize", cfg.data.resize)
    if not 0 < cfg.data.rrc_scale <= 1:
        raise ConfigError(f"--data.rrc-scale must be in (0, 1] (the smallest crop's share of the image), got {cfg.data.rrc_scale}")
    if cfg.data.interpolation not in (None, *INTERPOLATIONS):
        raise ConfigError(f"--data.interpolation must be one of {', '.join(INTERPOLATIONS)}, got '{cfg.data.interpolation}'")
    if cfg.data.normalize not in (None, "dataset", "model"):
        normalization(cfg.data.normalize, ((), ()))     # a ConfigError unless a known name or MEAN/STD values
    if cfg.model.weights == "":
        raise ConfigError("--weights expects a file, random or pretrained, got ''")
    if cfg.data.resident not in RESIDENT_MODES:
        raise ConfigError(f"--data.resident must be one of {', '.join(RESIDENT_MODES)}, got '{cfg.data.resident}'")
    positive("seed", cfg.seed, zero=True)
    if m.total is not None and m.per_class is not None:
        raise ConfigError("--memory and --memory-per-class are exclusive: give a fixed total or a per-class budget")
    if t.clip_grad is not None and not t.clip_grad >= 0:
        raise ConfigError(f"--train.clip-grad must be >= 0 (0: no clipping), got {t.clip_grad}")
    if t.optim not in (None, *OPTIMS):
        raise ConfigError(f"--optim must be one of {', '.join(OPTIMS)}, got '{t.optim}'")
    if t.schedule not in (None, "cosine", "step"):
        raise ConfigError(f"--train.schedule must be cosine or step, got '{t.schedule}'")
    if t.precision not in ("auto", "bf16", "fp32"):
        raise ConfigError(f"--precision must be auto, bf16 or fp32, got '{t.precision}'")
    progress_mode(t.progress)            # a ConfigError unless a mode (or a bool)
    if not (t.device in ("auto", "cpu", "cuda") or t.device.startswith("cuda:")):
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got '{t.device}'")
    positive("train.warmup-epochs", t.warmup_epochs, zero=True)
    for name, ms in (("milestones", t.milestones or []), ("base-milestones", t.base_milestones or [])):
        if any(e < 0 for e in ms):
            raise ConfigError(f"--train.{name} must be non-negative epochs, got {ms}")


def resolve_training(train: TrainConfig, dataset: str, training: TrainingDefaults) -> TrainConfig:
    """``train`` (not changed) with the options left unset taken from the recipe's defaults
    ``training`` (its ``Schedule`` for ``dataset``, every phase QUICK_EPOCHS epochs on the quick data
    sets); a first-phase option left unset takes the user's value for the later phases when one was
    given (``--epochs 5`` trains every phase 5 epochs), else the schedule's. The part of ``resolve``
    that needs no data: ``cilearn list --training`` shows what it gives on every data set."""
    t, ref = dataclasses.replace(train), training.for_dataset(dataset)
    t.progress = progress_mode(t.progress)     # an older config's bool: its mode
    quick = QUICK_EPOCHS.get(dataset)
    given = {k: getattr(t, k) is not None for k in ("epochs", "lr", "weight_decay", "milestones")}
    # a recipe's phases that train no epochs (a frozen backbone and a closed-form head) train none
    # on the quick data sets either
    if t.epochs is None:
        t.epochs = quick if quick is not None and ref.epochs > 0 else ref.epochs
    if t.base_epochs is None:
        t.base_epochs = (t.epochs if given["epochs"] else quick if quick is not None and ref.base_epochs > 0
                         else ref.base_epochs)
    if t.lr is None:
        t.lr = ref.lr
    if t.base_lr is None:
        t.base_lr = t.lr if given["lr"] else ref.base_lr
    if t.weight_decay is None:
        t.weight_decay = ref.weight_decay
    if t.base_weight_decay is None:
        t.base_weight_decay = t.weight_decay if given["weight_decay"] else ref.base_weight_decay
    if t.batch_size is None:
        t.batch_size = ref.batch_size
    if t.schedule is None:
        t.schedule = ref.schedule
    if t.milestones is None:
        t.milestones = effective_milestones(ref.milestones, t.epochs) if t.schedule == ref.schedule else []
    if t.base_milestones is None:
        t.base_milestones = (list(t.milestones) if given["milestones"] else
                             effective_milestones(ref.base_milestones, t.base_epochs)
                             if t.schedule == ref.schedule else [])
    if t.warmup_epochs is None:
        t.warmup_epochs = ref.warmup_epochs
    if t.optim is None:
        t.optim = ref.optim
    if t.clip_grad is None:
        t.clip_grad = ref.clip_grad
    return t


def resolve(cfg: RunConfig, num_classes: int, image_size: int, training: TrainingDefaults) -> RunConfig:
    """Fill data-set and recipe dependent defaults (``training``: the recipe's; ``resolve_training``)
    and check the scenario against the data set."""

    cfg = dataclasses.replace(cfg, train=resolve_training(cfg.train, cfg.data.dataset, training),
                              scenario=dataclasses.replace(cfg.scenario), model=dataclasses.replace(cfg.model))
    s = cfg.scenario
    if s.base > num_classes:
        raise ConfigError(f"--base {s.base} is larger than the number of classes ({num_classes}) of {cfg.data.dataset}")
    if s.increment > num_classes:
        raise ConfigError(f"--increment {s.increment} is larger than the number of classes ({num_classes}) of {cfg.data.dataset}")
    first = s.base or s.increment
    if (num_classes - first) % s.increment != 0:
        raise ConfigError(
            f"--base {s.base} --increment {s.increment} do not cover the {num_classes} classes of "
            f"{cfg.data.dataset}: expected (classes - base) to be a multiple of the increment")
    if s.class_order is not None and sorted(s.class_order) != list(range(num_classes)):
        raise ConfigError(f"scenario.class_order must be a permutation of 0..{num_classes - 1}")
    return cfg
