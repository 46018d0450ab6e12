"""The recipes' training defaults, from their papers where the papers say and otherwise from
their reference code (the file named in each ``source``). Every value is SGD with momentum 0.9
and gamma 0.1 at each milestone. ``docs/training-defaults.md`` has the same as a table.

PyCIL (G-U-N/PyCIL) sets its baselines' schedules as module globals of ``models/<method>.py``
and uses them on every data set (CIFAR-100 and ImageNet alike); its first phase is always 200
epochs at lr 0.1, x0.1 at epochs 60/120/170, weight decay 5e-4, and the later phases use weight
decay 2e-4. Where cilearn's image-folder schedule differs from the CIFAR one, the recipe's own
reference code has a separate ImageNet configuration.
"""
from __future__ import annotations

from dataclasses import replace

from ..config import Schedule, TrainingDefaults

_PYCIL_FIRST = {"base_epochs": 200, "base_milestones": (60, 120, 170), "base_weight_decay": 5e-4,
                "weight_decay": 2e-4}

FINETUNE = TrainingDefaults(Schedule(
    "PyCIL models/finetune.py (module globals)", epochs=80, milestones=(40, 70), **_PYCIL_FIRST))

REPLAY = TrainingDefaults(Schedule(
    "PyCIL models/replay.py (module globals)", epochs=70, milestones=(30, 50), **_PYCIL_FIRST))

LWF = TrainingDefaults(Schedule(
    "PyCIL models/lwf.py (module globals)", epochs=250, milestones=(60, 120, 180, 220),
    **{**_PYCIL_FIRST, "base_milestones": (60, 120, 160)}))

ICARL = TrainingDefaults(Schedule(
    "PyCIL models/icarl.py (module globals)", epochs=170, milestones=(80, 120), **_PYCIL_FIRST))

WA = TrainingDefaults(Schedule(
    "PyCIL models/wa.py (module globals)", epochs=170, milestones=(60, 100, 140), **_PYCIL_FIRST))

# BiC (Wu et al. 2019): PyCIL models/bic.py's module globals, which follow the paper: CIFAR-100 250
# epochs x0.1 at 100/150/200, weight decay 2e-4, batch 128 in every phase; ImageNet 100 epochs x0.1 at
# 30/60/80/90, weight decay 1e-4, batch 256.
BIC = TrainingDefaults(
    Schedule("PyCIL models/bic.py (CIFAR-100 globals)", epochs=250, milestones=(100, 150, 200), base_epochs=250,
             base_milestones=(100, 150, 200), weight_decay=2e-4, base_weight_decay=2e-4),
    Schedule("PyCIL models/bic.py (ImageNet globals)", epochs=100, milestones=(30, 60, 80, 90), base_epochs=100,
             base_milestones=(30, 60, 80, 90), weight_decay=1e-4, base_weight_decay=1e-4, batch_size=256))

# DER's official code (Rhyssiyan/DER-ClassIL.pytorch, exps/der_womask/*/configs/1.yaml): the first
# phase ("pretrain") 200 epochs x0.1 at 60/120/160; CIFAR-100 later phases 170 epochs x0.1 at
# 100/120 with 10 warm-up epochs, batch 128; ImageNet-100 200 epochs at 60/120/160 with 20 warm-up
# epochs, batch 256; weight decay 5e-4 throughout.
DER = TrainingDefaults(
    Schedule("DER official exps/der_womask/cifar100/b0/10steps/configs/1.yaml", epochs=170, milestones=(100, 120),
             base_epochs=200, base_milestones=(60, 120, 160), warmup_epochs=10),
    Schedule("DER official exps/der_womask/imagenet-100/b0_10s/configs/1.yaml", epochs=200,
             milestones=(60, 120, 160), base_epochs=200, base_milestones=(60, 120, 160), warmup_epochs=20,
             batch_size=256))

# FOSTER's official code is PyCIL's models/foster.py with exps/foster.json: cosine annealing in every
# stage, 200 epochs in the first phase, 170 boosting and 130 compression epochs later, weight decay
# 5e-4 throughout.
FOSTER = TrainingDefaults(Schedule(
    "FOSTER official (PyCIL) exps/foster.json + models/foster.py", epochs=170, base_epochs=200, schedule="cosine",
    compression_epochs=130))

# LUCIR's official code (hshustc/CVPR19_Incremental_Learning): CIFAR-100 160 epochs x0.1 at 80/120,
# weight decay 5e-4; ImageNet 90 epochs x0.1 at 30/60, weight decay 1e-4; batch 128, every phase.
LUCIR = TrainingDefaults(
    Schedule("LUCIR official cifar100-class-incremental/class_incremental_cosine_cifar100.py", epochs=160,
             milestones=(80, 120), base_epochs=160, base_milestones=(80, 120)),
    Schedule("LUCIR official imagenet-class-incremental/class_incremental_cosine_imagenet.py", epochs=90,
             milestones=(30, 60), base_epochs=90, base_milestones=(30, 60), weight_decay=1e-4,
             base_weight_decay=1e-4))

# PODNet's official configs (arthurdouillard/incremental_learning.pytorch, options/podnet/): cosine
# annealing; CIFAR-100 160 epochs, lr 0.1, batch 128; ImageNet-100 90 epochs, lr 0.05, batch 64;
# weight decay 5e-4.
PODNET = TrainingDefaults(
    Schedule("PODNet official options/podnet/podnet_cnn_cifar100.yaml", epochs=160, base_epochs=160,
             schedule="cosine"),
    Schedule("PODNet official options/podnet/podnet_cnn_imagenet100.yaml", epochs=90, base_epochs=90,
             schedule="cosine", lr=0.05, base_lr=0.05, batch_size=64))

# CIM's official configurations (xfflzl/CIM-CIL, cim-*.json) run FOSTER on Food-101 and ImageNet with
# batch 256; otherwise FOSTER's values.
FOSTER_CIM = TrainingDefaults(FOSTER.small, replace(FOSTER.small, batch_size=256,
                                                    source="CIM official cim-*.json (FOSTER's schedule, batch 256)"))

# Mnemonics' experiments are built on LUCIR's official code and protocol (configs/*mnemonics*.yaml):
# LUCIR's schedule for every Mnemonics recipe, icarl-mnemonics included.
MNEMONICS = TrainingDefaults(replace(LUCIR.small, source="LUCIR official code, which Mnemonics builds on"),
                             replace(LUCIR.imagenet, source="LUCIR official ImageNet code, which Mnemonics builds on"))

# LwM: the paper's schedules could not be read here (cilearn's choice): PyCIL's iCaRL schedule on
# CIFAR (configs/lwm-cifar100-inc10.yaml) and 90 epochs x0.1 at 30/60 on iILSVRC-small (ImageNet).
LWM = TrainingDefaults(
    replace(ICARL.small, source="PyCIL models/icarl.py (cilearn's choice: the LwM paper's could not be read)"),
    Schedule("cilearn's choice for iILSVRC-small (the LwM paper's could not be read)", epochs=90, base_epochs=90,
             milestones=(30, 60), base_milestones=(30, 60)))

# SimpleCIL (PILOT exps/simplecil.json:15-18, exps/simplecil_inr.json): "tuned_epoch": 0, no training in
# any phase; lr 0.01, weight decay 0.05 and batch 256 are the file's, used only where asked to train.
SIMPLECIL = TrainingDefaults(Schedule(
    "PILOT exps/simplecil.json:15-18 (tuned_epoch 0: no training)", epochs=0, base_epochs=0, schedule="cosine",
    lr=0.01, base_lr=0.01, weight_decay=0.05, base_weight_decay=0.05, batch_size=256))

# RanPAC's first session (RanPAC/RanPAC args/cifar224_publish.csv:9 and args/imagenetr_publish.csv:9, the
# PETL rows with M 10000: tuned_epoch 20, body_lr 0.01, batch_size 48, weight_decay 5e-4, min_lr 0;
# SGD momentum 0.9 with cosine annealing, RanPAC.py:231-232), no training after it (RanPAC.py:225).
# PILOT's ranpac.json:16-20 has the same values.
RANPAC = TrainingDefaults(Schedule(
    "RanPAC official args/cifar224_publish.csv:9 (ID 7) + RanPAC.py:225-232 (later phases: no training)", epochs=0,
    base_epochs=20, schedule="cosine", lr=0.01, base_lr=0.01, weight_decay=5e-4, base_weight_decay=5e-4,
    batch_size=48))

# APER (PILOT exps/aper_*.json): the first session adapts the backbone for "tuned_epoch" epochs with SGD
# (momentum 0.9) and cosine annealing to "min_lr" 0 (models/aper_adapter.py:107-111); the later phases train
# nothing (:114-116). CIFAR-224 files for the small schedule, the ImageNet-R (*_inr) files for image folders.
APER_ADAPTER = TrainingDefaults(
    Schedule("PILOT exps/aper_aperpter.json (later phases: no training)", epochs=0, base_epochs=20, schedule="cosine",
             lr=0.01, base_lr=0.01, weight_decay=5e-4, base_weight_decay=5e-4, batch_size=48),
    Schedule("PILOT exps/aper_aperpter_inr.json (later phases: no training)", epochs=0, base_epochs=10,
             schedule="cosine", lr=0.05, base_lr=0.05, weight_decay=0.005, base_weight_decay=0.005, batch_size=16))

# aper_ssf.json and aper_ssf_inr.json hold the same values
APER_SSF = TrainingDefaults(Schedule(
    "PILOT exps/aper_ssf.json, exps/aper_ssf_inr.json (later phases: no training)", epochs=0, base_epochs=20,
    schedule="cosine", lr=0.01, base_lr=0.01, weight_decay=5e-4, base_weight_decay=5e-4, batch_size=48))

# aper_vpt_deep.json and aper_vpt_shallow.json hold the same values; ImageNet-R: aper_vpt_deep_inr.json (30 prompt
# tokens: the recipe's image-folder option)
APER_VPT = TrainingDefaults(
    Schedule("PILOT exps/aper_vpt_deep.json, exps/aper_vpt_shallow.json (later phases: no training)", epochs=0,
             base_epochs=20, schedule="cosine", lr=0.01, base_lr=0.01, weight_decay=5e-4, base_weight_decay=5e-4,
             batch_size=48),
    Schedule("PILOT exps/aper_vpt_deep_inr.json (later phases: no training)", epochs=0, base_epochs=20,
             schedule="cosine", lr=0.05, base_lr=0.05, weight_decay=5e-4, base_weight_decay=5e-4, batch_size=24))

APER_FINETUNE = TrainingDefaults(
    Schedule("PILOT exps/aper_finetune.json (later phases: no training)", epochs=0, base_epochs=6, schedule="cosine",
             lr=0.01, base_lr=0.01, weight_decay=0.05, base_weight_decay=0.05, batch_size=128),
    Schedule("PILOT exps/aper_finetune_inr.json (later phases: no training)", epochs=0, base_epochs=5,
             schedule="cosine", lr=0.01, base_lr=0.01, weight_decay=0.005, base_weight_decay=0.005, batch_size=144))

# EASE (PILOT exps/ease.json, ease_inr.json): every phase trains its adapter set, "init_epochs" = "later_epochs"
# 20 at "init_lr" = "later_lr", SGD (momentum 0.9) with cosine annealing to "min_lr" 0 (models/ease.py:253-303)
EASE = TrainingDefaults(
    Schedule("PILOT exps/ease.json", epochs=20, base_epochs=20, schedule="cosine", lr=0.025, base_lr=0.025,
             weight_decay=5e-4, base_weight_decay=5e-4, batch_size=48),
    Schedule("PILOT exps/ease_inr.json", epochs=20, base_epochs=20, schedule="cosine", lr=0.05, base_lr=0.05,
             weight_decay=0.005, base_weight_decay=0.005, batch_size=16))

# L2P (l2p-pytorch configs/cifar100_l2p.py:4-5, 15-25, 36; PILOT exps/l2p.json:16-22): every phase 5 epochs at a
# constant lr, batch 16, no weight decay, with Adam at 0.03 * 16 / 256 = 0.001875 (main.py:117-121) and the gradient
# norm clipped to 1 (engine.py:78)
L2P = TrainingDefaults(Schedule(
    "l2p-pytorch configs/cifar100_l2p.py:4-5, 20-25, main.py:117-121, engine.py:78",
    epochs=5, base_epochs=5, lr=0.001875, base_lr=0.001875, weight_decay=0.0, base_weight_decay=0.0, batch_size=16,
    optim="adam", clip_grad=1.0))

# CODA-Prompt (GT-RIPL/CODA-Prompt configs/cifar-100_prompt.yaml:4-11, configs/imnet-r_prompt.yaml:4-11; PILOT
# exps/coda_prompt.json:15-22, exps/coda_prompt_inr.json:15-22): every phase 20 epochs (ImageNet-R 50), Adam at 0.001
# with betas (momentum 0.9, 0.999) (learners/prompt.py:66-67), no weight decay, batch 128, a cosine decay per epoch
# (utils/schedulers.py:47-57; cilearn's cosine, per step to 0, stands in: docs/methods/prompts.md), the optimizer
# reset every phase (learners/default.py:81-83); no gradient clipping
CODA_PROMPT = TrainingDefaults(
    Schedule("CODA-Prompt official configs/cifar-100_prompt.yaml:4-11, learners/prompt.py:47-76", epochs=20,
             base_epochs=20, schedule="cosine", lr=0.001, base_lr=0.001, weight_decay=0.0, base_weight_decay=0.0,
             batch_size=128, optim="adam"),
    Schedule("CODA-Prompt official configs/imnet-r_prompt.yaml:4-11, learners/prompt.py:47-76", epochs=50,
             base_epochs=50, schedule="cosine", lr=0.001, base_lr=0.001, weight_decay=0.0, base_weight_decay=0.0,
             batch_size=128, optim="adam"))

# DualPrompt (dualprompt-pytorch configs/cifar100_dualprompt.py:4-5, 15-25; PILOT exps/dualprompt.json:16-22): every
# phase 5 epochs at a constant lr, batch 24, no weight decay, Adam at 0.03 * 24 / 256 = 0.0028125 (main.py:125-129),
# the gradient norm clipped to 1 (:18; engine.py:78). ImageNet-R (configs/imr_dualprompt.py:5, 25): 50 epochs at
# 0.005 * 24 / 256 = 0.00046875. PILOT: lr 0.001, no clipping.
DUALPROMPT = TrainingDefaults(
    Schedule("dualprompt-pytorch configs/cifar100_dualprompt.py:4-5, 15-25, main.py:125-129, engine.py:78",
             epochs=5, base_epochs=5, lr=0.0028125, base_lr=0.0028125, weight_decay=0.0, base_weight_decay=0.0,
             batch_size=24, optim="adam", clip_grad=1.0),
    Schedule("dualprompt-pytorch configs/imr_dualprompt.py:4-5, 15-25, main.py:125-129, engine.py:78",
             epochs=50, base_epochs=50, lr=0.00046875, base_lr=0.00046875, weight_decay=0.0, base_weight_decay=0.0,
             batch_size=24, optim="adam", clip_grad=1.0))
