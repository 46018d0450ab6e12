"""The baselines as recipes: each is a choice of components, no code of its own."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..train import Batch
from . import schedules
from .base import METHODS, Method


@METHODS.register("finetune")
class Finetune(Method):
    """CE on the current phase's data only: the lower bound."""
    training = schedules.FINETUNE


@METHODS.register("joint")
class Joint(Method):
    """CE on all training data of the classes seen so far: the upper bound (finetune's schedule)."""
    train_on_seen = True
    training = schedules.FINETUNE


@METHODS.register("replay")
class Replay(Method):
    """Finetune + exemplars (herding by default); reports CNN and NME."""
    uses_memory = True
    training = schedules.REPLAY


@METHODS.register("lwf")
class LwF(Method):
    """Class-incremental LwF (Li & Hoiem 2016): one head over all seen classes, no exemplars.
    ``L_new + lambda * KD(T = 2)`` on the old-class logits, lambda = 1 (Sec. 3 of the paper), with
    ``L_new`` the CE over the new classes' logits only (``ce-local``: the paper's new-task loss on
    the new outputs; PyCIL and FACIL do the same). ``--loss ce`` is the softmax over all seen
    classes instead, which pushes every old logit down on the new images: on Fashion-MNIST B0-Inc2
    it sends every old-class test image to a new class (benchmarks/RESULTS.md)."""
    cls_loss = "ce-local"
    distill = "kd"
    training = schedules.LWF


@METHODS.register("icarl")
class ICaRL(Method):
    """iCaRL (Rebuffi et al. 2017): herding exemplars, classification + distillation on
    data + exemplars, nearest-mean-of-exemplars prediction (CNN reported too).
    Default losses: CE + KD(T = 2) on the old logits, as PyCIL and METHODS.md's reference
    numbers; ``icarl-bce`` is the paper's sigmoid form (Alg. 3)."""
    distill = "kd"
    uses_memory = True
    training = schedules.ICARL


@METHODS.register("icarl-bce")
class ICaRLBCE(ICaRL):
    """iCaRL as Alg. 3 of the paper: one sigmoid BCE over all seen classes, whose targets are
    one-hot for the new classes and the teacher's sigmoids for the old classes (phase > 0)."""
    cls_loss = "bce"
    distill = "bce"

    @classmethod
    def check_config(cls, cfg, has_memory: bool) -> None:
        super().check_config(cfg, has_memory)
        if cfg.loss.cls not in (None, "bce"):
            raise ConfigError(f"--method {cfg.method} is one sigmoid BCE doing classification and distillation; "
                              f"--loss {cfg.loss.cls} does not apply (use --method icarl or lwf for a softmax loss)")

    def objective(self, batch: Batch, out) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        target = F.one_hot(batch.y, out.logits.shape[1]).float()
        if self.teacher_out is not None:
            t_logits = self.teacher_out(batch).logits
            target[:, : t_logits.shape[1]] = torch.sigmoid(t_logits)
        loss = F.binary_cross_entropy_with_logits(out.logits.float(), target, reduction="sum") / len(target)
        return loss, {"bce": loss.detach()}


@METHODS.register("lwf-mc")
class LwFMC(ICaRLBCE):
    """LwF-MC, the class-incremental LwF of the iCaRL paper (Rebuffi et al. 2017, Sec. 4): iCaRL's
    sigmoid BCE with the teacher's sigmoids as old-class targets, without exemplars. Unlike the
    softmax KD of ``lwf`` it anchors the old logits' absolute values, not only their differences.
    ``--distill attention`` adds LwM's attention term on top."""
    uses_memory = False


@METHODS.register("dfgr")
class DFGR(LwF):
    """LwF + DF-GR (Choi et al. 2021), exemplar-free: before each phase > 0 a generator is trained
    against the old model alone, and its samples are distilled from the old model in every
    training step (``cilearn.replay``). ``--replay dfgr`` adds the same to any method."""
    replay_source = "dfgr"


@METHODS.register("dfgr-dtid")
class DFGRDTID(DFGR):
    """LwF + DF-GR + DT-ID (Choi et al. 2021): the new-class logit block is distilled from a
    new-class teacher trained on the new data first (``--distill dual-teacher`` on any method)."""
    terms = ("dual-teacher",)
