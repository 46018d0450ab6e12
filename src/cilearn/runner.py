"""One class-incremental run: data -> scenario -> for each phase: train, calibrate, update
memory, evaluate -> metrics. ``run(cfg)`` is the Python API behind ``cilearn run``.

Nothing is written before the configuration and the data set have been validated; the run's
``metrics.json`` is written last (atomically), so a directory without it is not a finished run.
Under torchrun every process runs this code; rank 0 alone writes (``cilearn.distributed``).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch

from . import __version__, distributed
from .checkpoint import (
    EPOCH_FILE,
    PHASE_FILE,
    Checkpointer,
    load_checkpoint,
    restoring,
    set_rng_state,
)
from .config import (
    RunConfig,
    describe_stage,
    from_dict,
    load_yaml,
    resolve,
    to_dict,
    validate,
)
from .data.augment import Augmenter
from .data.base import DataOptions
from .data.datasets import load_dataset, subsample_per_class
from .data.rows import HostRows, choose_resident
from .data.scenario import Scenario, class_order
from .errors import CilearnError, ConfigError
from .evaluate import (
    PhaseEval,
    average_incremental_accuracy,
    confusion_matrix,
    evaluate_phase,
    forgetting,
    predict,
)
from .events import NULL, Observer
from .files import atomic_write
from .plugins import load_plugins
from .services import Context, SplitData
from .losses import CLS_LOSSES
from .memory import Budget, Memory
from .memory import build as build_memory
from .memory import check_parts as check_memory_parts
from .memory.selection import SELECTIONS
from .train import FitResult
from .methods import METHODS
from .methods.options import check_unused, prune, resolve_options
from .models import build_net
from .models.backbones import BACKBONES
from .models.heads import HEADS, head_options
from .components import REGISTRIES


@dataclass
class RunView:
    """The run's objects as the reporting layer sees them (``Observer.on_start``)."""
    cfg: RunConfig
    out: Path
    net: torch.nn.Module
    memory: Memory | None
    augmenter: Augmenter
    autocast_dtype: torch.dtype | None
    data: SplitData


@dataclass
class Results:
    metrics: dict[str, Any]
    out_dir: Path
    config: RunConfig

    @property
    def accuracy_matrix(self) -> list[list[float]]:
        return self.metrics["accuracy_matrix"]

    @property
    def avg_incremental_acc(self) -> float:
        return self.metrics["avg_incremental_acc"]

    @property
    def last_acc(self) -> float:
        return self.metrics["last_acc"]


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


class Log:
    """Prints to the console and appends to ``log.txt``."""

    def __init__(self, path: Path | None, echo: bool = True):
        self.file: TextIO | None = open(path, "a") if path else None
        self.echo = echo

    def __call__(self, msg: str = "") -> None:
        if self.echo:
            print(msg, flush=True)
        self.record(msg)

    def record(self, msg: str) -> None:
        """To ``log.txt`` only (the CLI prints errors itself)."""
        if self.file:
            self.file.write(msg + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()


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


RUN_FILES = ("config.yaml", "metrics.json", "metrics.csv", "accuracy.png", "log.txt", PHASE_FILE, EPOCH_FILE)


def uses_memory(method_cls, cfg: RunConfig) -> bool:
    """Methods that keep exemplars, and any other method given a budget (any method given --memory N)."""
    return method_cls.uses_memory or cfg.memory.total is not None or cfg.memory.per_class is not None


def make_out_dir(cfg: RunConfig, overwrite: bool = False) -> Path:
    if cfg.out:
        out = Path(cfg.out)
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = Path("runs") / f"{cfg.method}-{cfg.data.dataset}-{stamp}"
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory")
    if out.exists() and any((out / f).exists() for f in ("config.yaml", "metrics.json", PHASE_FILE, EPOCH_FILE)):
        if not overwrite:
            raise ConfigError(f"--out {out} already holds a run; continue it with --resume {out}, "
                              "replace it with --overwrite, or choose another directory")
        for f in RUN_FILES:
            (out / f).unlink(missing_ok=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot create the directory ({e.strerror})") from None
    return out


def run(cfg: RunConfig, echo: bool = True, overwrite: bool = False, observer: Observer | None = None) -> Results:
    """Run a class-incremental experiment and write its outputs; returns the metrics. ``observer``
    (``cilearn.events``) is told what happens, on the process that writes (figures, TensorBoard:
    ``cilearn.api.run`` hands it ``cilearn.report.Reporter``)."""
    wall0 = time.perf_counter()
    distributed.init()
    cfg, ds, method_cls = distributed.main_first(lambda: prepare(cfg))
    device = resolve_device(cfg.train.device)
    amp = resolve_precision(cfg.train.precision, device)
    out = distributed.on_main(lambda: make_out_dir(cfg, overwrite))
    return _execute(cfg, ds, method_cls, device, amp, out, echo, wall0, None, None, observer)


def resume(run_dir: str | Path, echo: bool = True, device: str | None = None,
           progress: bool | None = None, observer: Observer | None = None) -> Results:
    """Continue an interrupted run from its last complete checkpoint (``cilearn run --resume``)."""
    wall0 = time.perf_counter()
    out = Path(run_dir)
    distributed.init()
    cfg = config_from_dict(distributed.on_main(lambda: _resume_config(out)))
    cfg.out = str(out)
    if device is not None:
        cfg.train.device = device
    if progress is not None:
        cfg.train.progress = progress
    cfg, ds, method_cls = distributed.main_first(lambda: prepare(cfg, strict=False))
    dev = resolve_device(cfg.train.device)
    amp = resolve_precision(cfg.train.precision, dev)
    phase_state, epoch_state = distributed.on_main(lambda: tuple(
        load_checkpoint(out / f, kind) if (out / f).exists() else None
        for f, kind in ((PHASE_FILE, "phase"), (EPOCH_FILE, "epoch"))))
    next_phase = phase_state["next_phase"] if phase_state else 0
    if epoch_state is not None and epoch_state["phase"] != next_phase:
        epoch_state = None   # stale: its phase was finished and checkpointed after it
    return _execute(cfg, ds, method_cls, dev, amp, out, echo, wall0, phase_state, epoch_state, observer)


def _resume_config(out: Path) -> dict:
    if not (out / "config.yaml").is_file():
        raise ConfigError(f"--resume {out}: no config.yaml there, not a cilearn run directory")
    if (out / "metrics.json").exists():
        raise ConfigError(f"--resume {out}: this run is already complete (metrics.json exists)")
    return load_yaml(str(out / "config.yaml"))


def _execute(cfg, ds, method_cls, device, amp, out: Path, echo: bool, wall0: float,
             phase_state: dict | None, epoch_state: dict | None, observer: Observer | None) -> Results:
    writes = distributed.is_main()       # under torchrun: rank 0 writes, the others compute
    log = Log(out / "log.txt" if writes else None, echo and writes)
    events = observer if observer is not None and writes else NULL
    ckpt = None
    try:
        torch.manual_seed(cfg.seed)
        gen = torch.Generator(device=device).manual_seed(cfg.seed)
        ckpt = Checkpointer(out if writes else None, cfg.train.checkpoint_every, gen)
        ckpt.on_epoch = events.on_epoch
        ckpt.install_signal_handlers()
        return _phases(cfg, ds, method_cls, device, amp, out, log, wall0, gen, ckpt, phase_state, epoch_state, events)
    except CilearnError as e:
        log.record(f"stopped: {e}")
        raise
    finally:
        if ckpt is not None:
            ckpt.restore_signal_handlers()
        events.close()
        log.close()


def _phases(cfg, ds, method_cls, device, amp, out: Path, log: Log, wall0: float, gen: torch.Generator,
            ckpt: Checkpointer, phase_state: dict | None, epoch_state: dict | None, events: Observer = NULL) -> Results:
    import yaml

    meta = {"cilearn_version": __version__, "git_commit": git_commit(), "torch_version": str(torch.__version__),
            "device": str(device), "precision": "bf16" if amp is not None else "fp32",
            "python": sys.version.split()[0], "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    resuming = phase_state is not None or epoch_state is not None
    writes, world = distributed.is_main(), distributed.world_size()
    if world > 1:
        meta["distributed"] = {"world_size": world, "backend": distributed.backend()}
    # rank 0's choice everywhere (auto looks at free memory, which may differ a little between GPUs)
    resident = distributed.broadcast_object(choose_resident(cfg.data.resident, ds.train_x.nbytes + ds.test_x.nbytes,
                                                            device))
    meta["resident"] = resident          # where the uint8 images live: device, or host (batches moved)
    if writes and not (out / "config.yaml").exists():
        used = prune(to_dict(cfg), cfg, method_cls)   # only the options this run uses
        atomic_write(out / "config.yaml", yaml.safe_dump({**used, "meta": meta}, sort_keys=False))

    scenario = Scenario.make(ds.num_classes, cfg.scenario.base, cfg.scenario.increment, cfg.scenario.class_order)
    place = (lambda t: HostRows(t, device)) if resident == "host" else (lambda t: t.to(device))  # noqa: E731
    data = SplitData(place(ds.train_x), scenario.relabel(ds.train_y).to(device),
                     place(ds.test_x), scenario.relabel(ds.test_y).to(device))
    aug = Augmenter(cfg.data.augment or ds.augment, ds.pad, ds.mean, ds.std, cfg.train.channels_last)
    last_relu = method_cls.last_relu if cfg.model.last_relu is None else cfg.model.last_relu
    head = cfg.model.head or method_cls.head
    scale = method_cls.head_scale if cfg.model.scale is None else cfg.model.scale
    opts = head_options(head, proxies=cfg.model.proxies, sigma=scale)
    net = build_net(cfg.model.backbone, head, ds.image_shape[0], last_relu, method_cls.expandable, **opts).to(device)
    if cfg.train.channels_last:
        net = net.to(memory_format=torch.channels_last)
    memory = build_memory(cfg) if uses_memory(method_cls, cfg) else None
    ctx = Context(cfg, net, memory, aug, device, gen, amp, ckpt, events)
    method = method_cls(ctx)
    ckpt.method_state = method.state_dict  # type: ignore[method-assign]

    def on_epoch(phase_index: int, stage: str, epoch: int, epochs: int, scalars: dict[str, float]) -> None:
        events.on_epoch(phase_index, stage, epoch, epochs, scalars)
        method.epoch_end(stage, epoch)                 # the components' epoch_end (main stage)
    ckpt.on_epoch = on_epoch

    events.on_start(RunView(cfg, out, net, memory, aug, amp, data))
    evals: list[PhaseEval] = []
    phase_rows: list[dict] = []
    first, wall_before = 0, 0.0
    if phase_state is not None:
        with restoring(out / PHASE_FILE):
            net.add_classes(phase_state["num_classes"])
            net.load_state_dict(phase_state["net"])
            if memory is not None:
                memory.load_state(phase_state["memory"], device)
            method.load_state_dict(phase_state["method"])
            evals = [PhaseEval(**e) for e in phase_state["evals"]]
            phase_rows = phase_state["rows"]
            set_rng_state(gen, phase_state["rng"])
            first, wall_before = phase_state["next_phase"], phase_state["wall_seconds"]

    if resuming:
        where = f"phase {first}" + (f", epoch {epoch_state['fit']['epoch'] + 1}" if epoch_state else "")
        log(f"resumed {out} at {where}")
    else:
        log(f"cilearn {__version__}: {cfg.method} on {ds.name} ({len(ds.train_y)} train / {len(ds.test_y)} test images, "
            f"{ds.num_classes} classes, {'x'.join(map(str, ds.image_shape))}), backbone {cfg.model.backbone}, "
            f"{device} {meta['precision']}, seed {cfg.seed}")
        log(scenario.describe())
        log(describe_training(cfg, method_cls))
        if resident == "host":
            log(f"images stay on the host ({(ds.train_x.nbytes + ds.test_x.nbytes) / 2**30:.1f} GiB"
                + (", memory-mapped cache" if ds.info.get("cache") else "") + f"), batches moved to {device}")
        if world > 1:
            log(f"distributed: {world} processes ({meta['distributed']['backend']}), global batch "
                f"{cfg.train.batch_size} = about {cfg.train.batch_size // world} per process")
        if memory is not None:
            b = memory.budget
            unit = "image units" if memory.compressor is not None else "exemplars"
            log(f"memory: {f'%d {unit} in total' % b.total if b.total is not None else f'%d {unit} per class' % b.per_class}, "
                f"selection {cfg.memory.selection}"
                + (f", compressor {cfg.memory.compressor} (eta {cfg.memory.compression.eta})"
                   if memory.compressor is not None else "")
                + (f", optimizer {cfg.memory.optimizer}" if cfg.memory.optimizer != "none" else ""))
    log(f"{'phase':>5} {'classes':>7} {'acc':>6} {'nme':>6} {'old':>6} {'new':>6} {'top5':>6} {'train s':>8} {'img/s':>7}")

    for phase in scenario.phases[first:]:
        ckpt.phase = phase.index
        x, y = method.training_set(phase, data)
        method.before_phase(phase, x, y)
        if epoch_state is not None:   # continue inside this phase: model, RNG, optimizer position
            with restoring(out / EPOCH_FILE):
                net.load_state_dict(epoch_state["net"])
                method.load_state_dict(epoch_state["method"])
                set_rng_state(gen, epoch_state["rng"])
            ckpt.resume_fit = epoch_state["fit"]
            epoch_state = None
        fr = method.train_phase(phase, x, y)             # train
        cal = method.calibrate(phase)                    # calibrate
        fr = FitResult(fr.seconds + cal.seconds, fr.images + cal.images, fr.loss)
        method.after_phase(phase, data)                  # update memory
        ranks = sync_ranks(net, memory, gen, device) if world > 1 else None
        seen = data.test_y < phase.end
        logits, emb = distributed.gather_rows(lambda xs: predict(net, xs, aug, cfg.train.eval_batch_size, amp),
                                              data.test_x[seen])
        ev = evaluate_phase(logits, emb, data.test_y[seen], [(p.start, p.end) for p in scenario.phases[:phase.index + 1]],
                            method.prototypes())
        evals.append(ev)
        row = {"phase": phase.index, "classes_seen": phase.seen, "acc": ev.acc, "acc_nme": ev.acc_nme,
               "acc_old": ev.acc_old, "acc_new": ev.acc_new, "acc_old_among_old": ev.acc_old_among_old,
               "acc_new_among_new": ev.acc_new_among_new, "top5": ev.top5, "train_seconds": fr.seconds,
               "finetune_seconds": method.finetune_seconds, "train_images_per_s": fr.images_per_s, "loss": fr.loss,
               "exemplar_optimizer": dict(getattr(memory.optimizer, "stats", {})) if memory is not None else {},
               "params": sum(p.numel() for p in net.parameters()), **method.diagnostics(),
               **memory_row(memory),
               "per_class_acc": ev.class_acc}
        if ranks is not None:
            row["ranks"] = ranks
        if phase.index == len(scenario.phases) - 1:   # the report's confusion matrix: true x predicted ids
            row["confusion"] = confusion_matrix(logits.argmax(1), data.test_y[seen], logits.shape[1])
        phase_rows.append(row)
        events.on_phase(row)
        f = lambda v: f"{v:6.2f}" if v is not None else f"{'-':>6}"  # noqa: E731
        log(f"{phase.index:>5} {phase.seen:>7} {f(ev.acc)} {f(ev.acc_nme)} {f(ev.acc_old)} {f(ev.acc_new)} "
            f"{f(ev.top5)} {fr.seconds:8.1f} {fr.images_per_s:7.0f}")
        ckpt.save_phase({"next_phase": phase.index + 1, "num_classes": net.num_classes, "net": net.state_dict(),
                         "memory": memory.state() if memory is not None else None, "method": method.state_dict(),
                         "evals": [dataclasses.asdict(e) for e in evals], "rows": phase_rows,
                         "wall_seconds": wall_before + time.perf_counter() - wall0})
        if distributed.any_rank(ckpt.stop_requested) and phase.index + 1 < len(scenario.phases):
            raise ckpt.interrupted(f"phase {phase.index} (finished)")

    metrics = summarize(evals, phase_rows, memory, wall_before + time.perf_counter() - wall0,
                        cfg.scenario.class_order)
    if world > 1:
        metrics["distributed"] = meta["distributed"]
    if writes:
        write_outputs(out, metrics, events)
    log(f"average incremental accuracy {metrics['avg_incremental_acc']:.2f}"
        + (f" (NME {metrics['avg_incremental_acc_nme']:.2f})" if metrics["avg_incremental_acc_nme"] is not None else "")
        + f", last {metrics['last_acc']:.2f}, forgetting {metrics['forgetting']:.2f}, "
        f"wall {metrics['wall_seconds']:.1f} s -> {out}")
    return Results(metrics, out, cfg)


def describe_training(cfg: RunConfig, method_cls) -> str:
    """The phase banner's training lines: what each phase trains with (the effective milestones
    included) and where the recipe's defaults come from."""
    t = cfg.train
    ref = method_cls.training.for_dataset(cfg.data.dataset)
    warm = f", {t.warmup_epochs} warm-up epochs" if t.warmup_epochs else ""
    first = describe_stage(t.base_epochs, t.base_lr, t.schedule, t.base_milestones, t.base_weight_decay, t.gamma)
    later = describe_stage(t.epochs, t.lr, t.schedule, t.milestones, t.weight_decay, t.gamma)
    return (f"training: batch {t.batch_size}, SGD momentum {t.momentum:g}{warm}; "
            f"phase 0: {first}; later phases: {later}\n"
            f"  (defaults of {cfg.method}: {ref.source}; options given override them, milestones past a "
            f"phase's epochs do not fire)")


def sync_ranks(net: torch.nn.Module, memory: Memory | None, gen: torch.Generator,
               device: torch.device) -> dict[str, list[str]]:
    """Under torchrun, after a phase's memory update: rank 0's model, exemplar memory and RNG state
    on every rank. Returns, per rank, the digest (``distributed.digest``) of the memory each rank
    computed itself (``memory_own``: ranks select from the same gathered embeddings, so these agree
    unless a computation differed between ranks) and of the memory and model each rank holds after
    the broadcast (``memory``, ``model``: identical by construction; recorded in metrics.json's
    phase rows as ``ranks``)."""
    mem_digest = lambda: distributed.digest(  # noqa: E731
        [t for c in sorted(memory.exemplars) for t in (torch.tensor(c), memory.exemplars[c])] if memory else [])
    own = mem_digest()
    distributed.broadcast_module_(net)
    if memory is not None:
        memory.exemplars = distributed.broadcast_tensors(memory.exemplars, device)
    distributed.broadcast_generator_(gen)
    got = distributed.all_gather_object((own, mem_digest(), distributed.digest(net.state_dict().values())))
    return {"memory_own": [g[0] for g in got], "memory": [g[1] for g in got], "model": [g[2] for g in got]}


def memory_row(memory: Memory | None) -> dict[str, Any]:
    """Per-phase memory figures for the metrics rows: exemplars and bytes stored, with a compressor
    its statistics (e.g. a compressor's losses and mask means)."""
    if memory is None:
        return {}
    row = {"memory_images": len(memory), "memory_bytes": memory.nbytes}
    st = memory.optimizer.stats
    if st:      # an exemplar optimizer ran: its pixel change (grey levels: optimised floats, stored images), seconds
        row["exemplar_pixel_change"], row["exemplar_optimizer_seconds"] = st.get("exemplar_pixel_change"), st["seconds"]
        row["exemplar_stored_pixel_change"] = st.get("exemplar_stored_pixel_change")
    if memory.compressor is not None:
        row["compressor"] = dict(memory.compressor.stats)
    return row


def summarize(evals: list[PhaseEval], rows: list[dict], memory: Memory | None, wall: float,
              class_order: list[int] | None = None) -> dict[str, Any]:
    """metrics.json. Besides the summary: ``confusion`` (the last phase's ``[true][predicted]``
    counts, incremental ids), ``class_order`` (incremental id -> data set label) and, in
    ``memory``, ``class_images`` / ``class_bytes`` (exemplars and bytes of each class id)."""
    matrix = [e.task_acc for e in evals]
    nme = [e.acc_nme for e in evals]
    has_nme = all(v is not None for v in nme)
    per_class = 0
    if memory is not None and memory.exemplars:
        per_class = max(len(v) for v in memory.exemplars.values())
    seen, stored = rows[-1]["classes_seen"], (memory.exemplars if memory is not None else {})
    confusion = rows[-1].get("confusion")
    rows = [{k: v for k, v in r.items() if k != "confusion"} for r in rows]
    return {
        "avg_incremental_acc": average_incremental_accuracy([e.acc for e in evals]),
        "last_acc": evals[-1].acc,
        "forgetting": forgetting(matrix),
        "avg_incremental_acc_nme": average_incremental_accuracy(nme) if has_nme else None,
        "last_acc_nme": nme[-1] if has_nme else None,
        "accuracy_matrix": matrix,
        "accuracy_matrix_nme": [e.task_acc_nme for e in evals] if has_nme else None,
        "phases": rows,
        "memory": {"per_class": per_class, "total_images": len(memory) if memory else 0,
                   "total_bytes": memory.nbytes if memory else 0,
                   "class_images": [len(stored[c]) if c in stored else 0 for c in range(seen)],
                   "class_bytes": [memory.class_bytes(c) if c in stored else 0 for c in range(seen)],
                   **memory_units(memory, seen)},
        "wall_seconds": wall,
        "confusion": confusion,
        "class_order": list(class_order) if class_order is not None else None,
    }


def memory_units(memory: Memory | None, seen: int) -> dict[str, Any]:
    """The budget in full-image units (one unit: one uncompressed image's bytes): each class's
    stored bytes in units and the share per class, with the compressor's name."""
    unit = memory.unit_bytes() if memory is not None else None
    if unit is None:
        return {}
    return {"compressor": "none" if memory.compressor is None else memory.compressor.name,
            "unit_bytes": unit, "share_units": memory.budget.share(seen),
            "class_units": [round(memory.class_bytes(c) / unit, 4) for c in range(seen)]}


def write_outputs(out: Path, metrics: dict[str, Any], events: Observer = NULL) -> None:
    cols = ["phase", "classes_seen", "acc", "acc_nme", "acc_old", "acc_new", "top5", "train_seconds",
            "finetune_seconds", "train_images_per_s"]
    lines = [",".join(cols)] + [",".join("" if r.get(c) is None else (f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c]))
                                         for c in cols) for r in metrics["phases"]]
    atomic_write(out / "metrics.csv", "\n".join(lines) + "\n")
    events.on_complete(out, metrics)                                    # figures (accuracy.png)
    atomic_write(out / "metrics.json", json.dumps(metrics, indent=2))   # last: marks the run complete


def config_from_dict(d: dict) -> RunConfig:
    d = {k: v for k, v in d.items() if k != "meta"}   # config.yaml's meta section is informational
    return from_dict(RunConfig, d)


__all__ = ["run", "resume", "Results", "config_from_dict"]
