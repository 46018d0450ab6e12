"""The engine's side of a phase, the same for every recipe: what the phase trains on, the old model
and its cached outputs, the network grown by the phase's classes (head rows, an extractor) before
the components start, the main stage's loss (one student forward, the components' terms), the
stages after it, the memory update and the class means for NME. The runner calls these steps in
order; the components do everything a paper adds. This module names no paper.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .components import Components, PhaseContext, Step
from .data.scenario import Phase
from .losses import cross_entropy
from .services import OldOutputs, RunServices, SplitData
from .train import Batch, FitResult


def rows_of(out, a: int, b: int):
    """Rows ``a:b`` of a ``NetOutput`` (logits, embedding, every stage's maps)."""
    return type(out)(out.logits[a:b], out.embedding[a:b], [m[a:b] for m in out.maps])


class Learner:
    """A run's network and components through the phases. ``nme``: report nearest-class-mean
    accuracy also for classes without exemplars, from the mean embedding of their training images
    at the end of the phase that learnt them."""

    def __init__(self, services: RunServices, components: Components, nme: bool = False):
        self.s, self.net, self.components = services, services.net, components
        cls = components.of_kind("classification")
        self.cls_loss = cls[0].loss if cls else cross_entropy
        self.nme = nme
        self.ctx: PhaseContext | None = None
        self.class_means: dict[int, torch.Tensor] = {}     # class -> [D] normalised mean of its training images
        self.finetune_seconds = 0.0                        # this phase's calibration stages
        components.attach(self.net)

    # ---------------------------------------------------------------- before training
    def training_set(self, phase: Phase, data: SplitData) -> tuple[torch.Tensor, torch.Tensor]:
        """The phase's new-class images, the stored exemplars, and what the components change."""
        comps, mem = self.components, self.s.memory
        comps.start(phase)
        x, y = data.train_of(phase.classes)
        stored = mem.data() if mem is not None else None
        if stored is not None:
            x, y = torch.cat([x, stored[0]]), torch.cat([y, stored[1]])
        return comps.training_set(phase, x, y, mem, data)

    def begin(self, phase: Phase, x: torch.Tensor, y: torch.Tensor) -> None:
        """The old model (a frozen copy, when a component or the network needs it), the network grown
        by the phase's classes, the old model's outputs on ``x`` (cached per view where the
        augmentation allows), then the components' phase start on the grown network."""
        comps, net = self.components, self.net
        self.finetune_seconds = 0.0
        if self.s.embeddings is not None:
            self.s.embeddings.new_phase()             # a frozen backbone's key: once per phase
        comps.start(phase)                            # (idempotent: ``training_set`` started them)
        outputs = comps.needs("needs_old_outputs")
        old = None
        if phase.index > 0 and (outputs or comps.needs("needs_old_model") or net.expandable):
            old = net.frozen_copy()
        net.grow(phase)
        cache = None
        if old is not None and (outputs or net.reuses_old_embedding):
            cache = OldOutputs(old, x, self.s, comps.old_outputs_extra())
        counts = torch.bincount(y, minlength=phase.seen).float()
        self.ctx = PhaseContext(phase, net, old, x, y, counts, self.s.memory, cache, self.cls_loss, self.batch_loss)
        comps.phase_start(self.ctx)

    # ---------------------------------------------------------------- training
    def train(self) -> FitResult:
        """The main stage, then (unless a resumed run continues a later stage of this phase) the
        constraints' projection after its last step."""
        ctx, s, comps = self.ctx, self.s, self.components
        desc = f"phase {ctx.phase.index}"
        later_stage = s.ckpt is not None and s.ckpt.skip_stage(desc)   # resuming e.g. the fine-tuning
        extra = comps.train_parameters(ctx)
        params = [*self.net.parameters(), *extra] if extra else None
        fr = s.fit(ctx.x, ctx.y, self.loss, s.fit_settings(ctx.phase), desc=desc, params=params,
                   epoch_end=lambda epoch: comps.epoch_end(ctx, epoch))
        if not later_stage:
            comps.constrain(ctx)        # the projection after the stage's last optimizer step
        return fr

    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """A main-stage step's loss: the constraints' projection (after the previous optimizer
        step), the components' changes to the step (``before_step``), then ``step_loss``."""
        self.components.constrain(self.ctx)
        step = Step(batch, self.ctx)
        self.components.before_step(step)
        return self.step_loss(step)

    def batch_loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training loss of ``batch`` as given (``PhaseContext.loss``: for a component's
        differentiable step on it; ``batch.view`` None: the old model's outputs computed on it)."""
        return self.step_loss(Step(batch, self.ctx))

    def step_loss(self, step: Step) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One student forward, then ``sum weight * value`` of the components' terms in the run's
        order; ``{name: detached value}`` for the logs."""
        out = self.forward(step)
        loss, terms = None, {}
        for name, w, v in self.components.terms(step, out):
            terms[name] = v.detach()
            loss = w * v if loss is None else loss + w * v
        if loss is None:               # no term in this phase: a zero that still reaches the parameters
            loss = out.logits.sum() * 0.0
        return loss, terms

    def forward(self, step: Step):
        """The student's forward of the batch and the rows components added (one forward, one
        BatchNorm batch; the rows' outputs go to ``step.outputs``). A network that takes frozen
        extractors' embedding from the old model gets it from the cache."""
        batch, ctx, net = step.batch, step.ctx, self.net
        x = batch.x if not step.rows else torch.cat([batch.x] + [r for _, r in step.rows])
        if net.reuses_old_embedding and ctx.old_outputs is not None:
            old = step.old if not step.rows else ctx.old_outputs(batch._replace(x=x, view=None))
            whole = net(x, old.embedding)
        else:
            whole = net(x)
        if not step.rows:
            return whole
        n = len(batch.x)
        out = rows_of(whole, 0, n)
        for comp, r in step.rows:
            step.outputs[id(comp)] = rows_of(whole, n, n + len(r))
            n += len(r)
        return out

    def after_training(self) -> FitResult:
        """The stages after the main one, in the run's order (calibration, extra stages): their
        seconds and images; the extra stages' loss terms (``calibration`` stages' seconds are the
        phase's ``finetune_seconds``)."""
        done = [(p, fr) for p in self.components.active if (fr := p.after_training(self.ctx)) is not None]
        self.finetune_seconds = sum(fr.seconds for p, fr in done if p.kind == "calibration")
        loss = {k: v for p, fr in done if p.kind != "calibration" for k, v in fr.loss.items()}
        return FitResult(sum(fr.seconds for _, fr in done), sum(fr.images for _, fr in done), loss)

    # ---------------------------------------------------------------- after training
    def update_memory(self, data: SplitData) -> None:
        """The exemplar memory (selection, optimisation, compression) from the phase's new-class
        images, and their class means for NME where those are kept."""
        ctx, s, mem = self.ctx, self.s, self.s.memory
        ctx.old_outputs = ctx.old_model = None          # free the old model's memory
        phase = ctx.phase
        emb = ctx.new_embeddings     # the new images' embeddings when a calibration stage computed them on the final model
        if mem is None and not self.nme:
            return
        x, y = data.train_of(phase.classes)
        if emb is None:
            emb = s.embed(self.net, x)
        if mem is not None:
            originals = mem.update(x, y, phase.classes, emb, phase.seen, s.gen, self.net, s.augmenter.test)
            selected = mem.optimize(self.net, s.augmenter.test, phase.classes, x, y, s.phase_generator(phase))
            s.events.on_memory(phase, originals, selected)
        if self.nme:
            f = F.normalize(emb.float(), dim=1)
            for c in phase.classes:
                self.class_means[c] = F.normalize(f[y == c].mean(0), dim=0)

    def prototypes(self) -> torch.Tensor | None:
        """Class means ``[seen, D]`` for NME prediction: of each class's exemplars (L2-normalised
        means of the L2-normalised exemplar embeddings, iCaRL Alg. 1) where it has them, else
        (``nme``) of its training images; None where a class has neither."""
        mem = self.s.memory
        if (mem is None or len(mem) == 0) and not self.nme:
            return None
        means = []
        for c in range(self.net.num_classes):
            ex = mem.exemplars.get(c) if mem is not None else None
            if ex is not None and len(ex):
                means.append(F.normalize(self.s.embed(self.net, ex), dim=1).mean(0))
            elif self.nme and c in self.class_means:
                means.append(self.class_means[c].to(self.s.device))
            else:
                return None
        return F.normalize(torch.stack(means), dim=1)

    def end(self) -> None:
        """After the phase's evaluation: the components' phase end; the phase's context goes."""
        if self.ctx is not None:
            self.components.phase_end(self.ctx)
        self.ctx = None

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """What the run keeps beyond the network and the memory (checkpointed at phase ends and
        inside stages): the components' state and the class means."""
        st: dict[str, Any] = {}
        if (comps := self.components.state_dict()):
            st["components"] = comps
        if self.class_means:
            st["class_means"] = {c: v.cpu() for c, v in self.class_means.items()}
        return st

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.components.load_state_dict(state.get("components", {}))
        if "class_means" in state:
            self.class_means = {int(c): v.to(self.s.device) for c, v in state["class_means"].items()}

    def diagnostics(self) -> dict[str, Any]:
        """Per-phase values of the components for the metrics row."""
        return self.components.diagnostics()
