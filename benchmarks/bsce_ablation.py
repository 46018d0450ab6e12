"""Balanced Softmax CE ablation: each base method with its own classification loss and with BSCE,
each with and without the class-balanced fine-tuning stage, over several seeds; prints a markdown
table (average incremental accuracy, last accuracy, forgetting, old/new accuracy of the last
phase, training seconds and the fine-tuning stage's share) for benchmarks/RESULTS.md.

    python benchmarks/bsce_ablation.py --bases icarl,lucir,podnet --seeds 1993,1,2 --out benchmarks/out/bsce

``--variants ft,bsce`` runs only some of them (own, ft, bsce, bsce-ft).

Default protocol (after ``--``, replaceable): Fashion-MNIST B0-Inc2, resnet32, 10 epochs, batch 64,
200 exemplars in total, all training images.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from compare_seeds import run_and_print, split_argv  # noqa: E402

PROTOCOL = ["--dataset", "fashion-mnist", "--backbone", "resnet32", "--increment", "2", "--epochs", "10",
            "--batch-size", "64", "--memory", "200"]

# base -> (method with its own loss, method with BSCE); the fine-tuning stage is toggled by flag
BASES = {"icarl": ("icarl", "icarl-bsce"), "lucir": ("lucir", "lucir-bsce"), "podnet": ("podnet", "podnet-bsce"),
         "wa": ("wa", None)}


KINDS = ("own", "ft", "bsce", "bsce-ft")   # own loss; + fine-tuning; BSCE; BSCE + fine-tuning


def variants(base: str, kinds: tuple[str, ...] = KINDS) -> list[tuple[str, str, list[str]]]:
    own, bsce = BASES[base]
    out = {"own": (f"{base}", own, ["--no-balanced-finetune"]), "ft": (f"{base} + FT", own, ["--balanced-finetune"])}
    if bsce is None:   # WA: BSCE instead of weight aligning
        out["bsce"] = (f"{base} + BSCE (no WA)", own, ["--loss", "bsce", "--train.weight-align", "false"])
    else:
        out["bsce"] = (f"{base} + BSCE", bsce, ["--no-balanced-finetune"])
        out["bsce-ft"] = (f"{base} + BSCE + FT", bsce, ["--balanced-finetune"])
    return [out[k] for k in kinds if k in out]


def main() -> int:
    own, passthrough = split_argv(sys.argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bases", default="icarl,lucir", help=f"comma list of {', '.join(BASES)}")
    p.add_argument("--variants", default=",".join(KINDS), help=f"comma list of {', '.join(KINDS)}")
    p.add_argument("--seeds", default="1993,1,2")
    p.add_argument("--out", required=True)
    args = p.parse_args(own)
    unknown = [b for b in args.bases.split(",") if b not in BASES]
    if unknown:
        p.error(f"--bases: unknown {', '.join(unknown)}; expected some of {', '.join(BASES)}")
    kinds = tuple(args.variants.split(","))
    if bad := [k for k in kinds if k not in KINDS]:
        p.error(f"--variants: unknown {', '.join(bad)}; expected some of {', '.join(KINDS)}")
    vs = [v for b in args.bases.split(",") for v in variants(b, kinds)]
    return run_and_print(vs, args.seeds.split(","), Path(args.out), passthrough or PROTOCOL)


if __name__ == "__main__":
    sys.exit(main())
