"""``cilearn run | list``. Flags override the config file; any config key can also be set with a
dotted flag, e.g. ``--train.momentum 0.9`` or ``--memory.selection random``.
Errors the user can fix are printed as one line and exit with code 2."""
from __future__ import annotations

import argparse
import sys
from typing import Any

from .checkpoint import Interrupted
from .errors import CilearnError, ConfigError

# flag -> dotted config key
FLAGS: dict[str, tuple[str, type, str]] = {
    "method": ("method", str, "method (see `cilearn list`)"),
    "dataset": ("data.dataset", str, "data set (see `cilearn list`)"),
    "data-dir": ("data.data_dir", str, "directory holding the data set files"),
    "image-size": ("data.image_size", int, "image folders: resize decoded images to this many px"),
    "train-list": ("data.train_list", str, "image folders: list file of 'relative/path label' lines"),
    "test-list": ("data.test_list", str, "image folders: list file for the test split"),
    "train-per-class": ("data.train_per_class", int, "keep a seeded subset of N training images per class"),
    "augment": ("data.augment", str, "training augmentation: none, flip, crop-flip, rrc-flip"),
    "base": ("scenario.base", int, "classes in the first phase (0: same as --increment)"),
    "increment": ("scenario.increment", int, "classes per later phase"),
    "memory": ("memory.total", int, "exemplar budget: fixed total shared by all seen classes"),
    "memory-per-class": ("memory.per_class", int, "exemplar budget: fixed number per class"),
    "selection": ("memory.selection", str, "exemplar selection: herding, random, closest"),
    "loss": ("loss.cls", str, "classification loss: ce, ce-local, bce, bsce, nca (default: the method's)"),
    "distill": ("loss.distill", lambda v: [t for t in v.split(",") if t], "extra distillation terms for any method: attention, dual-teacher"),
    "save-attention": ("report.save_attention", int, "after each phase, PNG of N test images' Grad-CAMs"),
    "replay": ("replay.source", str, "replay source for any method: dfgr (data-free generative replay), none"),
    "save-samples": ("report.save_samples", int, "DF-GR: PNG of N generated samples per old class, each phase"),
    "epochs": ("train.epochs", int, "epochs per phase"),
    "base-epochs": ("train.base_epochs", int, "epochs of the first phase"),
    "lr": ("train.lr", float, "learning rate"),
    "base-lr": ("train.base_lr", float, "learning rate of the first phase"),
    "batch-size": ("train.batch_size", int, "training batch size"),
    "backbone": ("model.backbone", str, "backbone (see `cilearn list`; auto picks by image size)"),
    "seed": ("seed", int, "seed of class order, initialisation, data order and augmentation"),
    "device": ("train.device", str, "auto, cpu, cuda or cuda:N"),
    "precision": ("train.precision", str, "auto, bf16 or fp32"),
    "out": ("out", str, "output directory (default runs/<method>-<dataset>-<time>)"),
    "checkpoint-every": ("train.checkpoint_every", int, "epochs between checkpoints inside a phase (0: phase ends only)"),
}
RESUME_OK = {"device", "resume", "no_progress", "quiet", "config", "overwrite"}


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


def build_config(args: argparse.Namespace, extra: list[str]):
    from .config import load_yaml, merge, set_dotted
    from .runner import config_from_dict

    d: dict = load_yaml(args.config) if args.config else {}
    over: dict = {}
    for flag, (key, _, _) in FLAGS.items():
        v = getattr(args, flag.replace("-", "_"))
        if v is not None:
            set_dotted(over, key, v)
    if args.no_progress:
        set_dotted(over, "train.progress", False)
    if args.save_tsne:
        set_dotted(over, "report.save_tsne", True)
    if args.balanced_finetune or args.no_balanced_finetune:
        set_dotted(over, "train.balanced_finetune", bool(args.balanced_finetune))
    i = 0
    while i < len(extra):   # dotted overrides: --section.key value | --section.key=value
        tok = extra[i]
        if not tok.startswith("--") or "." not in tok:
            raise ConfigError(f"unrecognized argument '{tok}' (see `cilearn run --help`)")
        if "=" in tok:
            key, text = tok[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(extra):
                raise ConfigError(f"{tok} expects a value")
            key, text = tok[2:], extra[i + 1]
            i += 2
        set_dotted(over, key, parse_value(text))
    return config_from_dict(merge(d, over))


def cmd_list() -> None:
    from .data.datasets import DATASETS
    from .methods import METHODS
    from .models.backbones import BACKBONES

    print("methods:   " + ", ".join(METHODS.names()))
    print("data sets: " + ", ".join(DATASETS.names()))
    print("backbones: " + ", ".join(BACKBONES.names()))
    from .memory.mnemonics import MEMORY_OPTIMIZERS
    print("memory optimizers: " + ", ".join(MEMORY_OPTIMIZERS.names()))


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="cilearn", description="Class-incremental learning in PyTorch.", allow_abbrev=False)
    sub = parser.add_subparsers(dest="command")
    pr = sub.add_parser("run", help="run a class-incremental experiment", allow_abbrev=False)
    pr.error = parser.error  # type: ignore[method-assign]
    pr.add_argument("--config", help="YAML config file (flags override it)")
    for flag, (key, tp, help_) in FLAGS.items():
        pr.add_argument(f"--{flag}", type=tp, help=f"{help_} [{key}]")
    ft = pr.add_mutually_exclusive_group()
    ft.add_argument("--balanced-finetune", action="store_true",
                    help="class-balanced fine-tuning of the head after each phase > 0 [train.balanced_finetune]")
    ft.add_argument("--no-balanced-finetune", action="store_true",
                    help="no class-balanced fine-tuning (default of lucir-bsce, icarl, ...) [train.balanced_finetune]")
    pr.add_argument("--save-tsne", action="store_true",
                    help="after each phase, a t-SNE PNG of test embeddings with the exemplars [report.save_tsne]")
    pr.add_argument("--resume", metavar="DIR", help="continue the interrupted run in DIR from its last checkpoint")
    pr.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    pr.add_argument("--no-progress", action="store_true", help="no progress bars")
    pr.add_argument("--quiet", action="store_true", help="print nothing (log.txt is still written)")
    sub.add_parser("list", help="list methods, data sets and backbones")
    try:
        args, extra = parser.parse_known_args(argv)
        if args.command == "list":
            cmd_list()
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
                                  f"drop {bad[0]} (only --device, --no-progress and --quiet go with --resume)")
            from .runner import resume
            resume(args.resume, echo=not args.quiet, device=args.device, progress=False if args.no_progress else None)
            return 0
        cfg = build_config(args, extra)
        from .runner import run
        run(cfg, echo=not args.quiet, overwrite=args.overwrite)
        return 0
    except Interrupted as e:
        print(f"cilearn: {e}", file=sys.stderr)
        return 128 + int(e.signum)
    except CilearnError as e:
        print(f"cilearn: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cilearn: interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
