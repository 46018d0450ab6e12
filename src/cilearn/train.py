"""The one training loop. Methods never write their own epoch loop: they give ``fit`` a loss
function and the parameters to train; extra stages (balanced fine-tuning, teachers,
compression) call ``fit`` again.

Per step: a slice of a seeded permutation of the (uint8) training set, on the device or, for data
sets kept on the host (``cilearn.data.rows.HostRows``), that batch's rows fetched and moved to the
device; batched augmentation on the device, autocast (bf16) where enabled, one optimizer step.
No host sync inside an epoch: the loss is accumulated on the device and checked for NaN/inf
once per epoch.

Under torchrun (``cilearn.distributed``) the loop is the same: every rank draws the same
permutation and augmentation parameters for each global batch of ``batch_size`` and trains on its
contiguous part of it, through DistributedDataParallel; the stage starts from rank 0's model and
RNG state and ends with rank 0's model (BatchNorm statistics included) on every rank.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, NamedTuple

import torch

from . import distributed
from .data.augment import Augmenter, Draw
from .data.rows import HostRows
from .errors import CilearnError, ConfigError, one_line
from .progress import bar as progress_bar
from .progress import stage_line

if TYPE_CHECKING:
    from .checkpoint import Checkpointer


class Batch(NamedTuple):
    x: torch.Tensor              # normalised float [B, C, H, W]
    y: torch.Tensor              # incremental ids [B]
    idx: torch.Tensor            # indices into the training set [B]
    view: torch.Tensor | None    # augmentation view id [B] for finite policies, else None
    aug: Draw | None = None      # the augmentation's parameters of these rows (None: not from the loop)


# loss_fn(batch) -> (loss, {term name: detached scalar tensor})
LossFn = Callable[[Batch], tuple[torch.Tensor, dict[str, torch.Tensor]]]


class DivergenceError(CilearnError):
    """The loss became NaN or infinite."""


@dataclass
class FitSettings:
    epochs: int
    lr: float
    batch_size: int = 128
    optim: str = "sgd"                          # sgd | adam | adamw (config.TrainConfig.optim)
    clip_grad: float = 0.0                      # the gradient's global L2 norm clipped to this (0: none)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    warmup_epochs: int = 0                      # linear warm-up of the lr over the first epochs (DER)
    autocast_dtype: torch.dtype | None = None   # torch.bfloat16 or None (fp32)
    progress: bool = True                       # draw a bar (cilearn.progress.bars of train.progress)
    log: Callable[[str], None] | None = None    # where the finished stage's line goes (the run's log)
    drop_last: bool = False
    compile: bool = False                       # torch.compile the model's backbone for this stage (compiled)


@dataclass
class FitResult:
    seconds: float
    images: int
    loss: dict[str, float]       # mean of each term over the last epoch

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def make_optimizer(params: Iterable[torch.nn.Parameter], s: FitSettings) -> torch.optim.Optimizer:
    """SGD with momentum, or Adam / AdamW at PyTorch's betas (0.9, 0.999) and eps 1e-8 (L2P's,
    DualPrompt's and CODA-Prompt's reference optimisers use these)."""
    trained = [p for p in params if p.requires_grad]
    if s.optim == "adam":
        return torch.optim.Adam(trained, lr=s.lr, weight_decay=s.weight_decay)
    if s.optim == "adamw":
        return torch.optim.AdamW(trained, lr=s.lr, weight_decay=s.weight_decay)
    return torch.optim.SGD(trained, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)


def lr_at(s: FitSettings, epoch: int, step: int, steps_per_epoch: int) -> float:
    """Cosine: per step from lr to 0 over all epochs. Step: lr * gamma^(milestones passed). With
    ``warmup_epochs`` W, the first W epochs' steps are scaled linearly from 1/(W * steps) to 1 (DER's
    official code warms up per epoch; per step is cilearn's)."""
    if s.schedule == "cosine":
        t = (epoch * steps_per_epoch + step) / max(1, s.epochs * steps_per_epoch)
        lr = 0.5 * s.lr * (1 + math.cos(math.pi * t))
    else:
        lr = s.lr * s.gamma ** sum(epoch >= m for m in s.milestones)
    if epoch < s.warmup_epochs:
        lr *= (epoch * steps_per_epoch + step + 1) / (s.warmup_epochs * steps_per_epoch)
    return lr


def fit(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn, s: FitSettings,
        augmenter: Augmenter, gen: torch.Generator, params: Iterable[torch.nn.Parameter] | None = None,
        desc: str = "train", ckpt: "Checkpointer | None" = None,
        epoch_end: Callable[[int], None] | None = None) -> FitResult:
    """Train ``params`` (default: all of ``model``'s) on ``(x uint8, y)`` for ``s.epochs``.

    ``x``: uint8 ``[N, C, H, W]`` on the training device, or a ``HostRows`` view whose rows are
    fetched a batch at a time. With a ``ckpt``: saves the position every ``ckpt.every`` epochs, stops
    after the current step (checkpoint + ``Interrupted``) when a SIGINT/SIGTERM was received, and
    continues from a saved position when the run is resumed in the middle of this stage (``desc``
    names the stage). ``epoch_end(epoch)``: called after each finished epoch (0-based), after the
    checkpointer's observers, before a checkpoint of that epoch is written (the components'
    end-of-epoch work of the main stage). ``s.compile``: see ``compiled_backbone``."""
    if not s.compile:
        return _fit(model, x, y, loss_fn, s, augmenter, gen, params, desc, ckpt, epoch_end)
    with compiled_backbone(model):
        return _fit(model, x, y, loss_fn, s, augmenter, gen, params, desc, ckpt, epoch_end)


@contextlib.contextmanager
def compiled_backbone(model: torch.nn.Module):
    """``--compile``: for one training stage, ``model.backbone`` (the convolutional feature extractor,
    nearly all of the FLOPs; for DER/FOSTER the expandable backbone with all its extractors) runs
    through ``torch.compile`` (``nn.Module.compile``, in place: parameters, state_dict and
    checkpoints unchanged), forward and backward. The head, the loss terms, teachers and evaluation
    stay eager. Compilation happens on the first step (again when shapes change, e.g. a smaller last
    batch, or an extractor is added). Undone when the stage ends, so that teachers deep-copied from
    the model later do not call the compiled student. A compiler failure (no C++ compiler on a CPU
    machine, no Triton for the GPU, ...) stops the run with one line naming the option."""
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, torch.nn.Module):
        raise ConfigError(f"--train.compile: {type(model).__name__} has no backbone module to compile")
    from torch._dynamo.exc import TorchDynamoException
    backbone.compile()
    try:
        yield
    except TorchDynamoException as e:
        raise ConfigError(f"--train.compile: torch.compile failed here ({one_line(e)[:300]}); "
                          "run without --compile") from None
    finally:
        backbone._compiled_call_impl = None     # nn.Module's own switch back to the eager forward


def _fit(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn, s: FitSettings,
         augmenter: Augmenter, gen: torch.Generator, params: Iterable[torch.nn.Parameter] | None,
         desc: str, ckpt: "Checkpointer | None", epoch_end: Callable[[int], None] | None = None) -> FitResult:
    n = x.shape[0]
    host = isinstance(x, HostRows)    # images on the host: each step fetches its rows (perm on the CPU, once per epoch)
    if s.epochs == 0 or n == 0 or (ckpt is not None and ckpt.skip_stage(desc)):
        return FitResult(0.0, 0, {})
    own = {id(p) for m in model.modules() if getattr(m, "trained_by_component", False) for p in m.parameters()}
    # (a module flagged ``trained_by_component`` is trained by a component's own optimizer only)
    params = [p for p in (model.parameters() if params is None else params) if id(p) not in own]
    if not any(p.requires_grad for p in params):   # every parameter frozen (a frozen backbone and a prototype head)
        if s.log is not None:
            s.log(f"  {desc}: nothing to train (no parameter requires a gradient)")
        return FitResult(0.0, 0, {})
    opt = make_optimizer(params, s)
    bs = min(s.batch_size, n)
    steps = n // bs if s.drop_last else math.ceil(n / bs)
    world = distributed.world_size()
    if world > 1:
        if 0 < n % bs < world and steps > 1:   # a last batch too small to give every rank a sample
            steps = n // bs
        distributed.broadcast_module_(model)    # the stage starts from rank 0's model and RNG
        distributed.broadcast_generator_(gen)
    step_fn = distributed.data_parallel(loss_fn, [p for p in params if p.requires_grad])
    # position: epoch, step, this epoch's permutation, running sums; carried over on resume
    epoch0, step0, perm, perm_host, done_images, done_seconds = 0, 0, None, None, 0, 0.0
    total = torch.zeros((), device=x.device)
    sums: dict[str, torch.Tensor] = {}
    resume = ckpt.take_resume(desc) if ckpt is not None else None
    if resume is not None:
        with ckpt.restoring():
            opt.load_state_dict(resume["opt"])
            epoch0, step0, done_images, done_seconds = resume["epoch"], resume["step"], resume["images"], resume["seconds"]
            perm = resume["perm"].to(x.device) if resume["perm"] is not None else None
            perm_host = perm.cpu() if host and perm is not None else None
            total = resume["total"].to(x.device)
            sums = {k: v.to(x.device) for k, v in resume["sums"].items()}
        if distributed.rank() > 0:              # the saved sums are the global ones: counted once
            total, sums = torch.zeros_like(total), {k: torch.zeros_like(v) for k, v in sums.items()}

    def position(epoch: int, step: int) -> dict:
        end = step >= steps
        t, sm = (total, sums) if end or world == 1 else reduced(total, sums)
        return {"desc": desc, "epoch": epoch + 1 if end else epoch, "step": 0 if end else step,
                "perm": None if end else perm.cpu(), "total": (torch.zeros(()) if end else t.cpu()),
                "sums": {} if end else {k: v.cpu() for k, v in sm.items()}, "opt": opt.state_dict(),
                "images": seen_images, "seconds": done_seconds + time.perf_counter() - start}

    model.train()
    bar = progress_bar(s.epochs, desc, "ep", initial=epoch0) if s.progress and distributed.is_main() else None
    start = time.perf_counter()
    seen_images = done_images
    terms_mean: dict[str, float] = {}
    last_loss = math.nan                          # the last epoch's mean loss (the stage line)
    for epoch in range(epoch0, s.epochs):
        if perm is None:
            perm = torch.randperm(n, generator=gen, device=gen.device).to(x.device)
            perm_host = perm.cpu() if host else None
        stop = False
        for step in range(step0, steps):
            idx = perm[step * bs:(step + 1) * bs]            # the global batch
            span = distributed.shard_span(len(idx))          # this rank's part (all of it alone)
            mine = idx[span]
            xu8 = x.fetch(perm_host[step * bs:(step + 1) * bs][span]) if host else x[mine]
            drawn = augmenter.draw(xu8.shape, gen, span, len(idx), xu8.device)
            xb, view = augmenter.apply(xu8, drawn)
            for g in opt.param_groups:
                g["lr"] = lr_at(s, epoch, step, steps)
            with torch.autocast(device_type=x.device.type, dtype=s.autocast_dtype or torch.bfloat16,
                                enabled=s.autocast_dtype is not None):
                loss, terms = step_fn(Batch(xb, y[mine], mine, view, drawn))
            opt.zero_grad(set_to_none=True)
            if world > 1:   # weight by this rank's share of the batch: DDP's mean is the global mean's gradient
                share = len(mine) / len(idx)
                loss, terms = loss * share, {k: v * share for k, v in terms.items()}
                (loss * world).backward()
            else:
                loss.backward()
            if s.clip_grad > 0:      # (after DDP's all-reduce: every rank clips the same global gradient)
                torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], s.clip_grad)
            opt.step()
            total += loss.detach()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0) + v.detach()
            seen_images += len(idx)
            stop = ckpt is not None and distributed.any_rank(ckpt.stop_requested)
            if stop and step + 1 < steps:
                ckpt.save_fit(model, position(epoch, step + 1))
                if bar is not None:
                    bar.close()
                raise ckpt.interrupted(f"{desc}, epoch {epoch + 1}, step {step + 1} of {steps}")
        step0 = 0
        if world > 1:
            total, sums = reduced(total, sums)
        total_f = float(total)  # one host sync per epoch
        if not math.isfinite(total_f):
            raise DivergenceError(f"{desc}: the loss became {total_f} in epoch {epoch + 1}; "
                                  "lower --lr or check the data" + (ckpt.kept_note() if ckpt else ""))
        terms_mean = {k: float(v) / steps for k, v in sums.items()}
        last_loss = total_f / steps
        if ckpt is not None:
            ckpt.end_epoch(desc, epoch, s.epochs, {"loss": total_f / steps, **terms_mean,
                                                   "lr": opt.param_groups[0]["lr"]})
        if epoch_end is not None:
            epoch_end(epoch)
        if bar is not None:
            el = time.perf_counter() - start
            bar.set_postfix(loss=f"{total_f / steps:.3f}", img_s=f"{(seen_images - done_images) / max(el, 1e-9):.0f}")
            bar.update(1)
        if stop:    # requested in the epoch's last step: stopped after the epoch's end (its loss, its hooks)
            ckpt.save_fit(model, position(epoch, steps))
            if bar is not None:
                bar.close()
            raise ckpt.interrupted(f"{desc}, at the end of epoch {epoch + 1} of {s.epochs}")
        if ckpt is not None and ckpt.every and (epoch + 1) % ckpt.every == 0 and epoch + 1 < s.epochs:
            ckpt.save_fit(model, position(epoch, steps))
        perm = None
        total = torch.zeros((), device=x.device)
        sums = {}
    if bar is not None:
        bar.close()
    distributed.broadcast_module_(model)          # rank 0's BatchNorm statistics everywhere
    seconds = done_seconds + time.perf_counter() - start
    if s.log is not None:
        s.log(stage_line(desc, s.epochs, "epoch", seconds, last_loss))
    return FitResult(seconds, seen_images, terms_mean)


def reduced(total: torch.Tensor, sums: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The running loss ``total`` (scalar) and per-term ``sums`` summed over the ranks (each rank's
    are weighted by its share of every batch, so the sums are those of the global batches); one
    all-reduce."""
    keys = sorted(sums)
    flat = torch.stack([total.float()] + [sums[k].float() for k in keys])
    distributed.all_reduce_sum_(flat)
    return flat[0], {k: flat[i + 1] for i, k in enumerate(keys)}
