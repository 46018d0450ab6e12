"""PODNet: Pooled Outputs Distillation for Small-Tasks Incremental Learning (Douillard et al.,
ECCV 2020), and its Balanced Softmax CE variant (Jodelet, Liu & Murata 2021)."""
from __future__ import annotations

from . import schedules
from .base import METHODS, Method


@METHODS.register("podnet")
class PODNet(Method):
    """PODNet (Douillard et al. 2020):

    * local-similarity classifier (``lsc`` head, Sec. 3.2): 10 proxies per class
      (``--model.proxies``), learnable scale eta; new classes' proxies imprinted from a K-means
      of their normalised embeddings (official code's multi-imprinting); old classes' proxies
      fixed in the main stage as in the official code (``old_weights: 0``;
      ``--train.freeze-old-head false`` trains them);
    * NCA loss with margin delta = 0.6 on the target's unscaled similarity (Eq. 7,
      ``--loss.nca-margin``; see ``cilearn.losses.nca``);
    * POD-spatial on every stage's output (Eq. 2-3) and POD-flat on the embedding (Sec. 3.1),
      weights ``lambda_c sqrt(seen / new)`` and ``lambda_f sqrt(seen / new)`` (the official code's
      adaptive factor; ``--loss.pod-spatial-weight`` 3 / ``--loss.pod-flat-weight`` 1 on CIFAR-like
      data, 8 / 10 on image folders, the official configs);
    * herding exemplars; classifier fine-tuning on class-balanced exemplars after each phase > 0
      (head only, 20 epochs, constant lr 0.05, 0.01 on image folders, the NCA loss: official
      settings); the backbone's last ReLU removed; CNN and NME reported.

    Deviations (docs): POD-flat is the Euclidean distance the paper writes, where the official
    code uses a cosine embedding loss; the official code's gradient clipping to [-5, 5] is not
    applied; the official ResNet also drops the ReLU at the end of every residual block (its
    issue #24), cilearn only the last one."""
    head = "lsc"
    cls_loss = "nca"
    last_relu = False
    uses_memory = True
    terms = ("pod",)
    calibration = ("balanced-finetune",)
    head_components = ("imprint", "freeze-old-rows")
    training = schedules.PODNET

    @classmethod
    def component_options(cls, dataset):
        big = dataset == "imagefolder"
        # the official classifier fine-tuning: 20 epochs at a constant lr 0.05, 0.01 on ImageNet; POD
        # weights 3 / 1, 8 / 10 on ImageNet (options/podnet/podnet_cnn_cifar100.yaml, podnet_cnn_imagenet100.yaml)
        return {"balanced-finetune": {"epochs": 20, "lr": 0.01 if big else 0.05, "decay": False},
                "pod": {"spatial_weight": 8.0 if big else 3.0, "flat_weight": 10.0 if big else 1.0}}


@METHODS.register("podnet-bsce")
class PODNetBSCE(PODNet):
    """PODNet with Balanced Softmax CE on the scaled LSC scores (``CE(eta s + log n, y)``)
    instead of NCA, without the class-balanced fine-tuning stage (Jodelet et al. 2021;
    ``--balanced-finetune`` puts it back) and with the old classes' proxies trained (as
    ``lucir-bsce``: frozen old rows plus BSCE's prior over-correct, see RESULTS.md)."""
    cls_loss = "bsce"
    calibration = ()
    head_components = ("imprint",)
