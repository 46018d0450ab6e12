"""EWC as a cilearn plugin: a loss-term component in a file of its own.

Elastic Weight Consolidation (Kirkpatrick et al., "Overcoming catastrophic forgetting in neural
networks", PNAS 2017): after each phase, the diagonal of the Fisher information of the model's
parameters is estimated on the phase's training data; in later phases a quadratic penalty keeps
each parameter near its value at the end of the previous phase, weighted by its Fisher value:

    L = L_method + weight * sum_i F_i (theta_i - theta*_i)^2 / 2

Use it with any method (cilearn itself does not know EWC)::

    cilearn run --plugin examples/ewc_plugin.py --method finetune --distill ewc
    cilearn run --plugin examples/ewc_plugin.py --method finetune --distill ewc --components.ewc.weight 1000

Choices here (FACIL's ``src/approach/ewc.py`` defaults, a class-incremental EWC): weight
(lambda) 5000; the Fisher of CE with the model's own predicted class as the label, averaged over
the phase's training images (unaugmented, the model in eval mode so that BatchNorm statistics
are not moved by it; FACIL uses training mode); online: F <- alpha F_old +
(1 - alpha) F_new with alpha 0.5; only the backbone's parameters are penalised (the head grows
every phase, and FACIL also leaves heads out).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cilearn.components import Component, register


@dataclass(frozen=True)
class EWCOptions:
    weight: float = 5000.0          # lambda (FACIL's default)
    alpha: float = 0.5              # online Fisher: alpha * old + (1 - alpha) * new
    batch_size: int = 128           # images per Fisher batch


@register("term", "ewc")
class EWC(Component):
    Options = EWCOptions

    def __init__(self, options, services):
        super().__init__(options, services)
        self.fisher: dict[str, torch.Tensor] | None = None    # name -> F, shaped as the parameter
        self.anchor: dict[str, torch.Tensor] | None = None    # name -> theta* (end of the last phase)
        self.model = None

    def phase_start(self, phase, model, old_model, data):
        self.model = model

    def terms(self, batch, out):
        if self.fisher is None:                                # phase 0: nothing to keep yet
            return {}
        penalty = sum((self.fisher[n] * (p - self.anchor[n]) ** 2).sum()
                      for n, p in self.model.backbone.named_parameters() if n in self.fisher)
        return {"ewc": (self.options.weight, penalty / 2)}

    def phase_end(self, phase, model, data):
        """The Fisher of this phase's training data and the parameters to keep (every phase,
        phase 0 included)."""
        params = {n: p for n, p in model.backbone.named_parameters() if p.requires_grad}
        new = {n: torch.zeros_like(p) for n, p in params.items()}
        was = model.training
        model.eval()                                           # BatchNorm statistics untouched
        n_seen = 0
        for i in range(0, len(data.y), self.options.batch_size):
            x = self.services.test_view(data.x[i:i + self.options.batch_size])
            logits = model(x).logits
            loss = F.cross_entropy(logits, logits.argmax(1))
            model.zero_grad()
            loss.backward()
            for n, p in params.items():
                if p.grad is not None:
                    new[n] += p.grad.detach() ** 2 * len(x)
            n_seen += len(x)
        model.zero_grad()
        model.train(was)
        new = {n: f / max(n_seen, 1) for n, f in new.items()}
        a = self.options.alpha
        self.fisher = new if self.fisher is None else {n: a * self.fisher[n] + (1 - a) * new[n] for n in new}
        self.anchor = {n: p.detach().clone() for n, p in params.items()}

    def state_dict(self):
        if self.fisher is None:
            return {}
        return {"fisher": {n: f.cpu() for n, f in self.fisher.items()},
                "anchor": {n: t.cpu() for n, t in self.anchor.items()}}

    def load_state_dict(self, state):
        if "fisher" in state:
            dev = self.services.device
            self.fisher = {n: f.to(dev) for n, f in state["fisher"].items()}
            self.anchor = {n: t.to(dev) for n, t in state["anchor"].items()}
