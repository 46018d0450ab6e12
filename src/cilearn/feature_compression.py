"""FOSTER's feature compression (Wang, Zhou, Ye & Zhan, ECCV 2022, section "feature compression"):
a stage component (kind ``stage`` of ``cilearn.components``) that distils the boosted
two-extractor network of a phase > 0 into a single-extractor student."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from .components import Component, option, register
from .errors import ConfigError
from .losses import balanced_kd, effective_number_weights
from .models.net import freeze
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
    classes' head rows, as the official code), is distilled from the frozen boosted model with the
    class-balanced KD (``losses.balanced_kd``, beta2 = 0.97, T = 2) on the phase's data, ``epochs``
    at ``lr`` (a stage of the one training loop, "phase i compression"). The student replaces the
    network: every phase ends with one extractor. The boosted model is state while the stage runs
    (a run stopped inside it resumes exactly)."""
    Options = FeatureCompressionOptions
    needs_old_model = True
    per_phase = ("boosted",)

    def __init__(self, options, services):
        super().__init__(options, services)
        self.boosted: torch.nn.Module | None = None     # the frozen boosted model while the stage runs

    @classmethod
    def resolve(cls, options, run):
        epochs = options.get("epochs")
        if epochs is None:
            stage = run.schedule.compression_epochs
            epochs = stage if stage is not None and not run.quick and not run.epochs_given else run.cfg.train.epochs
        return {**options, "epochs": epochs, "lr": run.cfg.train.lr if options.get("lr") is None else options["lr"]}

    def after_training(self, ctx):
        s, o, phase, net = self.services, self.options, ctx.phase, ctx.model
        if self.boosted is None:               # (else resumed inside the stage)
            self.boosted = net.frozen_copy()
            student = copy.deepcopy(ctx.old_model.backbone.extractors[0])   # the previous extractor
            head = copy.deepcopy(ctx.old_model.head)                        # the old classes' rows
            head.add_classes(phase.num_new)
            for p in head.parameters():
                p.requires_grad_(True)
            net.compress(student, head)
        cache = OldOutputs(self.boosted, ctx.x, s)
        weights = effective_number_weights(ctx.counts, o.beta)    # [seen]

        def loss(batch):
            kd = balanced_kd(net(batch.x).logits, cache(batch).logits, weights, o.temperature)
            return kd, {"bkd": kd.detach()}

        fr = s.fit(ctx.x, ctx.y, loss, s.fit_settings(phase, epochs=o.epochs, lr=o.lr),
                   desc=f"phase {phase.index} compression")
        self.boosted = None
        return fr

    def state_dict(self):
        return {} if self.boosted is None else {"boosted": {k: v.cpu() for k, v in self.boosted.state_dict().items()}}

    def load_state_dict(self, state):
        if "boosted" in state:                 # resumed inside the stage
            b = copy.deepcopy(self.services.net)
            b.load_state_dict(state["boosted"])
            self.boosted = freeze(b)                  # after the load, which resets requires_grad
