"""The recipes built for pre-trained backbones: a frozen backbone and a closed-form head. SimpleCIL and
RanPAC run on any backbone (a pre-trained one with ``--weights``, or one cilearn trains in phase 0)
and train nothing in the phases whose schedule has no epochs: their classifier comes from the
head's ``after_training`` (``cilearn.simplecil``, ``cilearn.ranpac``), the embeddings from the run's
embedding cache (``cilearn.embeddings``). docs/methods/simplecil-ranpac.md. APER adapts the
backbone in the first phase with an adapter (``cilearn.adapters``) beside a frozen copy of it; EASE
adds an adapter set per phase (``cilearn.ease``); their adapters but ``finetune`` need a vision
transformer (``--backbone timm:...``). docs/methods/aper-ease.md. L2P trains a prompt pool in a frozen
vision transformer (``cilearn.l2p``, ``cilearn.prompts``), CODA-Prompt attention-weighted prompt components
(``cilearn.coda_prompt``), DualPrompt a shared G-prompt and one E-prompt per task (``cilearn.dualprompt``).
docs/methods/prompts.md."""
from __future__ import annotations

from . import schedules
from .recipe import Recipe, register_recipe

# SimpleCIL: the backbone as given from phase 0 on (PILOT models/simplecil.py trains nothing), class
# means of its embeddings as a cosine classifier's rows
SIMPLECIL = register_recipe(Recipe(
    "simplecil", schedules.SIMPLECIL, "prototype", "ce", constraints=("freeze-backbone",),
    options={"freeze-backbone": {"after": -1}},
    summary="frozen backbone (as given), class means of its embeddings as a cosine classifier's rows; no training",
    paper="Zhou et al., *Revisiting Class-Incremental Learning with Pre-Trained Models: Generalizability and "
          "Adaptivity are All You Need*, IJCV 2024"))

# RanPAC: the first session trains the backbone (the official code adapts a ViT with a PETL method,
# RanPAC.py:225-236; here the backbone itself, or nothing with components.freeze-backbone.after -1),
# then freezes it; random projection + ridge regression from the accumulated statistics
RANPAC = register_recipe(Recipe(
    "ranpac", schedules.RANPAC, "ridge", "ce", constraints=("freeze-backbone",),
    summary="phase 0 trains the backbone, then frozen; random projection (M 10000) + ReLU, Gram matrix and class "
            "sums accumulated, ridge classifier (lambda chosen each phase)",
    paper="McDonnell et al., *RanPAC: Random Projections and Pre-trained Models for Continual Learning*, "
          "NeurIPS 2023"))

APER = ("Zhou et al., *Revisiting Class-Incremental Learning with Pre-Trained Models: Generalizability and "
        "Adaptivity are All You Need*, IJCV 2024")


def _aper(name: str, adapter: str, training, how: str, **over) -> Recipe:
    """APER with ``adapter``: phase 0 trains it (the pre-trained branch kept beside it, PILOT
    utils/inc_net.py:695-717), the backbone is frozen from phase 1 on, and every class's row is the mean
    of its [pre-trained, adapted] embeddings (models/aper_*.py ``replace_fc``)."""
    return register_recipe(Recipe(
        name, training, "prototype", "none", adapter=adapter, constraints=("freeze-backbone",),
        options={adapter: {"pretrained_branch": True}}, summary=(
            f"phase 0 {how} (then frozen); class means of [pre-trained, adapted] embeddings as a cosine classifier's "
            "rows"), paper=APER, **over))


APER_ADAPTER = _aper("aper-adapter", "adaptformer", schedules.APER_ADAPTER, "trains AdaptFormer adapters in a ViT")
APER_SSF = _aper("aper-ssf", "ssf", schedules.APER_SSF, "trains SSF scales and shifts in a ViT")
# VPT-Deep (components.vpt.deep false: VPT-Shallow); 30 prompt tokens on ImageNet-R (exps/aper_vpt_deep_inr.json)
APER_VPT = _aper("aper-vpt", "vpt", schedules.APER_VPT, "trains VPT prompts (deep) in a ViT",
                 image_folder_options={"vpt": {"tokens": 30}})
APER_FINETUNE = _aper("aper-finetune", "finetune", schedules.APER_FINETUNE, "fine-tunes a copy of the backbone")

# EASE: a new adapter set per phase trained on the phase's data (its proxy classifier), the old sets frozen;
# prototypes in every subspace, the old classes' synthesised in the new ones; no classification loss on the head
EASE = register_recipe(Recipe(
    "ease", schedules.EASE, "ease-prototype", "none", adapter="ease",
    summary="a new adapter set per phase in a frozen ViT (old sets frozen); prototypes in every set's subspace, the "
            "old classes' synthesised from similar new ones; subspace-weighted cosine classifier",
    paper="Zhou et al., *Expandable Subspace Ensemble for Pre-Trained Model-Based Class-Incremental Learning*, "
          "CVPR 2024"))

# L2P: a pool of prompts with keys in a frozen ViT, chosen per image by the frozen [CLS] feature and inserted after its
# class token; a linear head on the prompt tokens' mean; the old classes' logits masked in training (ce-local: without
# exemplars, the official train_mask); every phase trains the prompts, keys and head (cilearn.l2p)
L2P = register_recipe(Recipe(
    "l2p", schedules.L2P, "linear", "ce-local", adapter="l2p",
    summary="a frozen ViT with a pool of 10 prompts with keys, 5 chosen per image by the frozen [CLS] feature and "
            "inserted after its class token (pull constraint on the keys); a linear head on the prompt tokens' "
            "mean; old classes' logits masked in training",
    paper="Wang et al., *Learning to Prompt for Continual Learning*, CVPR 2022"))

# CODA-Prompt: a pool of prompt components with keys and attention vectors in the first 5 blocks of a frozen ViT, one
# slice per phase (Gram-Schmidt initialised, the earlier ones frozen), weighted by cos(q * A, K) of the frozen [CLS]
# feature and summed into prefix keys and values; a linear head on the [CLS] output; old classes' logits masked in
# training (cilearn.coda_prompt)
CODA_PROMPT = register_recipe(Recipe(
    "coda-prompt", schedules.CODA_PROMPT, "linear", "ce-local", adapter="coda-prompt",
    summary="a frozen ViT with 100 prompt components (a slice per phase, Gram-Schmidt initialised, earlier ones "
            "frozen) weighted by attention to the frozen [CLS] feature and summed into prefix keys and values in "
            "blocks 0-4; a linear head on the [CLS] output; old classes' logits masked in training",
    paper="Smith et al., *CODA-Prompt: COntinual Decomposed Attention-based Prompting for Rehearsal-Free Continual "
          "Learning*, CVPR 2023"))

# DualPrompt: in a frozen ViT a G-prompt shared by all tasks (prefix tuning, blocks 0-1) and a pool of E-prompts with
# keys (blocks 2-4); training in phase t takes E-prompt t and pulls its key to the frozen [CLS] features, evaluation
# takes the E-prompt whose key is nearest; a linear head on the prompted [CLS] feature; the old classes' logits masked
# in training (ce-local, as L2P); E-prompts of length 20 on ImageNet-R (configs/imr_dualprompt.py:91)
DUALPROMPT = register_recipe(Recipe(
    "dualprompt", schedules.DUALPROMPT, "linear", "ce-local", adapter="dualprompt",
    image_folder_options={"dualprompt": {"length": 20}},
    summary="a frozen ViT with a shared G-prompt (blocks 0-1) and one E-prompt per task with a key (blocks 2-4), both "
            "by prefix tuning; training takes the phase's E-prompt, evaluation the one whose key is nearest the frozen "
            "[CLS] feature (pull constraint on the keys); a linear head on the [CLS] feature; old classes' logits "
            "masked in training",
    paper="Wang et al., *DualPrompt: Complementary Prompting for Rehearsal-Free Continual Learning*, ECCV 2022"))
