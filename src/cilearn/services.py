"""What the engine hands the components: the data split, the run's services (the one training loop,
embeddings, views, seeded generators, evaluation: ``RunServices``, the ``components.Services``
protocol), and the frozen old model's cached outputs (``OldOutputs``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, NamedTuple

import torch

from . import distributed
from .data.augment import Augmenter
from .data.scenario import Phase
from .evaluate import evaluate_phase, predict
from .events import NULL, Observer
from .progress import bars as progress_bars
from .train import Batch, FitResult, FitSettings, fit

if TYPE_CHECKING:
    from .checkpoint import Checkpointer
    from .embeddings import EmbeddingCache
    from .config import RunConfig
    from .memory import Memory
    from .models.net import IncrementalNet


@dataclass
class SplitData:
    """The whole data set on the training device, labels as incremental ids."""
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    def train_of(self, classes: range) -> tuple[torch.Tensor, torch.Tensor]:
        mask = (self.train_y >= classes.start) & (self.train_y < classes.stop)
        return self.train_x[mask], self.train_y[mask]


@dataclass
class RunServices:
    """The engine's facilities for the components (``components.Services``): the run's training
    settings, network, augmentation, RNG, checkpoints and observer; ``data`` (the split on the
    device) for the evaluation of a model other than the run's."""
    cfg: "RunConfig"
    net: "IncrementalNet"
    memory: "Memory | None"
    augmenter: Augmenter
    device: torch.device
    gen: torch.Generator
    autocast_dtype: torch.dtype | None
    ckpt: "Checkpointer | None" = None
    events: Observer = NULL                  # the reporting layer's observer (figures), a no-op in unit tests
    data: "SplitData | None" = None
    log: Callable[[str], None] | None = None  # the run's log of finished stages (cilearn.progress), None in unit tests
    embeddings: "EmbeddingCache | None" = None  # a frozen backbone's embeddings, once per image (cilearn.embeddings)

    def fit_settings(self, phase: Phase, **over) -> FitSettings:
        t = self.cfg.train
        first = phase.index == 0
        s = FitSettings(epochs=t.base_epochs if first else t.epochs, lr=t.base_lr if first else t.lr,
                        batch_size=t.batch_size, optim=t.optim or "sgd", clip_grad=t.clip_grad or 0.0, momentum=t.momentum,
                        weight_decay=t.base_weight_decay if first else t.weight_decay,
                        schedule=t.schedule, milestones=tuple(t.base_milestones if first else t.milestones),
                        gamma=t.gamma, warmup_epochs=t.warmup_epochs,
                        autocast_dtype=self.autocast_dtype, progress=self.progress, log=self.log,
                        compile=t.compile)
        for k, v in over.items():
            setattr(s, k, v)
        return s

    def fit(self, x: torch.Tensor, y: torch.Tensor, loss_fn, settings: FitSettings, desc: str,
            params=None, model: torch.nn.Module | None = None, epoch_end=None) -> FitResult:
        """The one training loop, with this run's augmentation, RNG and checkpoints, on the run's
        network or ``model`` (a stage that trains another network, e.g. a student: the checkpoints
        inside the stage still hold the run's network; the stage's network is its component's
        state). ``desc`` names the stage (unique within a phase: a resumed run continues the stage
        of that name)."""
        return fit(self.net if model is None else model, x, y, loss_fn, settings, self.augmenter, self.gen,
                   params=params, desc=desc, ckpt=self.ckpt, epoch_end=epoch_end)

    def evaluate(self, net: torch.nn.Module, phase: Phase) -> dict[str, float | None]:
        """The CNN accuracy of ``net`` on the test images of the classes seen by ``phase`` (``acc``,
        ``acc_old``, ``acc_new``), as the phase's own evaluation computes it."""
        seen = self.data.test_y < phase.end
        logits, emb = self.predict(net, self.data.test_x[seen])
        bounds = ([(0, phase.start)] if phase.start > 0 else []) + [(phase.start, phase.end)]
        ev = evaluate_phase(logits, emb, self.data.test_y[seen], bounds, None)
        return {"acc": ev.acc, "acc_old": ev.acc_old, "acc_new": ev.acc_new}

    def embed(self, net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Embeddings ``[N, D]`` (eval mode, no augmentation); of a frozen backbone, each image
        once per run (``cilearn.embeddings``). Under torchrun a collective: each rank embeds its
        part of ``x`` and every rank gets all of them (``distributed.gather_rows``), so all ranks
        must call it together."""
        if self.embeddings is not None and self.embeddings.usable(net):
            return self.embeddings.embed(net, x)
        return self.predict(net, x)[1]

    def predict(self, net: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits [N, K], embeddings [N, D])`` of uint8 images ``x`` (eval mode, test view), as
        the phase's evaluation computes them: of a frozen backbone, the head on the cached
        embeddings. A collective under torchrun, like ``embed``."""
        if self.embeddings is not None and self.embeddings.usable(net):
            return self.embeddings.predict(net, x)
        bs, amp = self.cfg.train.eval_batch_size, self.autocast_dtype
        return distributed.gather_rows(lambda xs: predict(net, xs, self.augmenter, bs, amp), x)

    @property
    def progress(self) -> bool:
        """Whether this process draws progress bars (``train.progress``; rank 0 only)."""
        return progress_bars(self.cfg.train.progress) and distributed.is_main()

    @property
    def eval_batch_size(self) -> int:
        return self.cfg.train.eval_batch_size

    @property
    def class_order(self) -> list[int]:
        """Incremental class id -> the data set's label."""
        return self.cfg.scenario.class_order

    @property
    def seed(self) -> int:
        """The run's seed (components derive their own seeded generators from it)."""
        return self.cfg.seed

    def views(self, x: torch.Tensor, fn) -> tuple[torch.Tensor, ...] | None:
        """``over_views(self, x, fn)``: ``fn`` over every deterministic training view of ``x``."""
        return over_views(self, x, fn)

    def test_view(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images ``[N, C, H, W]`` as the network sees them at test time (normalised)."""
        return self.augmenter.test(x)

    def resuming_later_stage(self) -> bool:
        """A resumed run is about to continue a stage of this phase that comes later than the
        current point (so what comes before it is already done)."""
        return self.ckpt is not None and self.ckpt.resume_fit is not None

    def phase_generator(self, phase: Phase) -> torch.Generator:
        """A CPU generator seeded by (seed, phase) for a phase's side draws (k-means imprinting,
        random fine-tuning selection), so that the run's RNG stream is untouched."""
        return torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + phase.index)


def over_views(ctx: RunServices, x: torch.Tensor, fn) -> tuple[torch.Tensor, ...] | None:
    """``fn`` over every deterministic training view of ``x`` (uint8 ``[N, C, H, W]``), in
    batches of ``eval_batch_size``: ``fn(normalised batch [b, C, H, W]) -> tuple of [b, ...]``
    tensors; returns the tuple of ``[V, N, ...]`` stacks, or None when the augmentation's views
    are continuous (crop, resized crop). Teacher-side caches use it: a frozen teacher's output on
    view v of image i is then looked up as ``[batch.view, batch.idx]``, exactly."""
    aug = ctx.augmenter
    if aug.num_views is None:
        return None
    bs = ctx.cfg.train.eval_batch_size
    views = []
    for v in range(aug.num_views):
        parts = [fn(aug.view(x[i:i + bs], v)) for i in range(0, len(x), bs)]
        views.append([torch.cat(p) for p in zip(*parts)])
    return tuple(torch.stack(p) for p in zip(*views))


class OldOutput(NamedTuple):
    logits: torch.Tensor            # [B, K_old]
    embedding: torch.Tensor         # [B, D]
    extra: torch.Tensor | None      # [B, F]: the cache's ``extra(output)``, e.g. PODNet's pooled maps


class OldOutputs:
    """Outputs of a frozen model (the old model, a teacher) on the training set. When the
    augmentation has a finite set of views (none, flip) they are computed once per view and looked
    up per batch, which is exact (the model is frozen, in eval mode) and saves one forward pass per
    training step; otherwise the model runs on each batch. ``extra``: a function of the model's
    ``NetOutput`` giving ``[B, F]`` more to keep (PODNet's pooled feature maps)."""

    def __init__(self, teacher: torch.nn.Module, x: torch.Tensor, ctx: RunServices, extra=None):
        @torch.no_grad()
        def outputs(xb: torch.Tensor) -> tuple[torch.Tensor, ...]:
            o = teacher(xb)
            res = (o.logits.float(), o.embedding.float())
            return res + ((extra(o).float(),) if extra is not None else ())

        self._outputs = outputs
        self.cached = over_views(ctx, x, outputs)   # ([V, N, K_old], [V, N, D][, [V, N, F]]) or None

    def __call__(self, batch: Batch) -> OldOutput:
        """The model's outputs for the batch (looked up, or computed on it)."""
        if self.cached is not None and batch.view is not None:
            got = [c[batch.view, batch.idx] for c in self.cached]
        else:
            got = list(self._outputs(batch.x))
        return OldOutput(got[0], got[1], got[2] if len(got) > 2 else None)

    def cached_embeddings(self, idx: torch.Tensor) -> torch.Tensor | None:
        """The model's cached embeddings ``[len(idx), D]`` of training images ``idx``,
        unaugmented view; None when nothing is cached (continuous augmentation)."""
        return self.cached[1][0, idx] if self.cached is not None else None
