"""DER: Dynamically Expandable Representation for Class Incremental Learning (Yan, Xie & He,
CVPR 2021), and ``Expanding``, the part it shares with FOSTER: the expandable net
(``cilearn.models.expandable``), the frozen extractors' features taken from the teacher cache,
and an auxiliary head on the new extractor's features."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.heads import LinearHead
from . import schedules
from .base import METHODS, Method


class Expanding(Method):
    """Before each phase > 0 the previous model is kept as the teacher (frozen, eval mode) and the
    net grows by one trainable extractor, all older ones frozen. The frozen extractors' embedding
    is exactly the teacher's embedding, so the training forward takes it from the teacher's cache
    (``TeacherCache``: computed once per image and augmentation view when the augmentation has
    finitely many views, else per batch) and runs only the new extractor. An auxiliary linear head
    on the new extractor's embedding (``aux_outputs`` classes) is trained with the net, with
    weight ``--loss.aux-weight`` (default 1), and discarded after the phase."""
    expandable = True
    uses_memory = True
    needs_teacher = True
    own_terms = ("auxiliary CE",)

    def __init__(self, ctx):
        super().__init__(ctx)
        w = ctx.cfg.loss.aux_weight
        self.aux_weight = 1.0 if w is None else w
        self.aux: LinearHead | None = None

    def aux_outputs(self, phase) -> int:  # pragma: no cover
        raise NotImplementedError

    def aux_targets(self, y: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def before_phase(self, phase, x, y):
        super().before_phase(phase, x, y)     # teacher + its cache, head grown by the new classes
        if phase.index > 0:
            self.net.expand()
            self.aux = LinearHead(self.net.new_dim).to(self.ctx.device)
            self.aux.add_classes(self.aux_outputs(phase))

    def train_parameters(self):
        if self.aux is None:
            return None
        return [*self.net.parameters(), *self.aux.parameters()]

    def forward(self, batch):
        if self.teacher_out is None:
            return self.net(batch.x)
        return self.net(batch.x, self.teacher_out(batch).embedding)

    def teacher_terms(self, batch, out):
        if self.aux is None or self.aux_weight == 0:
            return []
        aux_logits = self.aux(out.embedding[:, -self.net.new_dim:])      # [B, aux_outputs]
        return [("aux", self.aux_weight, F.cross_entropy(aux_logits.float(), self.aux_targets(batch.y)))]

    def after_phase(self, phase, data):
        self.aux = None
        super().after_phase(phase, data)

    def state_dict(self):
        st = super().state_dict()
        if self.aux is not None:
            st["aux"] = {k: v.cpu() for k, v in self.aux.state_dict().items()}
        return st

    def load_state_dict(self, state):
        super().load_state_dict(state)
        if self.aux is not None and "aux" in state:        # resumed inside a phase
            self.aux.load_state_dict(state["aux"])


@METHODS.register("der")
class DER(Expanding):
    """DER (Yan et al. 2021):

    * a new extractor per phase, the old ones frozen (parameters and BatchNorm statistics), the
      embeddings concatenated into the super-feature; one linear head over all seen classes on it,
      trained with CE ("expandable representation learning"; ``--loss bsce`` composes);
    * the auxiliary classifier on the new extractor's features over the new classes + one bucket
      for all old classes, ``L = L_H + lambda_a L_Ha``, lambda_a = 1 (the paper's auxiliary loss;
      ``--loss.aux-weight``);
    * herding exemplars; the classifier-learning stage: the head retrained on class-balanced data
      after each phase > 0 (the paper's classifier-learning stage), the ``balanced-finetune`` component (head only, backbone
      frozen; ``--train.finetune-epochs`` / ``--train.finetune-lr``, defaults 30 epochs at 0.1,
      x0.1 at epoch 15: the official code's "decouple" stage).

    Not included: the channel-level masks with sparsity loss and the pruning after each phase
    (the paper's "dynamical expansion"): cilearn's DER is the paper's "DER w/o P" (its parameter count grows by one full
    extractor per phase, reported per phase in ``metrics.json``). The temperature of the
    classifier-learning stage is not applied. CNN and NME (on the super-feature) are reported."""
    calibration = ("balanced-finetune",)
    training = schedules.DER

    @classmethod
    def component_options(cls, dataset):
        # DER's official classifier-learning stage ("decouple"): 30 epochs, lr 0.1, x0.1 at epoch 15,
        # weight decay 5e-4 (exps/der_womask/*/configs/1.yaml)
        return {"balanced-finetune": {"epochs": 30, "lr": 0.1}}

    def aux_outputs(self, phase) -> int:
        return phase.num_new + 1

    def aux_targets(self, y):
        """0 for every old class, 1..num_new for the new classes."""
        return (y - self.phase.num_old + 1).clamp_min(0)



@METHODS.register("der-cim")
class DERCIM(DER):
    """DER with CIM's compressed exemplars (Luo et al. 2023): ``der --memory.compressor cim``; the
    budget is in full-image units."""
    memory_compressor = "cim"
