"""``cilearn run | compare | report | list | eval | predict``. Flags override the config file; any
config key can also be set with a dotted flag, e.g. ``--train.momentum 0.9`` or
``--memory.selection random``. Errors the user can fix are printed as one line and exit with code 2."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from . import distributed
from .api import compare_methods, evaluate, predict_files, resume, run, run_seeds
from .checkpoint import Interrupted
from .config import load_yaml, merge, set_dotted
from .data.datasets import DATASETS
from .errors import CilearnError, ConfigError
from .components import KINDS, REGISTRIES
from .methods import METHODS
from .config import RunConfig
from .listing import options_listing, run_options
from .methods.recipe import FLAG, plan
from .methods.table import recipes_table, summaries_table, training_table
from .references import load_references, references_markdown, references_text
from .report import compare_dirs, html_report
from .results import default_seeds, parse_seeds
from .prepare import config_from_dict
from .progress import MODES as PROGRESS_MODES

# flag -> dotted config key
FLAGS: dict[str, tuple[str, type, str]] = {
    "method": ("method", str, "method (see `cilearn list`)"),
    "dataset": ("data.dataset", str, "data set (see `cilearn list`)"),
    "data-dir": ("data.data_dir", str, "directory holding the data set files"),
    "image-size": ("data.image_size", int, "image folders: resize decoded images to this many px"),
    "input-size": ("data.input_size", int, "the network input's side in px: smaller than the stored images, training "
                   "crops from them and evaluation takes their centre crop; larger, they are resized to it; a pre-trained "
                   "backbone's input size, else the stored images'"),
    "train-list": ("data.train_list", str, "image folders: list file of 'relative/path label' lines"),
    "test-list": ("data.test_list", str, "image folders: list file for the test split"),
    "train-per-class": ("data.train_per_class", int, "keep a seeded subset of N training images per class"),
    "test-per-class": ("data.test_per_class", int, "evaluate on a seeded subset of N test images per class"),
    "augment": ("data.augment", str, "training augmentation: none, flip, crop-flip, rrc-flip"),
    "base": ("scenario.base", int, "classes in the first phase (0: same as --increment)"),
    "increment": ("scenario.increment", int, "classes per later phase"),
    "memory": ("memory.total", int, "exemplar budget: fixed total shared by all seen classes"),
    "memory-per-class": ("memory.per_class", int, "exemplar budget: fixed number per class"),
    "selection": ("memory.selection", str, "exemplar selection: herding, random, closest"),
    "compressor": ("memory.compressor", str, "exemplar compressor: none, full, cam-threshold, cim (budget in image units)"),
    "save-exemplars": ("report.save_exemplars", int, "after each phase, PNG of N exemplars, original vs stored, and exemplars per class"),
    "loss": ("loss.cls", str, "classification loss: ce, ce-local, bce, bsce, nca, none (default: the method's)"),
    "distill": ("loss.distill", lambda v: [t for t in v.split(",") if t], "extra distillation terms for any method: attention, dual-teacher"),
    "calibration": ("calibration", lambda v: [t for t in v.split(",") if t and t != "none"],
                    "calibration after each phase > 0 (any method with exemplars): weight-align, balanced-finetune, bic, none"),
    "constraints": ("constraints", lambda v: [t for t in v.split(",") if t and t != "none"],
                    "what the main stage may change: freeze-old-rows, weight-clip, freeze-backbone, none"),
    "head-init": ("head_init", lambda v: [t for t in v.split(",") if t and t != "none"],
                  "how new head rows start: imprint, none"),
    "stages": ("stages", lambda v: [t for t in v.split(",") if t and t != "none"],
               "extra stages after the main one: feature-compression, none"),
    "save-attention": ("report.save_attention", int, "after each phase, PNG of N test images' Grad-CAMs"),
    "replay": ("replay.source", str, "replay source for any method: dfgr (data-free generative replay), none"),
    "save-samples": ("report.save_samples", int, "DF-GR: PNG of N generated samples per old class, each phase"),
    "epochs": ("train.epochs", int, "epochs per phase"),
    "base-epochs": ("train.base_epochs", int, "epochs of the first phase"),
    "lr": ("train.lr", float, "learning rate"),
    "base-lr": ("train.base_lr", float, "learning rate of the first phase"),
    "batch-size": ("train.batch_size", int, "training batch size"),
    "optim": ("train.optim", str, "optimizer: sgd (momentum --train.momentum), adam, adamw (default: the method's)"),
    "adapter": ("model.adapter", str, "parameter-efficient modules added to a ViT backbone, what trains with the head: "
                "adaptformer, ssf, vpt, finetune, ease, none (docs/methods/aper-ease.md)"),
    "backbone": ("model.backbone", str, "backbone (see `cilearn list`; auto picks by image size; timm:NAME for any "
                 "timm model, docs/methods/pretrained.md)"),
    "weights": ("model.weights", str, "the backbone's initial weights: FILE (.safetensors, a torch state dict, a cilearn "
                "run's model.safetensors), random, or pretrained (the backbone's own, from the local cache); cilearn's "
                "backbones: random, timm: pretrained"),
    "normalize": ("data.normalize", str, "input mean/std: dataset, imagenet, model (the backbone's pretrained "
                  "config), none ([0, 1] inputs) or MEAN1,MEAN2,MEAN3/STD1,STD2,STD3; cilearn's backbones: dataset, "
                  "timm: model"),
    "seed": ("seed", int, "seed of class order, initialisation, data order and augmentation"),
    "device": ("train.device", str, "auto, cpu, cuda or cuda:N"),
    "precision": ("train.precision", str, "auto, bf16 or fp32"),
    "threads": ("train.threads", lambda v: v if v == "auto" else int(v),
                "CPU threads: a number, or auto (the CPUs this process may use; cilearn.threads)"),
    "out": ("out", str, "output directory (default runs/<method>-<dataset>-<time>)"),
    "checkpoint-every": ("train.checkpoint_every", int, "epochs between checkpoints inside a phase (0: phase ends only)"),
}
# sections whose null defaults mean "the recipe's" (else "none" / the data set's / unset)
RECIPE_SECTIONS = ("train", "model", "loss", "replay", "calibration", "constraints", "head_init", "stages")
# options whose null default means "the backbone's" (its weights and the input its weights expect)
BACKBONE_DEFAULTS = ("model.weights", "data.normalize", "data.input_size")
RESUME_OK = {"device", "resume", "progress", "no_progress", "quiet", "config", "overwrite"}


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse prints usage + message; we print one line
        raise ConfigError(message)


def parse_value(text: str) -> Any:
    """A dotted override's value, read as YAML (``0.01``, ``true``, ``[6, 4]``); a comma-separated
    ``6,4,2`` (which YAML reads as one string) becomes a list, for list options such as
    ``--scenario.class-order``."""
    import yaml
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str) and "," in value and not value.startswith(("{", "[")):
        return [parse_value(part.strip()) for part in value.split(",") if part.strip()]
    if isinstance(value, str):
        try:
            return float(value)   # YAML 1.1 reads 1e-3 (no dot) as a string
        except ValueError:
            pass
    return value


def split_extra(extra: list[str], command: str = "run") -> tuple[list[tuple[str, str]], list[str]]:
    """Arguments argparse did not know: dotted overrides (``--section.key value`` or
    ``--section.key=value``) as (key, text) pairs, and the positional arguments. Any other
    ``--flag`` is an error."""
    overrides, positional = [], []
    i = 0
    while i < len(extra):
        tok = extra[i]
        if not tok.startswith("--"):
            positional.append(tok)
            i += 1
            continue
        if "." not in tok:
            raise ConfigError(f"unrecognized argument '{tok}' (see `cilearn {command} --help`)")
        if "=" in tok:
            key, text = tok[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(extra):
                raise ConfigError(f"{tok} expects a value")
            key, text = tok[2:], extra[i + 1]
            i += 2
        overrides.append((key, text))
    return overrides, positional


def build_config(args: argparse.Namespace, extra: list[str]):

    d: dict = load_yaml(args.config) if args.config else {}
    over: dict = {}
    for flag, (key, _, _) in FLAGS.items():
        v = getattr(args, flag.replace("-", "_"))
        if v is not None:
            set_dotted(over, key, v)
    if args.progress or args.no_progress:
        set_dotted(over, "train.progress", "never" if args.no_progress else args.progress)
    if args.save_tsne:
        set_dotted(over, "report.save_tsne", True)
    if args.tensorboard:
        set_dotted(over, "report.tensorboard", True)
    if args.compile:
        set_dotted(over, "train.compile", True)
    if args.keep_checkpoint:
        set_dotted(over, "train.keep_checkpoint", True)
    if args.plugin:
        set_dotted(over, "plugins", list(d.get("plugins", [])) + args.plugin)
    if args.balanced_finetune or args.no_balanced_finetune:
        set_dotted(over, "train.balanced_finetune", bool(args.balanced_finetune))
    overrides, positional = split_extra(extra, args.command)
    if positional:
        raise ConfigError(f"unrecognized argument '{positional[0]}' (see `cilearn {args.command} --help`)")
    for key, text in overrides:
        set_dotted(over, key, parse_value(text))
    return config_from_dict(merge(d, over))


def seeds_of(args: argparse.Namespace, cfg) -> list[int] | None:
    """``--seeds`` / ``--num-seeds`` as a list of seeds, or None for a single run."""

    if args.seeds is not None and args.num_seeds is not None:
        raise ConfigError("--seeds and --num-seeds: give one of them")
    if args.seeds is not None:
        if args.seed is not None:
            raise ConfigError("--seed and --seeds: give one of them (--seeds lists every seed)")
        return parse_seeds(args.seeds)
    if args.num_seeds is not None:
        return default_seeds(cfg.seed, args.num_seeds)
    return None


def cmd_list(args: argparse.Namespace) -> None:
    if args.options:
        print(options_listing(plan(RunConfig(method=args.method), None, strict=False) if args.method else None))
        return
    if args.method:
        raise ConfigError("cilearn list: --method goes with --options")
    if args.recipes:
        print(recipes_table(markdown=args.markdown))
        return
    if args.summaries:
        print(summaries_table(markdown=args.markdown))
        return
    if args.training:
        print(training_table(markdown=args.markdown))
        return
    if args.configs is not None:
        refs = load_references(args.configs or None)
        print(references_markdown(refs) if args.markdown else references_text(refs))
        return

    print("methods:   " + ", ".join(METHODS.names()))
    print("data sets: " + ", ".join(DATASETS.names()))
    for kind in KINDS:                    # every kind of component, with the option that chooses it
        print(f"{kind} ({FLAG[kind]}): " + ", ".join(REGISTRIES[kind].names()))


def add_run_flags(p: argparse.ArgumentParser, out_help: str | None = None) -> None:
    """The flags of ``cilearn run`` (shared by ``cilearn compare --methods``)."""
    p.add_argument("--config", help="YAML config file (flags override it)")
    defaults = {a[2:]: d for a, d, _ in run_options()}      # --section.key -> the default as shown
    for flag, (key, tp, help_) in FLAGS.items():
        shown = defaults.get(key.replace("_", "-"), "null")
        default = ("the backbone's" if shown == "null" and key in BACKBONE_DEFAULTS else
                   "the recipe's" if shown == "null" and key.split(".")[0] in RECIPE_SECTIONS else shown)
        p.add_argument(f"--{flag}", type=tp, help=(out_help if flag == "out" and out_help else
                                                   f"{help_} [{key}; default: {default}]"))
    ft = p.add_mutually_exclusive_group()
    ft.add_argument("--balanced-finetune", action="store_true",
                    help="class-balanced fine-tuning of the head after each phase > 0 [train.balanced_finetune]")
    ft.add_argument("--no-balanced-finetune", action="store_true",
                    help="no class-balanced fine-tuning (default of lucir-bsce, icarl, ...) [train.balanced_finetune]")
    p.add_argument("--plugin", action="append", metavar="FILE.py",
                   help="import a Python file whose registered components (e.g. a loss term) the run can name; "
                        "repeatable [plugins]")
    p.add_argument("--save-tsne", action="store_true",
                   help="after each phase, a t-SNE PNG of test embeddings with the exemplars [report.save_tsne]")
    p.add_argument("--tensorboard", action="store_true",
                   help="TensorBoard scalars per epoch and phase in OUT/tensorboard (needs the tensorboard package) "
                        "[report.tensorboard]")
    p.add_argument("--keep-checkpoint", action="store_true",
                   help="a finished run keeps its resume checkpoint (checkpoint-phase.pt; deleted by default, "
                        "model.safetensors holds the final model) [train.keep_checkpoint]")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the backbone for the training steps (first step compiles) [train.compile]")
    p.add_argument("--seeds", metavar="S1,S2,...",
                   help="run once per seed (class order, init, data order) into OUT/seed-<s>/, then "
                        "OUT/summary.{json,md} with mean ± std of every metric")
    p.add_argument("--num-seeds", type=int, metavar="K",
                   help="as --seeds with the run's seed (default 1993) then 1, 2, ...: K seeds")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    bars = p.add_mutually_exclusive_group()
    bars.add_argument("--progress", choices=PROGRESS_MODES,
                      help="progress bars: auto (default: only when stderr is a terminal; otherwise one line per "
                           "finished training stage), always, never [train.progress]")
    bars.add_argument("--no-progress", action="store_true", help="no progress bars (--progress never)")
    p.add_argument("--quiet", action="store_true", help="print nothing (log.txt is still written)")


def cmd_compare(args: argparse.Namespace, extra: list[str]) -> None:

    overrides, dirs = split_extra(extra, "compare")
    labels = [x.strip() for x in args.labels.split(",")] if args.labels else None
    if args.methods is None:
        if not dirs:
            raise ConfigError("cilearn compare needs run directories (cilearn compare RUN_DIR...) or --methods a,b,c")
        given = [f"--{k.replace('_', '-')}" for k, v in vars(args).items()
                 if v not in (None, False) and k not in {"command", "out", "labels", "quiet", "allow_mixed"}]
        if given or overrides:
            raise ConfigError(f"{(given or ['--' + overrides[0][0]])[0]} is a run flag: it goes with --methods, "
                              "not with run directories")
        import time
        out = args.out or f"runs/compare-{time.strftime('%Y%m%d-%H%M%S')}"
        comp = compare_dirs(dirs, out, labels, allow_mixed=args.allow_mixed)
        for note in comp.notes:
            print(f"cilearn: warning: {note}", file=sys.stderr)
        if not args.quiet:
            print(f"{comp.markdown}\n\n-> {out}/compare.md, compare.csv, compare.png, compare.json")
        return
    if dirs:
        raise ConfigError(f"cilearn compare: give run directories or --methods, not both ('{dirs[0]}')")
    if args.method is not None:
        raise ConfigError("cilearn compare takes --methods a,b,c (not --method)")
    if labels is not None or args.allow_mixed:
        raise ConfigError(f"{'--labels' if labels is not None else '--allow-mixed'} goes with run directories; "
                          "with --methods every run has the same data and protocol")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise ConfigError("--methods expects a comma-separated list of methods, e.g. finetune,lwf,icarl")
    for m in methods:
        METHODS.get(m)                 # an unknown name fails before anything runs
    out, args.out = args.out, None
    cfgs = []
    for m in methods:
        args.method = m
        cfgs.append(build_config(args, extra))
    compare_methods(cfgs, out, seeds_of(args, cfgs[0]), echo=not args.quiet, overwrite=args.overwrite)


EVAL_DATA_FLAGS = ("dataset", "data-dir", "image-size", "train-list", "test-list", "test-per-class")


def cmd_eval(args: argparse.Namespace) -> None:
    data = {FLAGS[f][0].split(".", 1)[1]: getattr(args, f.replace("-", "_")) for f in EVAL_DATA_FLAGS}
    r = evaluate(args.run_dir, device=args.device, precision=args.precision, **data)
    if args.json:
        print(json.dumps(r, indent=2))
        return
    f = lambda k, name: f", {name} {r[k]:.2f}" if r[k] is not None else ""  # noqa: E731
    print(f"{args.run_dir} on {r['dataset']} ({r['images']} test images): acc {r['acc']:.2f}"
          + f("acc_task", "task-aware") + f("acc_nme", "NME") + f("top5", "top-5"))


def cmd_predict(args: argparse.Namespace) -> None:
    for path, (label, name) in zip(args.images, predict_files(args.run_dir, args.images, args.device, args.nme)):
        print(f"{path}\t{label}\t{name}")


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="cilearn", description="Class-incremental learning in PyTorch.", allow_abbrev=False)
    sub = parser.add_subparsers(dest="command")
    pr = sub.add_parser("run", help="run a class-incremental experiment", allow_abbrev=False,
                        epilog="Every option, the dotted ones (--train.*, --data.*, --components.NAME.OPTION, ...) "
                               "included, with its default and a line of help: cilearn list --options "
                               "[--method M]. Defaults shown as 'the recipe's' come from --method's recipe and the "
                               "data set (the run's banner prints them; config.yaml records them).")
    add_run_flags(pr)
    pr.add_argument("--resume", metavar="DIR", help="continue the interrupted run in DIR from its last checkpoint")
    pc = sub.add_parser("compare", allow_abbrev=False,
                        usage="cilearn compare RUN_DIR... [--labels a,b] [--allow-mixed] [--out DIR] | "
                              "cilearn compare --methods a,b,c [run flags]",
                        help="table (markdown, CSV) and overlaid accuracy curves of runs or methods")
    pc.add_argument("--methods", help="run each of these methods with the run flags, then compare them")
    pc.add_argument("--labels", help="with run directories: one row label per row (default: the method)")
    pc.add_argument("--allow-mixed", action="store_true",
                    help="with run directories: compare runs on different data sets (refused otherwise)")
    add_run_flags(pc, out_help="where compare.md, compare.csv, compare.png (and with --methods the runs, "
                               "OUT/<method>/) go; default runs/compare-...")
    pp = sub.add_parser("report", allow_abbrev=False, help="a self-contained HTML report of runs")
    pp.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                    help="run directories, seed directories (--seeds) or comparison directories (cilearn compare)")
    pp.add_argument("--html", metavar="OUT.html", help="output file (default: report.html in the directory; with "
                                                     "several, in their deepest common parent directory)")
    pl = sub.add_parser("list", allow_abbrev=False, help="list methods, data sets and backbones, or the reference configs")
    pl.add_argument("--configs", nargs="?", const="", metavar="DIR",
                    help="the shipped reference configs (configs/, or DIR) with the paper's number and protocol")
    pl.add_argument("--recipes", action="store_true",
                    help="each recipe's component choices (head, losses, exemplars, calibration)")
    pl.add_argument("--summaries", action="store_true", help="what each recipe is, with its paper")
    pl.add_argument("--training", action="store_true",
                    help="what each recipe trains with on each data set unless told otherwise (epochs, lr, "
                         "schedule, weight decay, batch), and the source of the values")
    pl.add_argument("--markdown", action="store_true", help="with --configs, --recipes, --summaries or --training: a markdown table")
    pl.add_argument("--options", action="store_true",
                    help="every option a run takes (the run's own and each component's), with its default and help")
    pl.add_argument("--method", help="with --options: the component options of this recipe's run, with its defaults")
    pe = sub.add_parser("eval", allow_abbrev=False, help="evaluate a finished run's model on a data set's test split")
    pe.add_argument("run_dir", metavar="RUN_DIR", help="a finished run (its model.safetensors and model.json)")
    for flag in EVAL_DATA_FLAGS:
        key, tp, help_ = FLAGS[flag]
        pe.add_argument(f"--{flag}", type=tp, help=f"{help_} (default: the run's) [{key}]")
    pe.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    pe.add_argument("--precision", help="fp32 or bf16 (default: the run's)")
    pe.add_argument("--json", action="store_true", help="print every accuracy (per task, per class) as JSON")
    pd = sub.add_parser("predict", allow_abbrev=False, help="classify image files with a finished run's model")
    pd.add_argument("run_dir", metavar="RUN_DIR", help="a finished run")
    pd.add_argument("images", nargs="+", metavar="IMAGE", help="image files (decoded as image folders are)")
    pd.add_argument("--nme", action="store_true", help="nearest class mean instead of the head (methods with exemplars)")
    pd.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    for p in (pr, pc, pp, pl, pe, pd):
        p.error = parser.error  # type: ignore[method-assign]
    try:
        args, extra = parser.parse_known_args(argv)
        if args.command in ("list", "report", "eval", "predict") and extra:
            raise ConfigError(f"unrecognized argument '{extra[0]}' (see `cilearn {args.command} --help`)")
        if args.command == "list":
            cmd_list(args)
            return 0
        if args.command == "report":
            path = html_report(args.run_dirs, args.html)
            print(f"report -> {path}")
            return 0
        if args.command == "eval":
            cmd_eval(args)
            return 0
        if args.command == "predict":
            cmd_predict(args)
            return 0
        if args.command == "compare":
            if distributed.launched():
                raise ConfigError("cilearn compare does not run under torchrun; launch one `cilearn run` per method")
            cmd_compare(args, extra)
            return 0
        if args.command != "run":
            parser.print_help()
            return 2 if args.command is None and argv else 0
        if args.resume:
            given = [k for k, v in vars(args).items() if v not in (None, False) and k not in RESUME_OK | {"command"}]
            if given or extra or args.config or args.overwrite:
                bad = (["--" + k.replace("_", "-") for k in given] + extra[:1]
                       + (["--config"] if args.config else []) + (["--overwrite"] if args.overwrite else []))
                raise ConfigError(f"--resume takes the configuration from {args.resume}/config.yaml; "
                                  f"drop {bad[0]} (only --device, --progress, --no-progress and --quiet go with --resume)")
            resume(args.resume, echo=not args.quiet, device=args.device,
                   progress="never" if args.no_progress else args.progress)
            return 0
        cfg = build_config(args, extra)
        seeds = seeds_of(args, cfg)
        if seeds is not None:
            if distributed.launched():
                raise ConfigError(f"--{'seeds' if args.seeds is not None else 'num-seeds'} does not run under "
                                  "torchrun; launch one `cilearn run --seed S` per seed")
            run_seeds(cfg, seeds, echo=not args.quiet, overwrite=args.overwrite)
            return 0
        run(cfg, echo=not args.quiet, overwrite=args.overwrite)
        return 0
    except Interrupted as e:
        if _reports():
            print(f"cilearn: {e}", file=sys.stderr)
        return 128 + int(e.signum)
    except CilearnError as e:
        if _reports():
            print(f"cilearn: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:              # `cilearn list ... | head`: the reader left, nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        if _reports():
            print("cilearn: interrupted", file=sys.stderr)
        return 130
    finally:
        distributed.shutdown()


def _reports() -> bool:
    """Under torchrun only rank 0 prints errors: every user-facing error is raised on all ranks
    (``cilearn.distributed.on_main`` / ``main_first``), so the other ranks stay quiet."""
    return distributed.is_main()


def entry() -> None:
    """The console script (and ``python -m cilearn``): ``main``'s exit code, ending the process
    through ``distributed.exit_process`` (under torchrun: without finalizing the interpreter)."""
    distributed.exit_process(main())


if __name__ == "__main__":
    entry()
