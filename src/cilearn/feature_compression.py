"""FOSTER's feature compression (Wang, Zhou, Ye & Zhan, ECCV 2022, section "feature compression"):
a stage component (kind ``stage`` of ``cilearn.components``) that distils the boosted
two-extractor network of a phase > 0 into a single-extractor student, which becomes the network
at the start of the next phase.

Which network a phase reports follows the reference code (PyCIL ``models/foster.py``, FOSTER's
official code, and ``xfflzl/CIM-CIL`` ``models/foster.py``): ``eval_task`` and
``build_rehearsal_memory`` use ``self._network``, the boosted network, and ``incremental_train``
replaces it by the compressed student ``self._snet`` only when the next phase starts (``_cur_task
> 1``); the student's accuracy is only logged. So here the phase's evaluation (CNN and NME), the
exemplar selection and a compressor's boxes use the boosted network; the student's accuracy is
recorded beside it (``student_acc``); the student replaces the network after the phase's
evaluation (``phase_end``), so the next phase's old model and starting point are the student, as in
the reference; after the last phase the boosted network stays (it is what was reported).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from .components import Component, option, register
from .errors import ConfigError
from .losses import balanced_kd, effective_number_weights
from .services import OldOutputs


@dataclass(frozen=True)
class FeatureCompressionOptions:
    # the stage's epochs; null: the recipe schedule's (FOSTER: 130 on CIFAR and image folders, the
    # official exps/foster.json), the phase's epochs on the quick data sets or with --epochs
    epochs: int | None = option(None, alias="train.compression_epochs")
    lr: float | None = option(None, alias="train.compression_lr")   # null: the phase's lr
    beta: float = option(0.97, alias="loss.bkd_beta")   # effective-number beta2 of the balanced KD (official CIFAR-100)
    temperature: float = option(2.0, alias="loss.temperature")

    def __post_init__(self):
        if (self.epochs is not None and self.epochs < 0) or (self.lr is not None and not self.lr > 0) \
                or not 0 <= self.beta < 1 or not self.temperature > 0:
            raise ConfigError("components.feature-compression: epochs >= 0, lr > 0, beta in [0, 1) and temperature > 0 "
                              f"are expected, got {self.epochs}, {self.lr}, {self.beta}, {self.temperature}")


@register("stage", "feature-compression")
class FeatureCompression(Component):
    """After the boosting stage of a phase > 0 (the main stage: the frozen old extractor + a new
    one), a single-extractor student, initialised from the old model (its extractor and the old
    classes' head rows, as the official code), is distilled from the frozen boosted network with
    the class-balanced KD (``losses.balanced_kd``, beta2 = 0.97, T = 2) on the phase's data,
    ``epochs`` at ``lr`` (a stage of the one training loop, "phase i compression"; its network is
    the student, not the run's). ``student_acc`` per phase (null in phase 0, where the network is a
    single extractor anyway). The student is state until it replaces the network (a run stopped
    inside the stage, or between its end and the phase's checkpoint, resumes exactly); the
    phase checkpoint already holds it as the network."""
    Options = FeatureCompressionOptions
    needs_old_model = True
    per_phase = ("student",)

    def __init__(self, options, services):
        super().__init__(options, services)
        self.student: torch.nn.Module | None = None     # this phase's student, until it becomes the network
        self.student_acc: float | None = None

    @classmethod
    def resolve(cls, options, run):
        epochs = options.get("epochs")
        if epochs is None:
            stage = run.schedule.compression_epochs
            epochs = stage if stage is not None and not run.quick and not run.epochs_given else run.cfg.train.epochs
        return {**options, "epochs": epochs, "lr": run.cfg.train.lr if options.get("lr") is None else options["lr"]}

    def new_student(self, net: torch.nn.Module, old: torch.nn.Module, num_new: int) -> torch.nn.Module:
        """A network like ``net`` whose one extractor is the old model's and whose head holds the
        old model's rows and new rows for the phase's classes (drawn as the head draws them)."""
        student = copy.deepcopy(net)
        head = copy.deepcopy(old.head)
        head.add_classes(num_new)
        for p in head.parameters():
            p.requires_grad_(True)
        student.compress(copy.deepcopy(old.backbone.extractors[0]), head)
        return student

    def after_training(self, ctx):
        s, o, phase, net = self.services, self.options, ctx.phase, ctx.model
        if self.student is None:               # (else resumed inside the stage)
            self.student = self.new_student(net, ctx.old_model, phase.num_new)
        student = self.student
        teacher = net.frozen_copy()            # the boosted network, frozen (eval mode), as the KD's teacher
        cache = OldOutputs(teacher, ctx.x, s)
        weights = effective_number_weights(ctx.counts, o.beta)    # [seen]

        def loss(batch):
            kd = balanced_kd(student(batch.x).logits, cache(batch).logits, weights, o.temperature)
            return kd, {"bkd": kd.detach()}

        fr = s.fit(ctx.x, ctx.y, loss, s.fit_settings(phase, epochs=o.epochs, lr=o.lr),
                   desc=f"phase {phase.index} compression", model=student)
        self.student_acc = s.evaluate(student, phase)["acc"]
        return fr

    def phase_end(self, ctx):
        """After the phase's evaluation: the student becomes the network (not after the last phase)."""
        if self.student is not None and not ctx.phase.last:
            ctx.model.load_state_dict(self.student.state_dict())   # (reshaped to one extractor)

    def state_dict(self):
        return {} if self.student is None else {"student": {k: v.cpu() for k, v in self.student.state_dict().items()}}

    def load_state_dict(self, state):
        if "student" in state:                 # resumed inside the stage (the run's network is the boosted one)
            net = self.services.net
            self.student = copy.deepcopy(net)
            self.student.load_state_dict(state["student"])

    def diagnostics(self):
        acc, self.student_acc = self.student_acc, None
        return {"student_acc": acc}
