"""PODNet: Pooled Outputs Distillation for Small-Tasks Incremental Learning (Douillard et al., ECCV
2020), and its Balanced Softmax CE variant (Jodelet, Liu & Murata 2021).

* local-similarity classifier (``lsc`` head, Sec. 3.2): 10 proxies per class, learnable scale eta;
  new classes' proxies imprinted from a K-means of their normalised embeddings (the official
  multi-imprinting); old classes' proxies fixed in the main stage as in the official code
  (``old_weights: 0``; ``--train.freeze-old-head false`` trains them);
* NCA loss with margin delta = 0.6 on the target's unscaled similarity (Eq. 7);
* POD-spatial on every stage's output (Eq. 2-3) and POD-flat on the embedding (Sec. 3.1), weights
  ``lambda_c sqrt(seen / new)`` and ``lambda_f sqrt(seen / new)`` (the official code's adaptive
  factor), 3 / 1 on CIFAR-like data, 8 / 10 on image folders (options/podnet/podnet_cnn_cifar100.yaml,
  podnet_cnn_imagenet100.yaml);
* herding exemplars; classifier fine-tuning on class-balanced exemplars after each phase > 0 (head
  only, 20 epochs, constant lr 0.05, 0.01 on image folders, the NCA loss: official settings); the
  backbone's last ReLU removed; CNN and NME reported.

Deviations (docs): POD-flat is the Euclidean distance the paper writes, where the official code
uses a cosine embedding loss; the official code's gradient clipping to [-5, 5] is not applied;
the official ResNet also drops the ReLU at the end of every residual block (its issue #24),
cilearn only the last one. podnet-bsce: BSCE on the scaled LSC scores instead of NCA, without the
fine-tuning stage and with the old proxies trained (as lucir-bsce).
"""
from __future__ import annotations

from dataclasses import replace

from . import schedules
from .recipe import Recipe, register_recipe

PODNET = register_recipe(Recipe(
    "podnet", schedules.PODNET, "lsc", "nca", terms=("pod",), exemplars=True,
    head_init=("imprint",), constraints=("freeze-old-rows",), calibration=("balanced-finetune",),
    options={"backbone": {"last_relu": False}, "balanced-finetune": {"epochs": 20, "lr": 0.05, "decay": False}},
    image_folder_options={"balanced-finetune": {"lr": 0.01}, "pod": {"spatial_weight": 8.0, "flat_weight": 10.0}},
    summary="local-similarity classifier (10 proxies per class, learnable scale), NCA loss (margin 0.6), "
            "POD-spatial on every stage + POD-flat on the embedding, herding, classifier fine-tuning on balanced "
            "exemplars; CNN and NME",
    paper="Douillard et al., *PODNet: Pooled Outputs Distillation for Small-Tasks Incremental Learning*, ECCV 2020"))

PODNET_BSCE = register_recipe(replace(
    PODNET, name="podnet-bsce", classification="bsce", calibration=(), constraints=(),
    summary="`podnet` with Balanced Softmax CE instead of NCA and no fine-tuning", paper="Jodelet et al. 2021"))
