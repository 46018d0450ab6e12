"""EWC as a cilearn plugin: a loss-term component in a file of its own.

Elastic Weight Consolidation (Kirkpatrick et al., "Overcoming catastrophic forgetting in neural
networks", PNAS 2017): after each phase, the diagonal of the Fisher information of the model's
parameters is estimated on the phase's training data; in later phases a quadratic penalty keeps
each parameter near its value at the end of the previous phase, weighted by its Fisher value:

    L = L_method + weight * sum_i F_i (theta_i - theta*_i)^2 / 2

Use it with any method (cilearn itself does not know EWC)::

    cilearn run --plugin examples/ewc_plugin.py --method finetune --distill ewc
    cilearn run --plugin examples/ewc_plugin.py --method finetune --distill ewc --components.ewc.weight 1000

Choices here (a class-incremental EWC; facts from FACIL ``src/approach/ewc.py`` at e09d2c8 and
PyCIL ``models/ewc.py`` at 87cc411):

* weight (lambda) 5000: FACIL's default (l. 16; PyCIL uses 1000, l. 31);
* the Fisher: CE with the model's own predicted class as the label (FACIL's ``max_pred``,
  l. 80; PyCIL uses the true label), the squared gradient of each batch's mean loss, averaged
  over the phase's training images weighted by batch size (FACIL l. 94-97; PyCIL divides the
  sum by the number of batches, l. 252: the same scale). Images unaugmented, in a seeded
  shuffled order, the model in **training mode** as in both references (FACIL l. 73, PyCIL
  l. 240), its buffers (BatchNorm running statistics) restored afterwards;
* each Fisher value clamped at ``fisher_max`` 1e-4: PyCIL's ``fishermax`` (l. 32, l. 253);
* online: F <- alpha F_old + (1 - alpha) F_new with alpha 0.5 (FACIL l. 132; PyCIL uses the
  share of old classes, l. 78);
* only the backbone's parameters are penalised (FACIL keeps the Fisher of ``model.model`` only,
  l. 27 and l. 67; the head grows every phase).

Why (issue 32: ``--method finetune --distill ewc --dataset digits --epochs 3 --base-epochs 3``
stopped with an infinite loss on 2 of 3 seeds). The penalty is a quadratic with curvature
``weight * F_i`` on each parameter; SGD with momentum m on it is stable only while
``lr * weight * F_i < 2 (1 + m)`` (3.8 at cilearn's momentum 0.9; FACIL trains with momentum 0
and lr 0.05, l. 14-15). Measured with that command (seed 2, fp32): this file used to take the
Fisher in *eval* mode, where BatchNorm's running statistics, after a few epochs, still lag the
batches the model was trained on; after phase 0 that Fisher's largest value was 40-50x the
training-mode one (1.4e-2 against 3.3e-4; seed 4: 3.2e-2 against 6.4e-4), after phase 1 4.2e-1
against 1.1e-4, and on some phases exactly 0 (saturated softmax). At lr 0.1 and weight 5000,
``lr * weight * max F`` was 7 after phase 0 and 106 after phase 1: the penalty grew geometrically
(1e-1 at the 6th step of the later phases, 1e14 at the 16th, inf at the 27th) and the run
stopped. With the training-mode Fisher the product is 0.02-0.3 after phases 0-3 on seeds 1-5,
but the Fisher of the last phase reached 5.9e-3 (product 3.0), close to the limit; the clamp
keeps ``weight * F_i <= 0.5``, so the penalty is stable for any lr below 7.6 (momentum 0.9)
whatever the data. Raising ``weight`` or ``fisher_max``: keep
``lr * weight * fisher_max < 2 (1 + momentum)``.
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
    fisher_max: float = 1e-4        # ceiling of each Fisher value (PyCIL's); see the docstring
    batch_size: int = 128           # images per Fisher batch


@register("term", "ewc")
class EWC(Component):
    Options = EWCOptions

    def __init__(self, options, services):
        super().__init__(options, services)
        self.fisher: dict[str, torch.Tensor] | None = None    # name -> F, shaped as the parameter
        self.anchor: dict[str, torch.Tensor] | None = None    # name -> theta* (end of the last phase)

    def terms(self, step, out):
        if self.fisher is None:                                # phase 0: nothing to keep yet
            return {}
        penalty = sum((self.fisher[n] * (p - self.anchor[n]) ** 2).sum()
                      for n, p in step.ctx.model.backbone.named_parameters() if n in self.fisher)
        return {"ewc": (self.options.weight, penalty / 2)}

    def phase_end(self, ctx):
        """The Fisher of this phase's training data and the parameters to keep (every phase,
        phase 0 included; after the phase's evaluation, which leaves the model as it was)."""
        phase, model, data = ctx.phase, ctx.model, ctx
        params = {n: p for n, p in model.backbone.named_parameters() if p.requires_grad}
        new = {n: torch.zeros_like(p) for n, p in params.items()}
        was = model.training
        kept = {n: b.clone() for n, b in model.named_buffers()}     # BatchNorm statistics, restored below
        model.train()                                          # the mode the penalty's loss is trained in
        order = torch.randperm(len(data.y), generator=self.services.phase_generator(phase)).to(data.y.device)
        for i in range(0, len(data.y), self.options.batch_size):
            x = self.services.test_view(data.x[order[i:i + self.options.batch_size]])   # [b, C, H, W]
            logits = model(x).logits
            loss = F.cross_entropy(logits, logits.argmax(1))     # mean over the batch
            model.zero_grad()
            loss.backward()
            for n, p in params.items():
                if p.grad is not None:
                    new[n] += p.grad.detach() ** 2 * len(x)
        model.zero_grad()
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(kept[n])
        model.train(was)
        new = {n: (f / max(len(data.y), 1)).clamp_(max=self.options.fisher_max) for n, f in new.items()}
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
