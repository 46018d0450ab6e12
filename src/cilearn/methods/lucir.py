"""LUCIR: Learning a Unified Classifier Incrementally via Rebalancing (Hou et al., CVPR 2019),
and the Balanced Softmax CE recipes (Jodelet, Liu & Murata 2021) built on LUCIR and iCaRL."""
from __future__ import annotations

from . import schedules
from .base import METHODS, Method
from .baselines import ICaRL


@METHODS.register("lucir")
class LUCIR(Method):
    """LUCIR (Hou et al. 2019): cosine-normalised head with a learnable scale sigma (Sec. 3.1);
    new-class rows imprinted from the current model's normalised class means before each phase
    (Sec. 3.2); less-forget constraint ``lambda (1 - cos(f_old(x), f(x)))`` on every training
    sample with ``lambda = lambda_base sqrt(|old| / |new|)`` (Sec. 3.2, ``--loss.less-forget-weight``:
    lambda_base, 5 for CIFAR, 10 on image folders as the paper's ImageNet value); margin ranking
    of each old-class exemplar's ground-truth cosine against the K = 2 hardest new classes, margin
    0.5, weight 1 (Sec. 3.3, ``--loss.margin``, ``--loss.margin-k``, ``--loss.margin-weight``);
    herding exemplars; class-balanced fine-tuning after each phase > 0 (on by default,
    ``--no-balanced-finetune``). The old classes' rows stay fixed during the main training of a
    phase (``--train.freeze-old-head``, on: the official code does so while the less-forget
    constraint is on; the fine-tuning stage trains all rows). The backbone's last ReLU is
    removed (Sec. 3.2; ``--model.last-relu true`` keeps it). Reports CNN and NME."""
    head = "cosine"
    last_relu = False
    uses_memory = True
    terms = ("less-forget", "margin-ranking")
    calibration = ("balanced-finetune",)     # LUCIR's official 20 epochs at lr 0.01, x0.1 at 10 (the component's defaults)
    head_components = ("imprint", "freeze-old-rows")
    training = schedules.LUCIR

    @classmethod
    def component_options(cls, dataset):
        # lambda_base: 5 on CIFAR-100, 10 on ImageNet (Sec. 4.1), 10 on every image folder
        return {"less-forget": {"weight": 10.0 if dataset == "imagefolder" else 5.0}}


@METHODS.register("lucir-bsce")
class LUCIRBSCE(LUCIR):
    """LUCIR with Balanced Softmax CE instead of CE (Jodelet et al. 2021) and without LUCIR's
    classifier rebalancing, which BSCE replaces: no class-balanced fine-tuning stage (the BSCE
    paper's claim; ``--balanced-finetune`` puts it back), and also, cilearn's choice from
    measurements, no margin ranking loss (``--loss.margin-weight 0``) and old classes' rows not
    frozen (``--train.freeze-old-head false``). Both push the new classes' scores down on the old
    classes' exemplars, on top of BSCE's prior: kept together with BSCE they over-correct
    (Fashion-MNIST B0-Inc2, benchmarks/RESULTS.md: new-class accuracy 1% after phase 1, average
    incremental accuracy 53 against 74 without them and 75 for LUCIR with fine-tuning).
    Cosine head, imprinting, less-forget and the removed last ReLU stay."""
    cls_loss = "bsce"
    calibration = ()
    head_components = ("imprint",)

    @classmethod
    def component_options(cls, dataset):
        return {**super().component_options(dataset), "margin-ranking": {"weight": 0.0}}


@METHODS.register("icarl-bsce")
class ICaRLBSCE(ICaRL):
    """iCaRL (CE + KD form) with Balanced Softmax CE (Jodelet et al. 2021): ``CE(z + log n, y)``
    with n the per-class training counts of the phase (new images, old exemplars)."""
    cls_loss = "bsce"
