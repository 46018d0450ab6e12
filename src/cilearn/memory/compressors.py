"""Exemplar compressors (kind ``compressor`` of ``cilearn.components``, ``--compressor NAME``), after
CIM (Luo, Liu, Schiele & Sun, CVPR 2023). A compressor gives each candidate exemplar a box: its
pixels are kept, the rest is stored downsampled (``cilearn.memory.codec``), and the budget is
counted in the bytes stored.

* ``full``: no box, the whole image downsampled (the paper's ablation baseline): cost ``1 / eta``.
* ``cam-threshold``: the box of the CIL model's CAM of the label class, thresholded at ``tau``.
* ``cim``: the same box rule on the CAM of the CIM model (``cilearn.memory.cim.CIMModel``: the CIL
  network with learnable activations phi), trained alongside the CIL model after every epoch by
  the paper's bilevel step (official ``models/foster.py:155-196, 242-287``) and optionally by more
  steps at each phase end.

Every compressor is also a training component: CIM's artifact augmentation (Sec. 4.3), new-class
images of a training batch compressed like exemplars, so that compression artifacts do not tell
the old classes (the compressed exemplars) from the new.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass

import torch

from ..components import Component, option, register
from ..data.augment import Draw
from ..data.rows import as_tensor
from ..errors import ConfigError
from ..models.net import batch_statistics, eval_mode
from ..train import lr_at
from .cim import CIMModel, MetaBatches, meta_batch, meta_steps, method_inner_loss
from .codec import RESAMPLE, boxes_from_cam, cam, class_vectors, own_box_artifacts, random_box_artifacts


@dataclass(frozen=True)
class CompressorOptions:
    # the non-box pixels downsampled sqrt(eta) per side (CIM Sec. 5: eta = 4)
    eta: int = option(4, alias="memory.compression.eta")
    # nearest down and up (official utils/transform.py) | area (average + bilinear, ours)
    resample: str = option("nearest", alias="memory.compression.resample")
    # herding on the compressed images' features (official) | original (ours, earlier)
    select_on: str = option("compressed", alias="memory.compression.select_on")
    # artifact augmentation. official: each new-class image compressed around its own box,
    # probability stepped up by ``artifact_prob`` every ``artifact_refresh`` epochs of a phase (0
    # before the first refresh; official models/foster.py:137, 214 with cam_update_interval 40,
    # randombbxblur_prob_incre 0.1), boxes recomputed at each refresh; random-box: cilearn's earlier
    # form (a random box, fixed ``artifact_prob``, phases > 0)
    artifacts: str = option("official", alias="components.artifacts.mode")
    artifact_prob: float = option(0.1, alias=("memory.compression.artifact_prob", "components.artifacts.prob"))
    artifact_refresh: int = option(40, alias="components.artifacts.refresh")

    def __post_init__(self):
        if self.eta < 1 or math.isqrt(self.eta) ** 2 != self.eta:
            raise ConfigError(f"--memory.compression.eta must be a square number >= 1 (the image is downsampled "
                              f"sqrt(eta) per side), got {self.eta}")
        if self.resample not in RESAMPLE:
            raise ConfigError(f"--memory.compression.resample must be nearest or area, got '{self.resample}'")
        if self.select_on not in ("compressed", "original"):
            raise ConfigError(f"--memory.compression.select-on must be compressed or original, got '{self.select_on}'")
        if not 0 <= self.artifact_prob <= 1:
            raise ConfigError(f"--memory.compression.artifact-prob must be in [0, 1], got {self.artifact_prob}")
        if self.artifacts not in ("official", "random-box") or self.artifact_refresh < 1:
            raise ConfigError(f"components.*.artifacts must be official or random-box and artifact_refresh >= 1, "
                              f"got {self.artifacts!r}, {self.artifact_refresh}")


def _batched_boxes(fn, x: torch.Tensor, bs: int = 256) -> torch.Tensor:
    return torch.cat([fn(x[i:i + bs]) for i in range(0, len(x), bs)]) if len(x) else \
        torch.zeros(0, 4, dtype=torch.long, device=x.device)


class Compressor(Component):
    """Turns a class's candidate exemplars (uint8 ``[N, C, H, W]``, selection order) into boxes
    (``boxes``); ``fit`` runs once per phase before the boxes are taken (``cim``: its phase-end
    steps). As a training component, the artifact augmentation of the new-class images: every
    phase (``official``), each around its own box (this compressor's boxes of the phase's new-class
    images under the current model, recomputed every ``artifact_refresh`` epochs), with probability
    ``artifact_prob x (epochs done // artifact_refresh)`` (0 until the first refresh: with fewer
    epochs per phase it never applies), compressed as stored and then given the batch's own crop
    and flip (``compressed_views``); ``random-box``: a random box on the augmented image,
    probability ``artifact_prob``, phases > 0. A changed batch is no longer one of the old-output cache's views
    (``view=None``): the old model then runs on the changed images. Draws from the run's generator;
    the epoch count and boxes are state (exact resume). Refused without exemplars."""
    Options = CompressorOptions
    needs_memory = True
    single_process = "its codes are not broadcast between ranks"
    with_boxes = True
    per_phase = ("boxes_",)

    def __init__(self, options, services):
        super().__init__(options, services)
        self.s = math.isqrt(options.eta)
        self.mode = options.resample          # nearest (official) | area
        self.stats: dict[str, float] = {}     # the last phase-end fit's (metrics.json, per phase)
        self.boxes_: torch.Tensor | None = None
        self.epochs_done = 0

    # ------------------------------------------------------------ the memory's side
    def fit(self, net, normalize, x, y, classes, memory_data, gen) -> None:
        pass

    def boxes(self, net, normalize, x: torch.Tensor, c: int) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def cam_view(self, normalize):
        """The network input a box's CAM is computed on: the whole stored image resized to the
        input (the run's ``Augmenter.whole``; official ``cam_trsf``, ``Resize((224, 224))`` of the
        whole image, ``utils/data.py``, the CAM then resized to the stored image,
        ``models/base.py:387``); ``normalize`` for a compressor without the run's augmenter."""
        aug = getattr(self.services, "augmenter", None)
        return normalize if aug is None else aug.whole

    # ------------------------------------------------------------ the training side: artifacts
    def probability(self) -> float:
        o = self.options
        return o.artifact_prob if o.artifacts == "random-box" else min(1.0, o.artifact_prob * (self.epochs_done // o.artifact_refresh))

    def phase_start(self, ctx):
        self.boxes_, self.epochs_done = None, 0

    def refresh_boxes(self, ctx) -> None:
        """The boxes ``[N, 4]`` of the phase's new-class training images (exemplar rows: empty)."""
        x, y = ctx.x, ctx.y
        boxes = torch.zeros(len(y), 4, dtype=torch.long, device=x.device)
        for c in ctx.phase.classes:
            idx = (y == c).nonzero().flatten()
            if len(idx):
                boxes[idx] = self.boxes(ctx.model, self.services.test_view, x[idx], c).to(x.device)
        self.boxes_ = boxes

    def epoch_end(self, ctx, epoch):
        self.epochs_done = epoch + 1
        o = self.options
        if o.artifacts == "official" and o.artifact_prob > 0 and self.epochs_done % o.artifact_refresh == 0:
            self.refresh_boxes(ctx)

    def before_step(self, step):
        p, batch, ctx = self.probability(), step.batch, step.ctx
        phase = ctx.phase
        if p <= 0 or (self.options.artifacts == "random-box" and phase.index == 0):
            return
        g = self.services.gen
        if self.options.artifacts == "random-box":
            x, changed = random_box_artifacts(batch.x, p, self.s, g, rows=batch.y >= phase.start, mode=self.mode)
        else:
            changed = (torch.rand(len(batch.y), generator=g, device=g.device).to(batch.y.device) < p) \
                & (batch.y >= phase.start)
            if not bool(changed.any()):
                return
            x = batch.x.clone()
            x[changed] = self.compressed_views(ctx.x, batch, changed).to(x.dtype)
        if bool(changed.any()):
            step.batch = batch._replace(x=x, view=None)

    def compressed_views(self, stored, batch, changed: torch.Tensor) -> torch.Tensor:
        """The rows ``changed [B]`` of a training batch as they would have been had their stored
        images been compressed around their own boxes before the augmentation, as the official code
        (``utils/data_manager.py:186-193``: ``BbxBlur`` on the stored image, then the train
        transform): each stored image (``stored[batch.idx]``, uint8) compressed at its stored
        resolution, then augmented by the batch's own parameters (``batch.aug``; None: a batch from
        outside the training loop, taken as unaugmented). Normalised ``[n, C, S, S]``."""
        rows = batch.idx[changed]
        raw = as_tensor(stored[rows])                                               # [n, C, H, W] uint8
        every = torch.ones(len(rows), dtype=torch.bool, device=raw.device)
        comp = own_box_artifacts(raw, self.boxes_[rows].to(raw.device), every, self.s, self.mode)
        drawn = batch.aug.rows(changed) if batch.aug is not None else Draw()
        return self.services.augmenter.apply(comp, drawn)[0]

    def state_dict(self):
        if not self.epochs_done:
            return {}
        return {"epochs_done": self.epochs_done, **({} if self.boxes_ is None else {"boxes": self.boxes_.cpu()})}

    def load_state_dict(self, state):
        self.epochs_done = int(state.get("epochs_done", 0))
        b = state.get("boxes")
        if b is not None:
            self.boxes_ = b.to(self.services.device)


@register("compressor", "full")
class FullCompressor(Compressor):
    """The whole image downsampled (no box): cost 1 / eta."""
    with_boxes = False

    def boxes(self, net, normalize, x, c):
        return torch.zeros(len(x), 4, dtype=torch.long, device=x.device)


@dataclass(frozen=True)
class CAMOptions(CompressorOptions):
    tau: float = option(0.6, alias="memory.compression.tau")    # CAM threshold of the mask (CIM Sec. 5)

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.tau <= 1:
            raise ConfigError(f"--memory.compression.tau must be in (0, 1], got {self.tau}")


@register("compressor", "cam-threshold")
class CAMCompressor(Compressor):
    """Boxes of the CIL model's CAM of the label class at threshold tau (the paper's baseline)."""
    Options = CAMOptions

    @torch.no_grad()
    def boxes(self, net, normalize, x, c):
        view = self.cam_view(normalize)

        def one(xb):
            out = net(view(xb))
            v = class_vectors(net.head).float()[c].expand(len(xb), -1)
            return boxes_from_cam(cam(out.maps[-1].float(), v, tuple(xb.shape[-2:])), self.options.tau)
        with eval_mode(net):
            return _batched_boxes(one, x)


@dataclass(frozen=True)
class CIMOptions(CAMOptions):
    # the per-epoch meta-iterations (official models/foster.py:155-196, 242-287)
    per_class: float = option(0.5, alias="components.cim-meta.per_class")   # per new class after each epoch (num_meta_iters_per_cls)
    lr: float = option(0.01, alias=("memory.compression.lr", "components.cim-meta.lr"))   # Adam lr of phi (phi_lr)
    weight_decay: float = option(5e-4, alias="components.cim-meta.weight_decay")  # Adam weight decay (models/foster.py:102, 116)
    batch_size: int = option(16, alias=("memory.compression.batch_size", "components.cim-meta.batch_size"))  # meta_batch_size
    inner_ratio: float = option(0.1, alias="components.cim-meta.inner_ratio")   # inner lr = this x the epoch's lr (lr_ratio)
    # the inner step's loss and parameters: the method's full training loss (FOSTER's: CE, the
    # auxiliary CE, the KD) on the extractor, the classifier left alone, as the official
    # models/foster.py meta step; "ce" / "all": CE of the logits on every trainable parameter (ours, earlier)
    inner_loss: str = option("method", alias="components.cim-meta.inner_loss")
    inner_params: str = option("backbone", alias="components.cim-meta.inner_params")
    # BatchNorm in the step: "running" = the CIL model in eval mode (official models/foster.py:155,
    # 242 self._network.eval()); "batch" = in training mode on each batch's own statistics, the
    # running ones left untouched (ours: with few batches per epoch the running statistics lag
    # the weights and the eval-mode forward of a young extractor explodes, RESULTS.md issue 23)
    bn: str = option("running", alias="components.cim-meta.bn")
    reg_weight: float = option(0.1, alias="memory.compression.reg_weight")   # mu, the memory regulariser mean(CAM^2)
    cls_weight: float = option(0.2, alias="memory.compression.cls_weight")   # mu', the CIM model's CE
    grad_clip: float = option(1.0, alias="memory.compression.grad_clip")     # phi's gradient-norm clip (max_phi_grad_norm)
    # extra steps at each phase end (official: none), Adam without weight decay, the inner step CE on
    # every trainable parameter at ``inner_lr`` (null: the run's --lr)
    iterations: int = option(0, alias="memory.compression.iterations")
    inner_lr: float | None = option(None, alias="memory.compression.inner_lr")

    def __post_init__(self):
        super().__post_init__()
        if self.per_class < 0 or not self.lr > 0 or self.weight_decay < 0 or self.batch_size < 1 \
                or not self.inner_ratio > 0 or self.iterations < 0 or self.reg_weight < 0 or self.cls_weight < 0 \
                or not self.grad_clip > 0 or (self.inner_lr is not None and not self.inner_lr > 0):
            raise ConfigError("components.cim: per_class, weight_decay, iterations, reg_weight, cls_weight >= 0; lr, "
                              "inner_ratio, grad_clip, inner_lr > 0 and batch_size >= 1 are expected")
        if self.inner_loss not in ("method", "ce") or self.inner_params not in ("backbone", "all") \
                or self.bn not in ("running", "batch"):
            raise ConfigError("components.cim: inner_loss must be method or ce, inner_params backbone or all, "
                              f"bn running or batch, got '{self.inner_loss}', '{self.inner_params}', '{self.bn}'")


@register("compressor", "cim")
class CIMCompressor(CAMCompressor):
    """Boxes of the CIM model's CAM at threshold tau. phi (the rationals in the CIL backbone's ReLU
    slots, ``attach``) is trained by the bilevel step (``cilearn.memory.cim.meta_steps``):

    * after every training epoch of every phase, ``max(1, int(per_class x new classes))``
      meta-iterations: Adam (lr 0.01, weight decay 5e-4) with a cosine schedule over the phase's
      epochs, gradient norm clipped at ``grad_clip`` (x sqrt 2 after the first phase, as the
      official code), the inner step the method's training loss on the extractor at
      ``inner_ratio`` x the epoch's lr; the CIL model in eval mode (``bn`` batch: on batch
      statistics, ``batch_statistics``). Batches (``MetaBatches``) of the phase's training set,
      train-augmented, from the run's generator; phi is the trainable extractors' rationals, a new
      extractor's started from the previous one's (``CIMModel.trained``, ``inherit``); Adam and
      the schedule are state, so a run stopped inside a phase resumes exactly. ``cim_meta_steps`` /
      ``cim_meta_seconds`` / ``cim_meta_skipped`` per phase in ``metrics.json``;
    * at each phase end, ``iterations`` more steps (0: none, the official), before the boxes.
    """
    Options = CIMOptions
    per_phase = ("boxes_", "opt", "sched")

    def __init__(self, options, services):
        super().__init__(options, services)
        self.model = CIMModel()
        self.opt = self.sched = None
        self.steps, self.seconds, self.skipped = 0, 0.0, 0
        self.pending: dict | None = None      # an epoch checkpoint's state, applied at the phase start

    @classmethod
    def resolve(cls, options, run):
        return {**options, "inner_lr": run.cfg.train.lr if options.get("inner_lr") is None else options["inner_lr"]}

    def attach(self, model):
        """The CIL network gets phi's rationals in its backbone's ReLU slots (ReLUs still outside
        the CIM forward), before any state is restored (its checkpoints hold them)."""
        self.model.ensure(model).freeze_phi()

    def phase_start(self, ctx):
        super().phase_start(ctx)
        o = self.options
        phi = self.model.ensure(ctx.model)          # rationals in a new extractor too
        phi.inherit()                               # ... starting from the previous extractor's
        phi.freeze_phi()
        phi.fallbacks = 0
        self.steps, self.seconds, self.skipped = 0, 0.0, 0
        self.opt = torch.optim.Adam(phi.parameters(), lr=o.lr, weight_decay=o.weight_decay)
        epochs = self.services.fit_settings(ctx.phase).epochs
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=max(epochs, 1))
        if self.pending is not None:
            self.apply(self.pending)

    def epoch_end(self, ctx, epoch):
        super().epoch_end(ctx, epoch)
        o, s, phase = self.options, self.services, ctx.phase
        if not bool((ctx.y >= phase.start).any()):
            return
        t0 = time.perf_counter()
        inner_lr = o.inner_ratio * lr_at(s.fit_settings(phase), epoch, 0, 1)
        clip = o.grad_clip * (1.0 if phase.index == 0 else math.sqrt(2))
        net = ctx.model
        # the phase's training set (new images and stored exemplars), train-augmented (official trainval_loader)
        batches = MetaBatches(ctx.x, ctx.y, o.batch_size, s.gen, lambda xb, g: s.augmenter.train(xb, g)[0])
        n = max(1, int(o.per_class * phase.num_new))
        inner = method_inner_loss(net, ctx.loss) if o.inner_loss == "method" and ctx.loss is not None else None
        with eval_mode(net) if o.bn == "running" else batch_statistics(net):
            skipped, _, _ = meta_steps(net, self.model, n, lambda: meta_batch(batches),
                                       self.opt, clip, self.s, inner_lr, o.reg_weight, o.cls_weight, self.mode,
                                       inner_loss=inner, only="backbone." if o.inner_params == "backbone" else "")
        self.steps += n
        self.skipped += skipped
        with warnings.catch_warnings():   # every step skipped so far: Adam has not stepped, the schedule
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)   # still advances
            self.sched.step()             # (the skips are in cim_meta_skipped, the run's warnings)
        self.seconds += time.perf_counter() - t0

    def fit(self, net, normalize, x, y, classes, memory_data, gen) -> None:
        """The phase-end steps (``iterations``; official: none)."""
        o = self.options
        self.model.ensure(net)
        if o.iterations == 0 or len(x) == 0:
            return
        if memory_data is not None:       # the new images and the stored exemplars, unaugmented
            x, y = torch.cat([x, memory_data[0]]), torch.cat([y, memory_data[1]])
        batches = MetaBatches(x, y, o.batch_size, gen, lambda xb, g: normalize(xb))
        with eval_mode(net):              # BatchNorm with running statistics, as the Mnemonics step
            opt = torch.optim.Adam(self.model.parameters(), lr=o.lr)
            skipped, first, last = meta_steps(net, self.model, o.iterations, lambda: meta_batch(batches),
                                              opt, o.grad_clip, self.s, o.inner_lr, o.reg_weight, o.cls_weight, self.mode)
        self.stats = {"cim_loss_first": first["loss"], "cim_loss_last": last["loss"],
                      "cim_mask_first": first["mask"], "cim_mask_last": last["mask"], "cim_skipped": skipped}

    @torch.no_grad()
    def boxes(self, net, normalize, x, c):
        view = self.cam_view(normalize)

        def one(xb):
            phi = self.model.ensure(net)
            y = torch.full((len(xb),), c, dtype=torch.long, device=xb.device)
            return boxes_from_cam(phi.masks(net, view(xb), y, tuple(xb.shape[-2:])), self.options.tau)
        with eval_mode(net):
            return _batched_boxes(one, x)

    def state_dict(self):
        st = super().state_dict()
        if self.opt is not None:          # (phi's coefficients are in the net's own state)
            st.update({"opt": self.opt.state_dict(), "sched": self.sched.state_dict(), "steps": self.steps,
                       "seconds": self.seconds, "skipped": self.skipped})
        return st

    def load_state_dict(self, state):
        super().load_state_dict(state)
        if "opt" in state:
            if self.opt is None:
                self.pending = state          # a phase-boundary state: applied when the phase starts
            else:
                self.apply(state)

    def apply(self, st: dict) -> None:
        self.pending = None
        self.opt.load_state_dict(st["opt"])
        self.sched.load_state_dict(st["sched"])
        self.steps, self.seconds, self.skipped = st["steps"], st["seconds"], st.get("skipped", 0)

    def diagnostics(self):
        out = {"cim_meta_steps": self.steps, "cim_meta_seconds": self.seconds, "cim_meta_skipped": self.skipped,
               "cim_fallback_boxes": self.model.fallbacks}
        self.steps, self.seconds, self.skipped = 0, 0.0, 0
        return out
