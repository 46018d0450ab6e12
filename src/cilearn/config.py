"""Typed run configuration: dataclasses with defaults in code, loaded from YAML and CLI overrides.

Every key is validated (unknown keys and wrong types are a ``ConfigError`` naming the key);
``resolve`` fills the data-set dependent ``None`` defaults so that the ``config.yaml`` saved next
to the results is exactly what ran.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any

from .data.rows import RESIDENT_MODES
from .errors import ConfigError
from .models.backbones import auto_backbone


@dataclass
class DataConfig:
    dataset: str = "digits"
    data_dir: str | None = None
    train_per_class: int | None = None   # keep a seeded subset of N training images per class
    image_size: int | None = None        # image folders: decoded images are resized to this (px)
    train_list: str | None = None
    test_list: str | None = None
    cache_dir: str | None = None
    workers: int | None = None           # image folders: decoding processes; None: the CPUs, at most 32
    resident: str = "auto"               # auto | device | host: where the uint8 images live (cilearn.data.rows)
    augment: str | None = None           # None: the data set's default (crop-flip, flip, none, rrc-flip)


@dataclass
class ScenarioConfig:
    base: int = 0                        # classes of the first phase; 0 means "increment" (B0)
    increment: int = 2
    class_order: list[int] | None = None  # None: RandomState(seed).permutation(num_classes)


@dataclass
class ModelConfig:
    backbone: str = "auto"               # auto: convnet <= 16 px, resnet32 <= 32 px, else resnet18
    head: str | None = None              # None: the method's default head
    last_relu: bool | None = None        # ReLU after the backbone's last block; None: the method's default
    proxies: int = 10                    # lsc head: proxies per class (PODNet Sec. 4.1: 10)
    scale: float | None = None           # cosine / lsc heads: initial learnable scale (sigma, eta); None: the method's


@dataclass
class TrainConfig:
    # None: the recipe's default for the data set (its ``Schedule``, cilearn.methods.schedules),
    # filled in by ``resolve``: config.yaml holds the values that ran.
    epochs: int | None = None            # phases > 0 (quick data sets: QUICK_EPOCHS, every phase)
    base_epochs: int | None = None       # first phase; None: --epochs when given, else the recipe's
    lr: float | None = None
    base_lr: float | None = None         # None: --lr when given, else the recipe's
    batch_size: int | None = None
    momentum: float = 0.9
    weight_decay: float | None = None
    base_weight_decay: float | None = None  # first phase; None: --train.weight-decay when given, else the recipe's
    schedule: str | None = None          # cosine (per step, to 0) | step (x gamma at milestones)
    milestones: list[int] | None = None  # epochs, for schedule=step (see ``resolve`` for --epochs overrides)
    base_milestones: list[int] | None = None  # first phase
    warmup_epochs: int | None = None     # linear warm-up of the lr over the first epochs of every stage (DER)
    gamma: float = 0.1
    precision: str = "auto"              # auto | bf16 | fp32
    channels_last: bool = True
    compile: bool = False                # torch.compile the backbone(s) on the first training step (train.py)
    device: str = "auto"                 # auto | cpu | cuda | cuda:N
    eval_batch_size: int = 512
    progress: bool = True
    checkpoint_every: int = 10           # epochs between checkpoints inside a phase (0: only at phase ends)
    # shorthands for calibration components (cilearn.calibration); None: the recipe's. The resolved
    # config says what ran (``calibration`` and ``components`` hold the same)
    balanced_finetune: bool | None = None  # adds / removes the balanced-finetune component (lucir: on)
    finetune_epochs: int | None = None   # its epochs and lr: components.balanced-finetune (LUCIR's code: 20 epochs,
    finetune_lr: float | None = None     #   lr 0.01, x0.1 at epoch 10; PODNet's: constant lr 0.05, 0.01 on image folders)
    finetune_head_only: bool = True      # train the head only (backbone frozen, BN in eval mode)
    weight_align: bool | None = None     # adds / removes the weight-align component (wa: on)
    weight_clip: bool | None = None      # WA's non-negative head weights (wa: on)
    freeze_old_head: bool | None = None  # old classes' head rows fixed in the main stage (lucir: on)
    compression_epochs: int | None = None  # FOSTER's compression stage (phases > 0); None: the phase's epochs
    compression_lr: float | None = None    # ... and its lr; None: the phase's lr


@dataclass
class MnemonicsConfig:
    """Options of the exemplar optimizers ``mnemonics`` / ``mnemonics-single`` (cilearn.memory.mnemonics;
    defaults from the authors' releases, docs/methods/mnemonics.md gives file and line)."""
    epochs: int | None = None            # outer passes over all seen classes' data per phase; None: the form's (10 / 1)
    iterations: int | None = None        # cap on the outer steps per phase; None: no cap
    steps: int = 20                      # bilevel: step-sets of the inner loop (first release: mnemonics_steps)
    inner_epochs: int = 5                # bilevel: inner passes over the step-sets (first release: mnemonics_epochs)
    inner_lr: float = 0.01               # bilevel: initial learnable lr of each inner step (first release: mnemonics_lr)
    lr: float | None = None              # pixel step, normalised units; None: the form's (1e-6 / 5e-6)
    batch_size: int = 128                # validation images per outer step
    step: str | None = None              # adam (first release) | sgd (current release); None: the form's
    adjust_old: bool = True              # bilevel: the paper's split-halves adjustment of old-class exemplars


@dataclass
class CompressionConfig:
    """Options of the exemplar compressors ``full`` / ``cam-threshold`` / ``cim``
    (cilearn.memory.compress). Defaults: CIM (Luo et al. 2023) Sec. 5 and its official configs."""
    eta: int = 4                         # compression ratio of the non-box pixels: downsampled sqrt(eta) per side
    resample: str = "nearest"            # nearest down and up (official utils/transform.py) | area (average + bilinear, ours)
    select_on: str = "compressed"        # herding on the compressed images' features (official) | original (ours, earlier)
    tau: float = 0.6                     # CAM threshold of the mask (cam-threshold, cim)
    artifact_prob: float = 0.1           # phases > 0: probability of compressing a new-class training image around a random box
    iterations: int = 0                  # cim: extra bilevel steps on the CIM model at each phase end (official: none;
                                         # it trains after every epoch, components.cim-meta)
    batch_size: int = 16                 # cim: new images (and as many exemplars) per step (official meta_batch_size)
    inner_lr: float | None = None        # cim: lr of the inner SGD step of the CIL model; None: --lr
    lr: float = 0.01                     # cim: Adam lr of the CIM parameters (official phi_lr)
    reg_weight: float = 0.1              # cim: mu, weight of the memory regulariser mean(CAM^2) at feature resolution
    cls_weight: float = 0.2              # cim: mu', weight of the CIM model's CE
    grad_clip: float = 1.0               # cim: gradient-norm clip of the CIM parameters (official max_phi_grad_norm)


@dataclass
class MemoryConfig:
    total: int | None = None             # fixed total budget, shared by all seen classes
    per_class: int | None = None         # fixed per class, total grows with the classes
    selection: str = "herding"           # herding | random | closest
    optimizer: str | None = None         # none | mnemonics | mnemonics-single; None: the method's
    mnemonics: MnemonicsConfig = field(default_factory=MnemonicsConfig)
    compressor: str | None = None        # none | full | cam-threshold | cim; None: the method's (foster-cim, der-cim: cim)
    compression: CompressionConfig = field(default_factory=CompressionConfig)


@dataclass
class LossConfig:
    cls: str | None = None               # classification loss; None: the method's default
    kd_weight: float | None = None       # None: the method's default
    temperature: float = 2.0             # KD temperature (LwF/iCaRL: T = 2)
    distill: list[str] = field(default_factory=list)   # extra teacher terms for any method: attention
    attention_weight: float | None = None  # gamma of LwM's attention term; None: 1
    less_forget_weight: float | None = None  # LUCIR's lambda_base; None: 5, 10 on image folders (ImageNet)
    margin: float = 0.5                  # LUCIR's margin ranking: margin m
    margin_k: int = 2                    # ... against the K hardest new classes
    margin_weight: float | None = None   # ... and its weight; None: the method's (lucir 1, lucir-bsce 0)
    nca_margin: float = 0.6              # PODNet's NCA margin delta (Sec. 4.1), on the unscaled similarity
    pod_spatial_weight: float | None = None  # PODNet's lambda_c; None: 3, 8 on image folders (official configs)
    pod_flat_weight: float | None = None     # PODNet's lambda_f; None: 1, 10 on image folders (official configs)
    aux_weight: float | None = None      # DER's auxiliary loss lambda_a / FOSTER's feature-enhancement CE; None: 1
    la_beta: float = 0.96                # FOSTER: effective-number beta of the logit-adjusted CE (boosting)
    bkd_beta: float = 0.97               # FOSTER: effective-number beta of the balanced KD (compression)
    # DT-ID (--distill dual-teacher): KD of the new-class logit block from a new-class teacher
    dual_teacher_weight: float = 1.0     # weight of that KD (the old block keeps the method's own KD)
    dual_teacher_init: str = "copy"      # copy: the new teacher starts from the old model; scratch: fresh init
    dual_teacher_epochs: int | None = None  # its training epochs; None: the phase's


@dataclass
class GeneratorReplayFields:
    """The options of DF-GR's generator replay (the ``dfgr`` component's, ``cilearn.replay``; the
    ``replay`` section holds them as shorthands): a generator trained against the old model alone
    before each phase > 0, its samples distilled from the old model in every training step. The
    paper's values could not be read (METHODS.md); these are cilearn's, measured on digits /
    Fashion-MNIST."""
    steps: int = 500                     # generator training steps (Adam)
    batch_size: int = 64                 # latent codes per generator step
    lr: float = 1e-3
    z_dim: int = 100
    width: int = 64                      # generator channels (DAFL's generator: 128)
    bn_weight: float = 1.0               # BatchNorm-statistics matching
    bn_loss: str = "kl"                  # kl (Gaussians) | l2
    entropy_weight: float = 1.0          # per-sample entropy, minimised
    diversity_weight: float = 1.0        # entropy of the batch-mean prediction, maximised
    samples_per_batch: int | None = None  # synthetic samples per training step; None: the training batch size
    kd_weight: float = 1.0               # KD of the old logits on the synthetic samples
    ce_weight: float = 0.0               # CE over all seen classes, label = the old model's argmax (off: KD only)
    # joint: the samples go through the student in the same forward as the real batch (one BatchNorm
    # batch, "mixed into each training batch"); separate: their own forward (cilearn's earlier form)
    forward: str = "joint"
    update_bn: bool = True               # separate forward: it updates BatchNorm running statistics (false: real batches only)


@dataclass
class ReplayConfig(GeneratorReplayFields):
    """``--replay NAME`` and the shorthands of its options (``--replay.steps``, ...)."""
    source: str | None = None            # None: the method's (dfgr recipes: dfgr); "none" turns it off


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
    # calibration components after each phase > 0 (cilearn.calibration), in order; None: the recipe's
    calibration: list[str] | None = None
    # options of the run's contract components by name (cilearn.components): {"bic": {"epochs": 50}};
    # the resolved config holds every option of every component in the run
    components: dict = field(default_factory=dict)
    plugins: list[str] = field(default_factory=list)   # Python files whose registrations the run uses (cilearn.plugins)


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
    compression_epochs: int | None = None  # FOSTER's compression stage; None: the phase's epochs


@dataclass(frozen=True)
class TrainingDefaults:
    small: Schedule                      # CIFAR-10/100, Fashion-MNIST, digits
    imagenet: Schedule | None = None     # image folders; None: the same as ``small``

    def for_dataset(self, dataset: str) -> Schedule:
        return self.imagenet if dataset == "imagefolder" and self.imagenet is not None else self.small


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


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict; unknown keys and wrong types are ConfigErrors."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise ConfigError(f"unknown config key '{prefix}{key}'; expected one of: {', '.join(sorted(known))}")
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(tp, value or {}, f"{prefix}{name}.")
            continue
        ok, coerced = _type_ok(value, tp)
        if not ok:
            raise ConfigError(f"config key '{prefix}{name}' must be {_type_name(tp)}, got {value!r}")
        kwargs[name] = coerced
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


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
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of options, got {type(data).__name__}")
    return data


# ---------------------------------------------------------------- validation
def validate(cfg: RunConfig) -> None:
    """Checks that need no data set (numbers, names). Data-set checks are in ``resolve``."""
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
    positive("loss.temperature", cfg.loss.temperature)
    positive("loss.kd-weight", cfg.loss.kd_weight, zero=True)
    positive("loss.attention-weight", cfg.loss.attention_weight, zero=True)
    positive("loss.less-forget-weight", cfg.loss.less_forget_weight, zero=True)
    positive("loss.margin", cfg.loss.margin, zero=True)
    positive("loss.margin-k", cfg.loss.margin_k)
    positive("loss.margin-weight", cfg.loss.margin_weight, zero=True)
    positive("loss.nca-margin", cfg.loss.nca_margin, zero=True)
    positive("loss.pod-spatial-weight", cfg.loss.pod_spatial_weight, zero=True)
    positive("loss.pod-flat-weight", cfg.loss.pod_flat_weight, zero=True)
    positive("loss.aux-weight", cfg.loss.aux_weight, zero=True)
    positive("train.compression-epochs", t.compression_epochs, zero=True)
    positive("train.compression-lr", t.compression_lr)
    for name in ("la_beta", "bkd_beta"):
        b = getattr(cfg.loss, name)
        if not 0 <= b < 1:
            raise ConfigError(f"--loss.{name.replace('_', '-')} must be in [0, 1), got {b}")
    positive("model.proxies", cfg.model.proxies)
    positive("model.scale", cfg.model.scale)
    positive("train.finetune-epochs", t.finetune_epochs, zero=True)
    positive("train.finetune-lr", t.finetune_lr)
    positive("save-attention", cfg.report.save_attention, zero=True)
    positive("save-samples", cfg.report.save_samples, zero=True)
    positive("loss.dual-teacher-weight", cfg.loss.dual_teacher_weight, zero=True)
    positive("loss.dual-teacher-epochs", cfg.loss.dual_teacher_epochs, zero=True)
    if cfg.loss.dual_teacher_init not in ("copy", "scratch"):
        raise ConfigError(f"--loss.dual-teacher-init must be copy or scratch, got '{cfg.loss.dual_teacher_init}'")
    r = cfg.replay
    positive("replay.steps", r.steps)
    positive("replay.batch-size", r.batch_size)
    positive("replay.lr", r.lr)
    positive("replay.z-dim", r.z_dim)
    positive("replay.width", r.width)
    positive("replay.samples-per-batch", r.samples_per_batch)
    for name in ("bn_weight", "entropy_weight", "diversity_weight", "kd_weight", "ce_weight"):
        positive("replay." + name.replace("_", "-"), getattr(r, name), zero=True)
    if r.bn_loss not in ("kl", "l2"):
        raise ConfigError(f"--replay.bn-loss must be kl or l2, got '{r.bn_loss}'")
    mn = m.mnemonics
    for key, zero in (("epochs", True), ("iterations", True), ("steps", False), ("inner_epochs", True),
                      ("inner_lr", False), ("lr", False), ("batch_size", False)):
        positive("memory.mnemonics." + key.replace("_", "-"), getattr(mn, key), zero=zero)
    cc = m.compression
    if cc.eta < 1 or math.isqrt(cc.eta) ** 2 != cc.eta:
        raise ConfigError(f"--memory.compression.eta must be a square number >= 1 (the image is downsampled "
                          f"sqrt(eta) per side), got {cc.eta}")
    if cc.select_on not in ("compressed", "original"):
        raise ConfigError(f"--memory.compression.select-on must be compressed or original, got '{cc.select_on}'")
    if cc.resample not in ("nearest", "area"):
        raise ConfigError(f"--memory.compression.resample must be nearest or area, got '{cc.resample}'")
    if not 0 < cc.tau <= 1:
        raise ConfigError(f"--memory.compression.tau must be in (0, 1], got {cc.tau}")
    if not 0 <= cc.artifact_prob <= 1:
        raise ConfigError(f"--memory.compression.artifact-prob must be in [0, 1], got {cc.artifact_prob}")
    for key, zero in (("iterations", True), ("batch_size", False), ("inner_lr", False), ("lr", False),
                      ("reg_weight", True), ("cls_weight", True), ("grad_clip", False)):
        positive("memory.compression." + key.replace("_", "-"), getattr(cc, key), zero=zero)
    positive("save-exemplars", cfg.report.save_exemplars, zero=True)
    positive("base", s.base, zero=True)
    positive("increment", s.increment)
    positive("memory", m.total)
    positive("memory-per-class", m.per_class)
    positive("train-per-class", cfg.data.train_per_class)
    positive("data.workers", cfg.data.workers)
    if cfg.data.resident not in RESIDENT_MODES:
        raise ConfigError(f"--data.resident must be one of {', '.join(RESIDENT_MODES)}, got '{cfg.data.resident}'")
    positive("seed", cfg.seed, zero=True)
    if m.total is not None and m.per_class is not None:
        raise ConfigError("--memory and --memory-per-class are exclusive: give a fixed total or a per-class budget")
    if t.schedule not in (None, "cosine", "step"):
        raise ConfigError(f"--train.schedule must be cosine or step, got '{t.schedule}'")
    if t.precision not in ("auto", "bf16", "fp32"):
        raise ConfigError(f"--precision must be auto, bf16 or fp32, got '{t.precision}'")
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
    quick = QUICK_EPOCHS.get(dataset)
    given = {k: getattr(t, k) is not None for k in ("epochs", "lr", "weight_decay", "milestones")}
    if t.epochs is None:
        t.epochs = quick if quick is not None else ref.epochs
    if t.base_epochs is None:
        t.base_epochs = t.epochs if given["epochs"] or quick is not None else ref.base_epochs
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
    if t.compression_epochs is None and ref.compression_epochs is not None and quick is None and not given["epochs"]:
        t.compression_epochs = ref.compression_epochs
    return t


def resolve(cfg: RunConfig, num_classes: int, image_size: int, training: TrainingDefaults) -> RunConfig:
    """Fill data-set and recipe dependent defaults (``training``: the recipe's; ``resolve_training``)
    and check the scenario against the data set."""

    cfg = dataclasses.replace(cfg, train=resolve_training(cfg.train, cfg.data.dataset, training),
                              scenario=dataclasses.replace(cfg.scenario), model=dataclasses.replace(cfg.model),
                              loss=dataclasses.replace(cfg.loss))
    if cfg.model.backbone == "auto":
        cfg.model.backbone = auto_backbone(image_size)
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
