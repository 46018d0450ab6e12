"""LUCIR: Learning a Unified Classifier Incrementally via Rebalancing (Hou et al., CVPR 2019), and
the Balanced Softmax CE recipes (Jodelet, Liu & Murata 2021) built on LUCIR and iCaRL.

LUCIR: cosine-normalised head with a learnable scale sigma (Sec. 3.1); new-class rows imprinted
from the current model's normalised class means before each phase (Sec. 3.2); less-forget
constraint ``lambda (1 - cos(f_old(x), f(x)))`` with ``lambda = lambda_base sqrt(|old| / |new|)``,
lambda_base 5 on CIFAR, 10 on image folders as the paper's ImageNet value (Sec. 3.2/4.1); margin
ranking of each old-class exemplar's ground-truth cosine against the K = 2 hardest new classes,
margin 0.5, weight 1 (Sec. 3.3); herding exemplars; class-balanced fine-tuning after each phase > 0
(the official 20 epochs at lr 0.01, x0.1 at 10: the component's defaults). The old classes' rows
stay fixed during the main training of a phase (``freeze-old-rows``: the official code does so
while the less-forget constraint is on; the fine-tuning trains all rows). The backbone's last ReLU
is removed (Sec. 3.2). Reports CNN and NME.

lucir-bsce: BSCE instead of CE and without LUCIR's classifier rebalancing, which BSCE replaces:
no class-balanced fine-tuning (the BSCE paper's claim), and, cilearn's choice from measurements, no
margin ranking (weight 0) and old rows not frozen: both push the new classes' scores down on the
old classes' exemplars on top of BSCE's prior, and together they over-correct (Fashion-MNIST
B0-Inc2, benchmarks/RESULTS.md: new-class accuracy 1% after phase 1, average incremental accuracy
53 against 74 without them and 75 for LUCIR with fine-tuning).
"""
from __future__ import annotations

from dataclasses import replace

from . import schedules
from .baselines import ICARL
from .recipe import Recipe, register_recipe

LUCIR = register_recipe(Recipe(
    "lucir", schedules.LUCIR, "cosine", "ce", terms=("less-forget", "margin-ranking"), exemplars=True,
    head_init=("imprint",), constraints=("freeze-old-rows",), calibration=("balanced-finetune",),
    options={"backbone": {"last_relu": False}},
    image_folder_options={"less-forget": {"weight": 10.0}},
    summary="cosine head (learnable sigma), imprinted new-class rows, less-forget `lambda (1 - cos(f_old, f))`, "
            "margin ranking (K=2, m=0.5) on exemplars, herding, class-balanced fine-tuning; CNN and NME",
    paper="Hou et al., *Learning a Unified Classifier Incrementally via Rebalancing*, CVPR 2019"))

LUCIR_BSCE = register_recipe(replace(
    LUCIR, name="lucir-bsce", classification="bsce", calibration=(), constraints=(),
    options={**LUCIR.options, "margin-ranking": {"weight": 0.0}},
    summary="`lucir` with Balanced Softmax CE, no class-balanced fine-tuning, no margin ranking and old rows "
            "trained ([why](docs/methods/calibration.md))",
    paper="Jodelet et al. 2021"))

# iCaRL (CE + KD form) with Balanced Softmax CE: CE(z + log n, y), n the phase's per-class counts
ICARL_BSCE = register_recipe(replace(
    ICARL, name="icarl-bsce", classification="bsce", summary="`icarl` with Balanced Softmax CE instead of CE",
    paper="Jodelet, Liu & Murata, *Balanced Softmax Cross-Entropy for Incremental Learning*, 2021"))
