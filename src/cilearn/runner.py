"""One class-incremental run: data -> scenario -> for each phase: train, calibrate, update
memory, evaluate -> metrics. ``run(cfg)`` is the Python API behind ``cilearn run``.

Nothing is written before the configuration and the data set have been validated; the run's
``metrics.json`` is written last (atomically), so a directory without it is not a finished run.
Under torchrun every process runs this code; rank 0 alone writes (``cilearn.distributed``).
"""
from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch

from . import __version__, distributed
from .checkpoint import (EPOCH_FILE, PHASE_FILE, Checkpointer, load_checkpoint, remove_checkpoints, restoring,
                         set_rng_state)
from .config import RunConfig, load_yaml, to_dict
from .data.augment import Augmenter
from .data.rows import HostRows, choose_resident
from .data.scenario import Scenario, short_list
from .errors import CilearnError, ConfigError
from .embeddings import EmbeddingCache
from .evaluate import PhaseEval, confusion_matrix, evaluate_phase
from .events import NULL, Observer
from .files import atomic_write
from .components import Components
from .learner import Learner
from .memory import Budget, Memory
from .health import phase_warnings
from .methods.options import prune
from .methods.recipe import RunPlan
from .model_io import MODEL_FILE, SPEC_FILE, architecture, build_from, run_spec, save_model
from .outputs import Results, memory_row, other_accuracies, summarize, write_outputs
from .models.weights import initializer
from .prepare import (config_from_dict, describe_training, git_commit, make_augmenter, prepare, resolve_device,
                      resolve_precision)
from .services import RunServices, SplitData
from .progress import lines_on_console
from .train import FitResult


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
    class_names: list[str]     # incremental id -> the data set's class name


class Log:
    """Prints to the console and appends to ``log.txt``. ``stage``: a finished training stage's
    line, printed only where no progress bar showed the stage (``stage_echo``,
    ``cilearn.progress.lines_on_console``), always recorded."""

    def __init__(self, path: Path | None, echo: bool = True, stage_echo: bool = True):
        self.file: TextIO | None = open(path, "a") if path else None
        self.echo, self.stage_echo = echo, stage_echo

    def __call__(self, msg: str = "") -> None:
        if self.echo:
            print(msg, flush=True)
        self.record(msg)

    def stage(self, msg: str) -> None:
        if self.echo and self.stage_echo:
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




RUN_FILES = ("config.yaml", "metrics.json", "metrics.csv", "accuracy.png", "log.txt", PHASE_FILE, EPOCH_FILE,
             MODEL_FILE, SPEC_FILE)


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
    cfg, ds, plan = distributed.main_first(lambda: prepare(cfg))
    device = resolve_device(cfg.train.device)
    amp = resolve_precision(cfg.train.precision, device)
    out = distributed.on_main(lambda: make_out_dir(cfg, overwrite))
    return _execute(cfg, ds, plan, device, amp, out, echo, wall0, None, None, observer)


def resume(run_dir: str | Path, echo: bool = True, device: str | None = None,
           progress: str | bool | None = None, observer: Observer | None = None) -> Results:
    """Continue an interrupted run from its last complete checkpoint (``cilearn run --resume``).
    ``device``, ``progress`` (``train.progress``: auto, always, never, or a bool): in place of the
    run's own."""
    wall0 = time.perf_counter()
    out = Path(run_dir)
    distributed.init()
    cfg = config_from_dict(distributed.on_main(lambda: _resume_config(out)))
    cfg.out = str(out)
    if device is not None:
        cfg.train.device = device
    if progress is not None:
        cfg.train.progress = progress
    cfg, ds, plan = distributed.main_first(lambda: prepare(cfg, strict=False))
    dev = resolve_device(cfg.train.device)
    amp = resolve_precision(cfg.train.precision, dev)
    phase_state, epoch_state = distributed.on_main(lambda: tuple(
        load_checkpoint(out / f, kind) if (out / f).exists() else None
        for f, kind in ((PHASE_FILE, "phase"), (EPOCH_FILE, "epoch"))))
    next_phase = phase_state["next_phase"] if phase_state else 0
    if epoch_state is not None and epoch_state["phase"] != next_phase:
        epoch_state = None   # stale: its phase was finished and checkpointed after it
    return _execute(cfg, ds, plan, dev, amp, out, echo, wall0, phase_state, epoch_state, observer)


def _resume_config(out: Path) -> dict:
    if not (out / "config.yaml").is_file():
        raise ConfigError(f"--resume {out}: no config.yaml there, not a cilearn run directory")
    if (out / "metrics.json").exists():
        raise ConfigError(f"--resume {out}: this run is already complete (metrics.json exists)")
    return load_yaml(str(out / "config.yaml"))


def _execute(cfg, ds, plan: RunPlan, device, amp, out: Path, echo: bool, wall0: float,
             phase_state: dict | None, epoch_state: dict | None, observer: Observer | None) -> Results:
    writes = distributed.is_main()       # under torchrun: rank 0 writes, the others compute
    log = Log(out / "log.txt" if writes else None, echo and writes, lines_on_console(cfg.train.progress))
    events = observer if observer is not None and writes else NULL
    ckpt = None
    try:
        torch.set_num_threads(cfg.train.threads)       # (cilearn.threads; resolved by prepare)
        torch.manual_seed(cfg.seed)
        gen = torch.Generator(device=device).manual_seed(cfg.seed)
        ckpt = Checkpointer(out if writes else None, cfg.train.checkpoint_every, gen)
        ckpt.on_epoch = events.on_epoch
        ckpt.install_signal_handlers()
        return _phases(cfg, ds, plan, device, amp, out, log, wall0, gen, ckpt, phase_state, epoch_state, events)
    except CilearnError as e:
        log.record(f"stopped: {e}")
        raise
    finally:
        if ckpt is not None:
            ckpt.restore_signal_handlers()
        events.close()
        log.close()


def _phases(cfg, ds, plan: RunPlan, device, amp, out: Path, log: Log, wall0: float, gen: torch.Generator,
            ckpt: Checkpointer, phase_state: dict | None, epoch_state: dict | None, events: Observer = NULL) -> Results:
    import yaml

    meta = {"cilearn_version": __version__, "git_commit": git_commit(), "torch_version": str(torch.__version__),
            "device": str(device), "precision": "bf16" if amp is not None else "fp32",
            "python": sys.version.split()[0], "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    resuming = phase_state is not None or epoch_state is not None
    writes, world = distributed.is_main(), distributed.world_size()
    if world > 1:
        meta["distributed"] = {"world_size": world, "backend": distributed.backend()}
    backbone = plan.factory("backbone")
    init, weights_file = initializer(cfg, backbone)   # the weights file read again, its digest checked
    if weights_file is not None:
        meta["weights_file"] = str(weights_file)
    arch = architecture(plan, ds.image_shape[0])
    net = build_from(arch, init)          # before config.yaml: a network that cannot be built writes none
    # rank 0's choice everywhere (auto looks at free memory, which may differ a little between GPUs)
    resident = distributed.broadcast_object(choose_resident(cfg.data.resident, ds.train_x.nbytes + ds.test_x.nbytes,
                                                            device))
    meta["resident"] = resident          # where the uint8 images live: device, or host (batches moved)
    if writes and not (out / "config.yaml").exists():
        used = prune(to_dict(cfg), cfg, plan)   # only the options this run uses
        used.pop("out", None)   # where it ran is in meta: `cilearn run --config RUN/config.yaml` writes a new run
        atomic_write(out / "config.yaml", yaml.safe_dump({**used, "meta": {**meta, "run_dir": str(out)}}, sort_keys=False))

    scenario = Scenario.make(ds.num_classes, cfg.scenario.base, cfg.scenario.increment, cfg.scenario.class_order)
    place = (lambda t: HostRows(t, device)) if resident == "host" else (lambda t: t.to(device))  # noqa: E731
    data = SplitData(place(ds.train_x), scenario.relabel(ds.train_y).to(device),
                     place(ds.test_x), scenario.relabel(ds.test_y).to(device))
    aug = make_augmenter(cfg, ds, backbone.input_spec())
    net = net.to(device)
    if cfg.train.channels_last:
        net = net.to(memory_format=torch.channels_last)
    embeddings = EmbeddingCache(aug, cfg.train.eval_batch_size, amp, device, cfg.data.embedding_cache)
    services = RunServices(cfg, net, None, aug, device, gen, amp, ckpt, events, data, log=log.stage,
                           embeddings=embeddings)
    parts = plan.build(services)
    memory = None
    if plan.memory:
        one = {p.kind: p for p in parts if p.kind in ("selection", "exemplar-optimizer", "compressor")}
        memory = Memory(Budget(cfg.memory.total, cfg.memory.per_class), one.get("selection"),
                        one.get("exemplar-optimizer"), one.get("compressor"))
    services.memory = memory
    learner = Learner(services, Components(parts), nme=bool(cfg.eval.nme))
    ckpt.net = net
    ckpt.method_state = learner.state_dict  # type: ignore[method-assign]

    names = scenario.names(ds.class_names, range(ds.num_classes))     # incremental id -> class name
    events.on_start(RunView(cfg, out, net, memory, aug, amp, data, names))
    evals: list[PhaseEval] = []
    phase_rows: list[dict] = []
    first, wall_before = 0, 0.0
    if phase_state is not None:
        with restoring(out / PHASE_FILE):
            net.add_classes(phase_state["num_classes"])
            net.load_state_dict(phase_state["net"])
            if memory is not None:
                memory.load_state(phase_state["memory"], device)
            learner.load_state_dict(phase_state["method"])
            evals = [PhaseEval(**e) for e in phase_state["evals"]]
            phase_rows = phase_state["rows"]
            set_rng_state(gen, phase_state["rng"])
            first, wall_before = phase_state["next_phase"], phase_state["wall_seconds"]

    if resuming:
        log(f"resumed {out} at {resumed_at(first, epoch_state['fit'] if epoch_state else None)}")
    else:
        log(f"cilearn {__version__}: {cfg.method} on {ds.name} ({len(ds.train_y)} train / {len(ds.test_y)} test images, "
            f"{ds.num_classes} classes, {'x'.join(map(str, ds.image_shape))}), backbone {cfg.model.backbone}, "
            f"{device} {meta['precision']}, seed {cfg.seed}")
        log(scenario.describe(ds.class_names))
        log(describe_training(cfg, plan, torch.bincount(ds.train_y, minlength=ds.num_classes).tolist()))
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
                + (f", compressor {cfg.memory.compressor} (eta {memory.compressor.options.eta})"
                   if memory.compressor is not None else "")
                + (f", optimizer {cfg.memory.optimizer}" if cfg.memory.optimizer != "none" else ""))
    log(f"{'phase':>5} {'classes':>7} {'acc':>6} {'task':>6} {'nme':>6} {'old':>6} {'new':>6} {'top5':>6} {'train s':>8} "
        f"{'img/s':>7}  new classes")

    protos = learner.prototypes() if first == len(scenario.phases) else None  # (resumed after the last phase)
    for phase in scenario.phases[first:]:
        ckpt.phase = phase.index
        phase_t0, embedded0 = time.perf_counter(), embeddings.computed
        x, y = learner.training_set(phase, data)
        learner.begin(phase, x, y)                       # the old model, the grown network, the components' start
        if epoch_state is not None:   # continue inside this phase: model, RNG, optimizer position
            with restoring(out / EPOCH_FILE):
                net.load_state_dict(epoch_state["net"])
                learner.load_state_dict(epoch_state["method"])
                set_rng_state(gen, epoch_state["rng"])
            ckpt.resume_fit, ckpt.losses = epoch_state["fit"], epoch_state.get("losses", {})
            epoch_state = None
        fr = learner.train()                             # train
        after = learner.after_training()                 # calibrate, extra stages
        fr = FitResult(fr.seconds + after.seconds, fr.images + after.images, {**fr.loss, **after.loss})
        learner.update_memory(data)                      # update memory
        ranks = sync_ranks(net, memory, gen, device) if world > 1 else None
        seen = data.test_y < phase.end
        logits, emb = services.predict(net, data.test_x[seen])   # (a frozen backbone: from the embedding cache)
        protos = learner.prototypes()                    # NME class means [seen, D] (None: no exemplars)
        ev = evaluate_phase(logits, emb, data.test_y[seen], [(p.start, p.end) for p in scenario.phases[:phase.index + 1]],
                            protos)
        evals.append(ev)
        row = {"phase": phase.index, "classes_seen": phase.seen, "acc": ev.acc, "acc_task": ev.acc_task, "acc_nme": ev.acc_nme,
               "acc_old": ev.acc_old, "acc_new": ev.acc_new, "acc_old_among_old": ev.acc_old_among_old,
               "acc_new_among_new": ev.acc_new_among_new, "top5": ev.top5, "train_seconds": fr.seconds,
               "finetune_seconds": learner.finetune_seconds, "train_images_per_s": fr.images_per_s, "loss": fr.loss,
               "exemplar_optimizer": dict(memory.optimizer.stats) if memory is not None and memory.optimizer else {},
               "params": sum(p.numel() for p in net.parameters()), **learner.diagnostics(),
               **memory_row(memory),
               "per_class_acc": ev.class_acc}
        if ranks is not None:
            row["ranks"] = ranks
        # the phase's wall seconds up to its evaluation (training, calibration, memory, evaluation) and the
        # images the embedding cache embedded in it (a frozen backbone: each image once per run)
        row["phase_seconds"], row["embedded_images"] = time.perf_counter() - phase_t0, embeddings.computed - embedded0
        row["stage_losses"] = dict(ckpt.losses)
        row["warnings"] = phase_warnings(ev.acc, logits.argmax(1), data.test_y[seen], phase_rows + [row])
        if phase.index == len(scenario.phases) - 1:   # the report's confusion matrix: true x predicted ids
            row["confusion"] = confusion_matrix(logits.argmax(1), data.test_y[seen], logits.shape[1])
        phase_rows.append(row)
        events.on_phase(row)
        f = lambda v: f"{v:6.2f}" if v is not None else f"{'-':>6}"  # noqa: E731
        others = "".join(f"  {k} {v:.2f}" for k, v in other_accuracies(row).items() if v is not None)
        log(f"{phase.index:>5} {phase.seen:>7} {f(ev.acc)} {f(ev.acc_task)} {f(ev.acc_nme)} {f(ev.acc_old)} "
            f"{f(ev.acc_new)} {f(ev.top5)} {fr.seconds:8.1f} {fr.images_per_s:7.0f}  "
            f"{short_list(names[phase.start:phase.end], 3)}{others}")
        for w in row["warnings"]:
            log(f"  warning: {w['message']}")
        learner.end()                                    # the components' phase end, after the evaluation
        embeddings.flush()                               # the phase's new embeddings to --data.embedding-cache
        ckpt.save_phase({"next_phase": phase.index + 1, "num_classes": net.num_classes, "net": net.state_dict(),
                         "memory": memory.state() if memory is not None else None, "method": learner.state_dict(),
                         "evals": [dataclasses.asdict(e) for e in evals], "rows": phase_rows,
                         "wall_seconds": wall_before + time.perf_counter() - wall0})
        if distributed.any_rank(ckpt.stop_requested) and phase.index + 1 < len(scenario.phases):
            raise ckpt.interrupted(f"phase {phase.index} (finished)")

    metrics = summarize(evals, phase_rows, memory, wall_before + time.perf_counter() - wall0,
                        cfg.scenario.class_order, names)
    metrics["threads"] = cfg.train.threads
    metrics["weights"], metrics["weights_sha256"] = cfg.model.weights, cfg.model.weights_sha256
    if world > 1:
        metrics["distributed"] = meta["distributed"]
    if writes:     # the final model (model_io), then metrics.json (the run is complete), then no resume state
        save_model(out, net, run_spec(cfg, ds, arch, [(p.start, p.end) for p in scenario.phases], amp, aug), protos)
        write_outputs(out, metrics, events)
        if not cfg.train.keep_checkpoint:
            remove_checkpoints(out)
    log(f"average incremental accuracy {metrics['avg_incremental_acc']:.2f}"
        + (f" (NME {metrics['avg_incremental_acc_nme']:.2f})" if metrics["avg_incremental_acc_nme"] is not None else "")
        + "".join(f" ({k[len('avg_incremental_acc_'):]} {v:.2f})" for k, v in metrics.items()
                  if k.startswith("avg_incremental_acc_") and k[-4:] not in ("_nme", "task"))
        + f", last {metrics['last_acc']:.2f}, forgetting {metrics['forgetting']:.2f}, "
        f"wall {metrics['wall_seconds']:.1f} s -> {out}")
    return Results(metrics, out, cfg)




def resumed_at(phase: int, fit: dict | None) -> str:
    """Where a resumed run continues: the phase, and inside it (``fit``: the epoch checkpoint's
    position, ``train.fit``) the stage by its name, the epoch and, mid-epoch, the step (1-based):
    ``phase 1, stage 'phase 1 balanced-ft', epoch 17, step 3``. The main stage is named after its
    phase (``stage 'phase 1' (main training)``)."""
    if fit is None:
        return f"phase {phase}"
    main = " (main training)" if fit["desc"] == f"phase {phase}" else ""
    return (f"phase {phase}, stage '{fit['desc']}'{main}, epoch {fit['epoch'] + 1}"
            + (f", step {fit['step'] + 1}" if fit["step"] else ""))


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




__all__ = ["run", "resume", "Results", "config_from_dict"]
