"""The baselines as recipes: each is a choice of components, no code of its own."""
from __future__ import annotations

from dataclasses import replace

from . import schedules
from .recipe import Recipe, register_recipe

FINETUNE = register_recipe(Recipe(
    "finetune", schedules.FINETUNE, "linear", "ce", summary="CE on the current phase only (lower bound)"))

# all data of the classes seen so far in every phase: the upper bound (finetune's schedule)
JOINT = register_recipe(replace(
    FINETUNE, name="joint", replay="all-data", summary="CE on all data of the seen classes (upper bound)"))

REPLAY = register_recipe(Recipe(
    "replay", schedules.REPLAY, "linear", "ce", exemplars=True, summary="finetune + exemplars (herding); CNN and NME"))

# Class-incremental LwF (Li & Hoiem 2016): one head over all seen classes, no exemplars, L_new +
# lambda KD(T = 2) on the old-class logits, lambda = 1 (Sec. 3), with L_new the CE over the new
# classes' logits only (ce-local: the paper's new-task loss; PyCIL and FACIL do the same). --loss ce
# (softmax over all seen classes) pushes every old logit down on the new images: on Fashion-MNIST
# B0-Inc2 it sends every old-class test image to a new class (benchmarks/RESULTS.md).
LWF = register_recipe(Recipe(
    "lwf", schedules.LWF, "linear", "ce-local", terms=("kd",),
    summary="CE over the new classes' logits (`ce-local`, LwF's new-task loss) + KD(T=2) on the old logits, "
            "one head over all seen classes, no exemplars",
    paper="Li & Hoiem, *Learning without Forgetting*, ECCV 2016"))

# iCaRL (Rebuffi et al. 2017): herding exemplars, CE + KD(T = 2) on data + exemplars as PyCIL and
# METHODS.md's reference numbers, NME and CNN; icarl-bce is the paper's own sigmoid form (Alg. 3)
ICARL = register_recipe(Recipe(
    "icarl", schedules.ICARL, "linear", "ce", terms=("kd",), exemplars=True,
    summary="herding exemplars, CE + KD(T=2) on data + exemplars, NME and CNN",
    paper="Rebuffi et al., *iCaRL*, CVPR 2017"))

# one sigmoid BCE over all seen classes, its targets one-hot for the new classes and the old
# model's sigmoids for the old ones (Alg. 3); with --replay dfgr the samples' KD is the same BCE
ICARL_BCE = register_recipe(replace(
    ICARL, name="icarl-bce", classification="bce", terms=(),
    options={"bce": {"old_targets": True}, "dfgr": {"distill": "bce"}},
    fixed={"classification": "is one sigmoid BCE doing classification and distillation (use --method icarl or lwf "
                             "for a softmax loss)"},
    summary="iCaRL's own loss (Alg. 3): sigmoid BCE, old-class targets = old model sigmoids",
    paper="Rebuffi et al., CVPR 2017"))

# LwF-MC, the class-incremental LwF of the iCaRL paper (Sec. 4): iCaRL's sigmoid BCE without
# exemplars; unlike lwf's softmax KD it anchors the old logits' values, not only their differences
LWF_MC = register_recipe(replace(
    ICARL_BCE, name="lwf-mc", exemplars=False,
    summary="LwF-MC: iCaRL's sigmoid BCE (old-class targets = old model sigmoids), no exemplars",
    paper="Rebuffi et al., CVPR 2017 (Sec. 4)"))

# LwF + DF-GR (Choi et al. 2021), exemplar-free: before each phase > 0 a generator is trained
# against the old model alone, its samples distilled from the old model in every step
DFGR = register_recipe(replace(
    LWF, name="dfgr", replay="dfgr",
    summary="`lwf` + data-free generative replay: a generator trained against the old model alone, its samples "
            "distilled from the old model in every step; exemplar-free",
    paper="Choi, El-Khamy & Lee, *Dual-Teacher Class-Incremental Learning With Data-Free Generative Replay*, "
          "CVPR-W 2021"))

DFGR_DTID = register_recipe(replace(
    DFGR, name="dfgr-dtid", terms=("kd", "dual-teacher"),
    summary="`dfgr` + dual-teacher distillation: the new-class logit block distilled from a new-class teacher "
            "trained first on the new images",
    paper="Choi et al. 2021"))
