"""Exemplar compression (registry ``COMPRESSORS``, ``--memory.compressor``), after CIM: Luo, Liu,
Schiele & Sun, "Class-Incremental Exemplar Compression for Class-Incremental Learning", CVPR 2023.

An exemplar keeps a tight bounding box B of its discriminative pixels at full resolution; the rest
is downsampled by ``s = sqrt(eta)`` per side and upsampled back, both nearest-neighbour as the
official code (``utils/transform.py``; ``--memory.compression.resample area``: area average and
bilinear, cilearn's earlier choice): ``x~ = M_B * x + (1 - M_B) * up(down(x))`` (paper Sec. 3,
Fig. 2).

* ``none``: exemplars stored as they are (cost 1 image each).
* ``full``: the whole image downsampled, no box (the paper's ablation baseline): cost ``1 / eta``.
* ``cam-threshold``: B from the CAM of the label class (the head's class vector dotted with the
  last-stage maps), upsampled to the image, min-max normalised, thresholded at ``tau`` (0.6).
* ``cim``: the same box rule on the CAM of the CIM model (``CIMModel``): the CIL model's
  convolutions shared, with learnable activation parameters phi of its own, trained at each phase
  end by the paper's bilevel step (``cim_outer_loss``).

**What is stored is what is counted** (``Codes``): the box is snapped outwards to the ``s``-grid,
so the downsampled cells under it are exactly redundant (they are the average of box pixels) and
are not stored. One exemplar is its box pixels (``C * area``), the downsampled cells outside the
box (``C * (HW - area) / eta`` when ``s`` divides H and W) and, for box compressors, 4 int16
coordinates: ``C * HW * (a + (1 - a) / eta) + 8`` bytes, the paper's cost ``a + (1 - a) / eta`` in
full-image units plus the coordinates. The budget (image units: ``units * C * H * W`` bytes per
class) is met in these bytes; the herding order decides which exemplars are kept (the longest
prefix that fits), also when a class's share shrinks. Where a new class's boxes would keep no more
exemplars than whole images (boxes near the whole image cost it plus the coordinates), the class
stores whole images (``Memory.update``). The decoded images the training reads are a working copy;
checkpoints hold the codes only.
"""
from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from ..components import Component, register
from ..errors import ConfigError
from ..models.net import batch_statistics, eval_mode
from ..registry import Registry
from ..train import Batch, lr_at

if TYPE_CHECKING:
    from ..config import CompressionConfig

COMPRESSORS: Registry = Registry("exemplar compressor")
BOX_BYTES = 8            # (y0, x0, y1, x1) as int16


# ---------------------------------------------------------------- pure functions
def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 at least (half precision widened; float64 kept for gradient checks)."""
    return t if t.dtype == torch.float64 else t.float()


RESAMPLE = ("nearest", "area")


def _cell_rows(n: int, s: int, device) -> torch.Tensor:
    """The pixel each of the ``ceil(n / s)`` cells of a side samples: its centre ``s i + s // 2``
    (PIL's nearest, which the official code uses), the last cell's clipped into the image."""
    return (torch.arange(math.ceil(n / s), device=device) * s + s // 2).clamp(max=n - 1)


def downsample(x: torch.Tensor, s: int, mode: str = "nearest") -> torch.Tensor:
    """``[N, C, H, W]`` -> ``[N, C, ceil(H/s), ceil(W/s)]`` float. ``nearest``: each s x s cell's
    centre pixel; ``area``: the cell's mean."""
    if s == 1:
        return _wide(x)
    if mode == "area":
        return F.avg_pool2d(_wide(x), s, s, ceil_mode=True, count_include_pad=False)
    H, W = x.shape[-2:]
    return _wide(x).index_select(-2, _cell_rows(H, s, x.device)).index_select(-1, _cell_rows(W, s, x.device))


def upsample(low: torch.Tensor, size: tuple[int, int], s: int = 1, mode: str = "nearest") -> torch.Tensor:
    """Cells ``[N, C, h, w]`` back to ``size``. ``nearest``: each pixel takes its cell's value
    (pixel I of a side is in cell I // s); ``area``: bilinear."""
    if low.shape[-2:] == size:
        return low
    if mode == "area":
        return F.interpolate(low, size=size, mode="bilinear", align_corners=False)
    H, W = size
    rows = torch.arange(H, device=low.device) // s
    cols = torch.arange(W, device=low.device) // s
    return low.index_select(-2, rows).index_select(-1, cols)


def blur(x: torch.Tensor, s: int, mode: str = "nearest") -> torch.Tensor:
    """``up(down(x))``: the downsampled image at full size (float)."""
    return upsample(downsample(x, s, mode), tuple(x.shape[-2:]), s, mode)


def class_vectors(head: nn.Module) -> torch.Tensor:
    """``[K, D]``: the vector whose dot product with the embedding gives class k's score, up to a
    per-image factor that min-max normalisation removes (linear: its rows; cosine: normalised rows;
    LSC: the mean of a class's normalised proxies)."""
    w = head.weight
    if hasattr(head, "proxies"):
        return F.normalize(w, dim=1).view(-1, head.proxies, w.shape[1]).mean(1)
    return F.normalize(w, dim=1) if hasattr(head, "sigma") else w


def cam(maps: torch.Tensor, vectors: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Class activation maps ``[B, H, W]`` in [0, 1]: ``sum_d vectors[b, d] * maps[b, d]``
    (``maps [B, D, h, w]``, ``vectors [B, D]``: each image's class), upsampled (bilinear) to
    ``size`` and min-max normalised per image (a constant map gives all ones)."""
    m = _wide(torch.einsum("bd,bdhw->bhw", vectors.to(maps.dtype), maps))
    m = F.interpolate(m[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    lo = m.flatten(1).min(1).values.view(-1, 1, 1)
    hi = m.flatten(1).max(1).values.view(-1, 1, 1)
    span = hi - lo
    return torch.where(span > 0, (m - lo) / span.clamp_min(1e-12), torch.ones_like(m))


def boxes_from_cam(c: torch.Tensor, tau: float) -> torch.Tensor:
    """Tight bounding boxes ``[B, 4]`` (y0, x0, y1, x1; ends exclusive) of ``c >= tau``
    (``c [B, H, W]`` in [0, 1]; its maximum is 1, so no mask is empty)."""
    mask = c >= tau
    rows, cols = mask.any(2), mask.any(1)                                     # [B, H], [B, W]
    H, W = c.shape[1:]
    ar_h = torch.arange(H, device=c.device)
    ar_w = torch.arange(W, device=c.device)
    y0 = torch.where(rows, ar_h, H).min(1).values
    y1 = torch.where(rows, ar_h + 1, 0).max(1).values
    x0 = torch.where(cols, ar_w, W).min(1).values
    x1 = torch.where(cols, ar_w + 1, 0).max(1).values
    return torch.stack([y0, x0, y1, x1], 1).long()


def snap(boxes: torch.Tensor, s: int, H: int, W: int) -> torch.Tensor:
    """Boxes widened to the ``s``-grid (starts down, ends up to multiples of s, clipped to H, W), so
    that each downsampled cell is wholly inside or wholly outside the box. Empty boxes stay empty."""
    y0, x0, y1, x1 = boxes.unbind(1)
    empty = (y1 <= y0) | (x1 <= x0)
    out = torch.stack([y0 // s * s, x0 // s * s, ((y1 + s - 1) // s * s).clamp(max=H),
                       ((x1 + s - 1) // s * s).clamp(max=W)], 1)
    return torch.where(empty[:, None], torch.zeros_like(out), out)


def inside_cells(boxes: torch.Tensor, s: int, h: int, w: int) -> torch.Tensor:
    """``[N, h, w]`` bool: the downsampled cells covered by each (snapped) box."""
    i = torch.arange(h, device=boxes.device).view(1, h, 1)
    j = torch.arange(w, device=boxes.device).view(1, 1, w)
    y0, x0, y1, x1 = (b.view(-1, 1, 1) for b in boxes.unbind(1))
    return (i * s >= y0) & (i * s < y1) & (j * s >= x0) & (j * s < x1)


def code_values(boxes: torch.Tensor, shape: tuple[int, int, int], s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``([N], [N])``: the values each exemplar's code stores, box pixels ``C * area`` and
    downsampled cells outside the box ``C * cells``."""
    C, H, W = shape
    h, w = math.ceil(H / s), math.ceil(W / s)
    area = (boxes[:, 2] - boxes[:, 0]).clamp_min(0) * (boxes[:, 3] - boxes[:, 1]).clamp_min(0)
    outside = h * w - inside_cells(boxes, s, h, w).flatten(1).sum(1)
    return C * area, C * outside


def code_bytes(boxes: torch.Tensor, shape: tuple[int, int, int], s: int, element_size: int = 1,
               with_boxes: bool = True) -> torch.Tensor:
    """``[N]`` bytes of each exemplar's code: ``C * (box area + cells outside the box) *
    element_size`` (+ ``BOX_BYTES`` when boxes are stored)."""
    sharp, coarse = code_values(boxes, shape, s)
    return (sharp + coarse) * element_size + (BOX_BYTES if with_boxes else 0)


def paper_cost(boxes: torch.Tensor, H: int, W: int, eta: int) -> torch.Tensor:
    """``[N]`` the paper's cost in full images: ``a + (1 - a) / eta``, a = box area / image area."""
    a = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).float() / (H * W)
    return a + (1 - a) / eta


@dataclass
class Codes:
    """One class's compressed exemplars, in selection order: what the memory stores."""
    boxes: torch.Tensor          # [n, 4] int64 (y0, x0, y1, x1), snapped to the s-grid; empty: (0, 0, 0, 0)
    sharp: torch.Tensor          # [sum of C * area] box pixels at full resolution (the images' dtype)
    coarse: torch.Tensor         # [sum of C * cells outside the box] downsampled cells
    shape: tuple[int, int, int]  # (C, H, W)
    s: int                       # downsampling per side, sqrt(eta)
    with_boxes: bool             # box coordinates are part of the code (full: no box)
    mode: str = "nearest"        # resampling of the cells outside the box (RESAMPLE)

    def __len__(self) -> int:
        return len(self.boxes)

    def sizes(self) -> torch.Tensor:
        return code_bytes(self.boxes, self.shape, self.s, self.sharp.element_size(), self.with_boxes)

    @property
    def nbytes(self) -> int:
        return int(self.sizes().sum()) if len(self) else 0

    @property
    def image_bytes(self) -> int:
        """Bytes of one whole uint8 image, ``C * H * W``: one full-image unit of the budget."""
        return math.prod(self.shape)

    def head(self, n: int) -> "Codes":
        """The first ``n`` exemplars."""
        sharp, coarse = code_values(self.boxes, self.shape, self.s)
        return Codes(self.boxes[:n], self.sharp[: int(sharp[:n].sum())], self.coarse[: int(coarse[:n].sum())],
                     self.shape, self.s, self.with_boxes, self.mode)

    def state(self) -> dict:
        return {"boxes": self.boxes.cpu(), "sharp": self.sharp.cpu(), "coarse": self.coarse.cpu(),
                "shape": list(self.shape), "s": self.s, "with_boxes": self.with_boxes, "mode": self.mode}

    @classmethod
    def from_state(cls, st: dict, device) -> "Codes":
        return cls(st["boxes"].to(device), st["sharp"].to(device), st["coarse"].to(device), tuple(st["shape"]),
                   int(st["s"]), bool(st["with_boxes"]), str(st.get("mode", "area")))   # (older checkpoints: area)


def _store_dtype(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return v.round().clamp(0, 255).to(torch.uint8) if x.dtype == torch.uint8 else v.to(x.dtype)


def encode(x: torch.Tensor, boxes: torch.Tensor, s: int, with_boxes: bool = True, mode: str = "nearest") -> Codes:
    """Codes of images ``x [N, C, H, W]`` (uint8, or float pixels in [0, 255]) with boxes
    ``[N, 4]`` (snapped here to the s-grid), the cells resampled by ``mode``."""
    N, C, H, W = x.shape
    boxes = snap(boxes.to(x.device).long(), s, H, W)
    low = _store_dtype(x, downsample(x, s, mode))                             # [N, C, h, w]
    h, w = low.shape[-2:]
    inside = inside_cells(boxes, s, h, w)                                     # [N, h, w]
    sharp = [x[i, :, y0:y1, x0:x1].reshape(-1) for i, (y0, x0, y1, x1) in enumerate(boxes.tolist())]
    coarse = low.permute(0, 2, 3, 1)[~inside]                                 # [cells, C], exemplar-major
    empty = x.new_zeros(0)
    return Codes(boxes, torch.cat(sharp) if sharp else empty, coarse.reshape(-1), (C, H, W), s, with_boxes, mode)


def decode(codes: Codes) -> torch.Tensor:
    """``[n, C, H, W]`` images (the codes' dtype): the stored cells, those under the box recomputed
    from the box pixels (the value encode would have stored), upsampled, the box pasted."""
    C, H, W = codes.shape
    n, s = len(codes), codes.s
    dev, dtype = codes.sharp.device, codes.sharp.dtype
    if n == 0:
        return torch.zeros(0, C, H, W, dtype=dtype, device=dev)
    h, w = math.ceil(H / s), math.ceil(W / s)
    inside = inside_cells(codes.boxes, s, h, w)
    cells = torch.zeros(n, h, w, C, dtype=dtype, device=dev)
    cells[~inside] = codes.coarse.view(-1, C)
    sharp_sizes, _ = code_values(codes.boxes, codes.shape, s)
    crops = torch.split(codes.sharp, sharp_sizes.tolist())
    low = cells.permute(0, 3, 1, 2).float()                                   # [n, C, h, w]
    for i, ((y0, x0, y1, x1), crop) in enumerate(zip(codes.boxes.tolist(), crops)):
        if y1 > y0 and x1 > x0:
            patch = _store_dtype(codes.sharp, downsample(crop.view(1, C, y1 - y0, x1 - x0), s, codes.mode))[0]
            low[i, :, y0 // s: y0 // s + patch.shape[1], x0 // s: x0 // s + patch.shape[2]] = patch.float()
    out = _store_dtype(codes.sharp, upsample(low, (H, W), s, codes.mode))
    for i, ((y0, x0, y1, x1), crop) in enumerate(zip(codes.boxes.tolist(), crops)):
        if y1 > y0 and x1 > x0:
            out[i, :, y0:y1, x0:x1] = crop.view(C, y1 - y0, x1 - x0)
    return out


@torch.no_grad()
def compressed_features(net: nn.Module, normalize, x: torch.Tensor, bs: int = 256) -> torch.Tensor:
    """Embeddings ``[N, D]`` of (decoded, compressed) images ``x [N, C, H, W]`` under ``net`` in eval
    mode, in batches: what the official code herds on (``models/base.py:253-283``)."""
    with eval_mode(net):
        return torch.cat([net(normalize(x[i:i + bs])).embedding.float() for i in range(0, len(x), bs)])


def fit_prefix(sizes: torch.Tensor, budget_bytes: float) -> int:
    """How many of the first exemplars (bytes ``sizes [N]``, in selection order) fit the budget."""
    return int((sizes.cumsum(0) <= budget_bytes).sum()) if len(sizes) else 0


def random_box_artifacts(x: torch.Tensor, prob: float, s: int, gen: torch.Generator,
                         rows: torch.Tensor | None = None, mode: str = "nearest") -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's artifact augmentation of new-class images: each row of ``x [B, C, H, W]``
    (normalised float; ``rows [B]`` bool: the eligible ones) is, with probability ``prob``,
    compressed around a random box (side 25-100% of the image's, uniform position): outside it
    ``up(down(x))``. Returns (images, changed [B] bool). Down/upsampling are linear and the
    normalisation is a per-channel affine map, so this equals compressing the raw pixels."""
    B, _, H, W = x.shape
    dev = gen.device
    u = torch.rand(B, 5, generator=gen, device=dev).to(x.device)
    changed = u[:, 0] < prob
    if rows is not None:
        changed &= rows
    if not bool(changed.any()):
        return x, changed
    bh = (H * (0.25 + 0.75 * u[:, 1])).long().clamp(1, H)
    bw = (W * (0.25 + 0.75 * u[:, 2])).long().clamp(1, W)
    y0 = ((H - bh + 1) * u[:, 3]).long().clamp(max=H - 1)
    x0 = ((W - bw + 1) * u[:, 4]).long().clamp(max=W - 1)
    ii = torch.arange(H, device=x.device).view(1, H, 1)
    jj = torch.arange(W, device=x.device).view(1, 1, W)
    inbox = (ii >= y0.view(-1, 1, 1)) & (ii < (y0 + bh).view(-1, 1, 1)) & (jj >= x0.view(-1, 1, 1)) \
        & (jj < (x0 + bw).view(-1, 1, 1))
    keep = inbox | ~changed.view(-1, 1, 1)                                    # [B, H, W]
    out = torch.where(keep[:, None], x, blur(x, s, mode).to(x.dtype))
    return out, changed


@dataclass(frozen=True)
class ArtifactOptions:
    # official: each new-class image compressed around its own box, probability stepped up by
    # ``prob`` every ``refresh`` epochs of a phase (0 before the first refresh; official
    # models/foster.py:137, 214 with cam_update_interval 40, randombbxblur_prob_incre 0.1), boxes
    # recomputed at each refresh; random-box: cilearn's earlier form (a random box, fixed ``prob``,
    # phases > 0)
    mode: str = "official"
    prob: float = 0.1     # the ramp's step (official) or the fixed probability (random-box); --memory.compression.artifact-prob
    refresh: int = 40     # epochs between box refreshes and ramp steps (official)

    def __post_init__(self):
        if not 0 <= self.prob <= 1:
            raise ConfigError(f"components.artifacts.prob must be in [0, 1], got {self.prob}")
        if self.mode not in ("official", "random-box") or self.refresh < 1:
            raise ConfigError(f"components.artifacts: mode must be official or random-box and refresh >= 1, "
                              f"got {self.mode!r}, {self.refresh}")


def own_box_artifacts(x: torch.Tensor, boxes: torch.Tensor, changed: torch.Tensor, s: int,
                      mode: str = "nearest") -> torch.Tensor:
    """Rows ``changed [B]`` of ``x [B, C, H, W]`` compressed around their own boxes ``[B, 4]``
    (y0, x0, y1, x1): outside the box ``up(down(x))``, inside the pixels as they are."""
    H, W = x.shape[-2:]
    ii = torch.arange(H, device=x.device).view(1, H, 1)
    jj = torch.arange(W, device=x.device).view(1, 1, W)
    y0, x0, y1, x1 = (b.view(-1, 1, 1).to(x.device) for b in boxes.unbind(1))
    inbox = (ii >= y0) & (ii < y1) & (jj >= x0) & (jj < x1)                      # [B, H, W]
    keep = inbox | ~changed.view(-1, 1, 1)
    return torch.where(keep[:, None], x, blur(x, s, mode).to(x.dtype))


@register("compressor", "artifacts")
class Artifacts(Component):
    """The training side of exemplar compression (CIM, Luo et al. 2023, Sec. 4.3): new-class images
    of a training batch compressed like exemplars, so that compression artifacts do not tell the
    old classes (the compressed exemplars) from the new. ``official`` (default): every phase; each
    image around its own box (the compressor's boxes of the phase's new-class images under the
    current model, recomputed every ``refresh`` epochs), with probability
    ``prob x (epochs done // refresh)`` (0 until the first refresh: with fewer than ``refresh``
    epochs per phase it never applies). ``random-box``: a random box, probability ``prob``, phases
    > 0. A changed batch is no longer one of the old-output cache's views (``view=None``): the old
    model then runs on the changed images. Draws from the run's generator; the epoch count and
    boxes are component state (exact resume). In every run with an exemplar compressor."""
    Options = ArtifactOptions

    def __init__(self, options, services):
        super().__init__(options, services)
        self.needs_old_model = options.mode == "random-box"
        self.s, self.start, self.mode = 1, 0, "nearest"
        self.model = self.data = self.comp = self.boxes = self.phase = None
        self.epochs_done = 0

    def phase_start(self, phase, model, old_model, data):
        comp = data.memory.compressor
        self.s, self.start, self.mode, self.comp = comp.s, phase.start, comp.mode, comp
        self.model, self.data, self.boxes, self.epochs_done, self.phase = model, data, None, 0, phase

    def probability(self) -> float:
        o = self.options
        return o.prob if o.mode == "random-box" else min(1.0, o.prob * (self.epochs_done // o.refresh))

    def refresh_boxes(self, phase) -> None:
        """The compressor's boxes ``[N, 4]`` of the phase's new-class training images (exemplar rows: empty)."""
        x, y = self.data.x, self.data.y
        boxes = torch.zeros(len(y), 4, dtype=torch.long, device=x.device)
        for c in phase.classes:
            idx = (y == c).nonzero().flatten()
            if len(idx):
                boxes[idx] = self.comp.boxes(self.model, self.services.test_view, x[idx], c).to(x.device)
        self.boxes = boxes

    def epoch_end(self, phase, epoch):
        self.epochs_done = epoch + 1
        o = self.options
        if o.mode == "official" and o.prob > 0 and self.epochs_done % o.refresh == 0:
            self.refresh_boxes(phase)

    def batch(self, batch):
        p = self.probability()
        if p <= 0:
            return batch
        if self.options.mode == "random-box":
            x, changed = random_box_artifacts(batch.x, p, self.s, self.services.gen,
                                              rows=batch.y >= self.start, mode=self.mode)
        else:
            g = self.services.gen
            changed = (torch.rand(len(batch.y), generator=g, device=g.device).to(batch.y.device) < p) \
                & (batch.y >= self.start)
            if not bool(changed.any()):
                return batch
            x = own_box_artifacts(batch.x, self.boxes[batch.idx], changed, self.s, self.mode)
        return batch._replace(x=x, view=None) if bool(changed.any()) else batch

    def state_dict(self):
        if not self.epochs_done:
            return {}
        return {"epochs_done": self.epochs_done, **({} if self.boxes is None else {"boxes": self.boxes.cpu()})}

    def load_state_dict(self, state):
        self.epochs_done = int(state.get("epochs_done", 0))
        b = state.get("boxes")
        if b is not None and self.data is not None:
            self.boxes = b.to(self.data.x.device)

    def phase_end(self, phase, model, data):
        self.model = self.data = self.boxes = None
        self.epochs_done = 0


def cil_split(net: nn.Module, only: str = "") -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The CIL model's tensors for the CIM step's inner update: (its trainable parameters whose
    names start with ``only``, phi's rationals excepted, as fresh leaves; everything else). phi's
    coefficients stay the net's own tensors (the outer gradient reaches them through every
    forward); the other parameters and the buffers are detached. ``only="backbone."``: the
    official inner step, which leaves the classifier alone."""
    phi = phi_names(net)
    trainable = {k: p.detach().clone().requires_grad_(True) for k, p in net.named_parameters()
                 if p.requires_grad and k.startswith(only) and k not in phi}
    fixed = {k: (p if k in phi else p.detach()) for k, p in net.named_parameters() if k not in trainable}
    fixed.update({k: b.detach() for k, b in net.named_buffers()})
    return trainable, fixed


class _LossOf(nn.Module):
    """``loss_fn`` (a ``PhaseData.loss``, which runs ``net``) as a module holding ``net``, so
    that ``functional_call`` can run it with some of ``net``'s parameters replaced."""

    def __init__(self, net: nn.Module, loss_fn):
        super().__init__()
        self.net, self.loss_fn = net, loss_fn

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.loss_fn(batch)[0]


def method_inner_loss(net: nn.Module, loss_fn):
    """``inner(params, x, y) -> scalar``: the phase's full training loss ``loss_fn`` of the batch
    ``(x [B, C, H, W] normalised, y [B])`` with ``net``'s parameters ``params`` (names as in
    ``net``) in place of its own; the teacher's outputs computed on ``x`` (``view`` None)."""
    holder = _LossOf(net, loss_fn)

    def inner(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        batch = Batch(x, y, torch.arange(len(y), device=y.device), None)
        return functional_call(holder, {f"net.{k}": v for k, v in params.items()}, (batch,))
    return inner


def phi_step(loss: torch.Tensor, params: list[nn.Parameter], opt: torch.optim.Optimizer, clip: float) -> bool:
    """One step of phi's optimizer on ``loss`` (gradient norm clipped at ``clip``); False, and
    no update, when the loss or a gradient is not finite (a young network's eval-mode forward can
    overflow, docs/methods/cim.md)."""
    grads = [torch.zeros_like(p) if g is None else g
             for p, g in zip(params, torch.autograd.grad(loss, params, allow_unused=True))]
    if not (torch.isfinite(loss) and all(bool(torch.isfinite(g).all()) for g in grads)):
        return False
    for p, g in zip(params, grads):
        p.grad = g
    torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()
    return True


def meta_batch(x: torch.Tensor, y: torch.Tensor, old: tuple[torch.Tensor, torch.Tensor] | None, bs: int,
               gen: torch.Generator, normalize) -> tuple:
    """One CIM step's data: ``bs`` new images ``(x, y)`` to compress and ``bs`` more as validation,
    and with exemplars ``old`` (uint8, labels) ``bs`` of them for the inner step and ``bs`` more for
    the validation. Returns normalised ``(new_x, new_y, ex_x | None, ex_y | None, val_x, val_y)``."""
    pick = torch.randint(len(x), (2 * bs,), generator=gen, device=gen.device).to(x.device)
    new, val = pick[:bs], pick[bs:]
    ex_x = ex_y = None
    val_x, val_y = x[val], y[val]
    if old is not None:
        mx, my = old
        e = torch.randint(len(mx), (2 * bs,), generator=gen, device=gen.device).to(mx.device)
        ex_x, ex_y = normalize(mx[e[:bs]]), my[e[:bs]]
        val_x, val_y = torch.cat([val_x, mx[e[bs:]]]), torch.cat([val_y, my[e[bs:]]])
    return normalize(x[new]), y[new], ex_x, ex_y, normalize(val_x), val_y


@dataclass(frozen=True)
class CIMMetaOptions:
    per_class: float = 0.5        # meta-iterations per new class after each epoch (official num_meta_iters_per_cls)
    lr: float = 0.01              # Adam lr of phi (official phi_lr)
    weight_decay: float = 5e-4    # Adam weight decay of phi (official models/foster.py:102, 116)
    batch_size: int = 16          # new images (and as many exemplars) per meta-iteration (official meta_batch_size)
    inner_ratio: float = 0.1      # the inner step's lr: this x the CIL model's lr of the epoch (official lr_ratio)
    # the inner step's loss and parameters: the method's full training loss (FOSTER's: CE, the
    # auxiliary CE, the KD) on the extractor, the classifier left alone, as the official
    # models/foster.py meta step; "ce" / "all": CE of the logits on every trainable parameter (ours, earlier)
    inner_loss: str = "method"    # method | ce
    inner_params: str = "backbone"   # backbone | all
    # BatchNorm in the step: "running" = the CIL model in eval mode (official models/foster.py:155,
    # 242 self._network.eval()); "batch" = in training mode on each batch's own statistics, the
    # running ones left untouched (ours: with few batches per epoch the running statistics lag
    # the weights and the eval-mode forward of a young extractor explodes, RESULTS.md issue 23)
    bn: str = "running"           # running | batch

    def __post_init__(self):
        if self.per_class < 0 or self.lr <= 0 or self.weight_decay < 0 or self.batch_size < 1 or self.inner_ratio <= 0:
            raise ConfigError("components.cim-meta: per_class >= 0, lr > 0, weight_decay >= 0, batch_size >= 1 and "
                              "inner_ratio > 0 are expected")
        if self.inner_loss not in ("method", "ce") or self.inner_params not in ("backbone", "all") \
                or self.bn not in ("running", "batch"):
            raise ConfigError("components.cim-meta: inner_loss must be method or ce, inner_params backbone or all, "
                              f"bn running or batch, got '{self.inner_loss}', '{self.inner_params}', '{self.bn}'")


@register("compressor", "cim-meta")
class CIMMeta(Component):
    """CIM's mask model trained alongside the CIL model (the official ``models/foster.py:155-196,
    242-287``): after every training epoch of every phase, ``max(1, int(per_class x new classes))``
    meta-iterations of the bilevel step (``cim_outer_loss``) on phi, Adam (lr 0.01, weight decay
    5e-4) with a cosine schedule over the phase's epochs, gradient norm clipped at
    ``memory.compression.grad-clip`` (x sqrt 2 after the first phase, as the official code); the
    inner step at ``inner_ratio`` x the epoch's lr. The CIL model runs in eval mode for it
    (``bn="batch"``: on batch statistics, ``batch_statistics``). Its batches draw from the run's
    generator; phi, Adam and the schedule are this component's state, so a run stopped inside a phase resumes exactly. ``cim_meta_steps`` / ``cim_meta_seconds`` per
    phase in ``metrics.json``. In runs with the ``cim`` compressor."""
    Options = CIMMetaOptions

    def __init__(self, options, services):
        super().__init__(options, services)
        self.model = self.data = self.phase = self.comp = self.opt = self.sched = None
        self.steps, self.seconds, self.skipped = 0, 0.0, 0
        self.pending: dict | None = None      # a resumed phase's state, applied at the first epoch's end
        self.rested = None                    # the phase whose training runs with phi's gradient off

    def attach(self, model):
        """The CIL network gets phi's rationals in its backbone's ReLU slots (ReLUs still outside
        the CIM forward), before any state is restored (its checkpoints hold them)."""
        CIMModel().ensure(model).rest()

    def batch(self, batch):
        if self.rested is not self.phase:        # once per phase, after an expansion made everything trainable
            self.comp._ensure(self.model).rest()
            self.rested = self.phase
        return batch

    def phase_start(self, phase, model, old_model, data):
        self.model, self.data, self.phase, self.comp = model, data, phase, data.memory.compressor
        self.opt = self.sched = None          # set up at the first epoch's end: an expandable net grows after this hook
        self.steps, self.seconds, self.skipped = 0, 0.0, 0
        data.memory.compressor._ensure(model).fallbacks = 0

    def setup(self, phase) -> None:
        """phi with a rational for every ReLU of the (grown) net, its Adam and cosine schedule, and
        the state of a run resumed inside this phase."""
        o = self.options
        phi = self.comp._ensure(self.model)
        self.opt = torch.optim.Adam(phi.parameters(), lr=o.lr, weight_decay=o.weight_decay)
        epochs = self.services.fit_settings(phase).epochs
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=max(epochs, 1))
        if self.pending is not None:
            st, self.pending = self.pending, None
            self.opt.load_state_dict(st["opt"])
            self.sched.load_state_dict(st["sched"])
            self.steps, self.seconds, self.skipped = st["steps"], st["seconds"], st.get("skipped", 0)

    def epoch_end(self, phase, epoch):
        if self.opt is None:
            self.setup(phase)
        o, s, data, comp = self.options, self.services, self.data, self.comp
        new = (data.y >= phase.start).nonzero().flatten()
        n = max(1, int(o.per_class * phase.num_new))
        if len(new) == 0:
            return
        t0 = time.perf_counter()
        settings = s.fit_settings(phase)
        inner_lr = o.inner_ratio * lr_at(settings, epoch, 0, 1)
        clip = comp.cfg.grad_clip * (1.0 if phase.index == 0 else math.sqrt(2))
        net, phi = self.model, comp.model
        mem = data.memory.data() if data.memory is not None else None
        old = None
        if mem is not None and phase.index > 0:
            keep = mem[1] < phase.start
            old = (mem[0][keep], mem[1][keep]) if bool(keep.any()) else None
        xn, yn = data.x[new], data.y[new]
        use_method = o.inner_loss == "method" and data.loss is not None
        params = phi.wake()                   # (the training rests phi: gradient on for the steps)
        with eval_mode(net) if o.bn == "running" else batch_statistics(net):
            trainable, fixed = cil_split(net, "backbone." if o.inner_params == "backbone" else "")
            inner = method_inner_loss(net, data.loss) if use_method else None
            for _ in range(n):
                loss, _ = cim_outer_loss(net, phi, trainable, fixed,
                                         *meta_batch(xn, yn, old, o.batch_size, s.gen, s.test_view),
                                         comp.s, inner_lr, comp.cfg.reg_weight, comp.cfg.cls_weight, comp.mode,
                                         inner_loss=inner)
                self.steps += 1
                self.skipped += not phi_step(loss, params, self.opt, clip)
        with warnings.catch_warnings():   # every step skipped so far: Adam has not stepped, the schedule
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)   # still advances
            self.sched.step()             # (the skips are in cim_meta_skipped, the run's warnings)
        phi.rest()
        self.seconds += time.perf_counter() - t0

    def state_dict(self):
        if self.opt is None:
            return {}
        return {"opt": self.opt.state_dict(),     # (phi's coefficients are in the net's own state)
                "sched": self.sched.state_dict(), "steps": self.steps, "seconds": self.seconds, "skipped": self.skipped}

    def load_state_dict(self, state):
        self.pending = state or None              # applied at the next epoch's end (``setup``)

    def phase_end(self, phase, model, data):
        self.model = self.data = self.opt = self.sched = None

    def diagnostics(self):
        phi = self.comp.model if self.comp is not None else None
        out = {"cim_meta_steps": self.steps, "cim_meta_seconds": self.seconds, "cim_meta_skipped": self.skipped,
               "cim_fallback_boxes": phi.fallbacks if phi is not None else 0}
        self.steps, self.seconds, self.skipped = 0, 0.0, 0
        return out


# ---------------------------------------------------------------- the CIM model
# A rational (Pade) activation, version A of Molina et al. (ICLR 2020), the form the official CIM
# code uses through the rational-activations package (degrees 5 / 4, "safe" denominator), with its
# coefficients initialised to that package's fit of ReLU on [-3, 3] (rationals_config.json, key
# Rational_version_A5/4, relu).
RATIONAL_RELU_P = (0.029963801610813613, 0.6168978366891341, 2.37534759733888, 3.0659900472408443,
                   1.5246831881677423, 0.2528070864040542)
RATIONAL_RELU_Q = (-1.191550121923625, 4.4080487697236626, 0.9110357113686055, 0.34884977946384615)


class Rational(nn.Module):
    """``f(x) = (a_0 + a_1 x + ... + a_5 x^5) / (1 + |b_1 x| + |b_2 x^2| + |b_3 x^3| + |b_4 x^4|)``,
    one set of coefficients for all channels, learnable; initially close to ReLU on [-3, 3].
    Trained by CIM's own step only (``trained_by_component``: the training loop leaves it out).

    ``relu_outside``: installed in a CIL backbone (``install_rationals``) the module is a ReLU
    except inside ``CIMModel.active()``, the official network's two activations in one slot
    (``convs/resnet.py``: ``forward(..., activation='relu')`` by default, ``'ratl'`` for the CIM
    forward only). A lone ``Rational()`` is the rational everywhere."""
    trained_by_component = True

    def __init__(self, relu_outside: bool = False):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(RATIONAL_RELU_P))
        self.q = nn.Parameter(torch.tensor(RATIONAL_RELU_Q))
        self.relu_outside = relu_outside
        self.active = False           # set by CIMModel.active() for the CIM forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.relu_outside and not self.active:
            return F.relu(x)
        return self.rational(x)

    def rational(self, x: torch.Tensor) -> torch.Tensor:
        """The same function in two evaluations, so that large inputs do not overflow (x^5 does in
        float32 above ~4e7, which deep activations of a young extractor reach): for |x| <= 1 as
        written; for |x| > 1 numerator and denominator divided by x^5 (t = 1/x, |t| < 1):
        ``(a_0 t^5 + a_1 t^4 + ... + a_5) / (t (t^4 + |b_1| |t|^3 + |b_2| t^2 + |b_3| |t| + |b_4|))``.
        Horner steps as fused multiply-adds (the activation runs at every layer of phi: this form
        is ~1.8x faster on a CPU than the term-by-term one, same values to float rounding). Large
        tensors go through in pieces of ``CHUNK`` elements: each of the ~25 elementwise steps
        allocates its result, and small allocations are reused by the C allocator where large ones
        are fresh pages every time (measured on a CPU: 4x faster evaluation at 500 x 64 x 28 x 28,
        ~1.3x a training step)."""
        xw = _wide(x)
        if xw.numel() > self.CHUNK:
            flat = xw.reshape(-1)
            return torch.cat([self._values(c) for c in flat.split(self.CHUNK)]).view(xw.shape)
        return self._values(xw)

    CHUNK = 1 << 17

    def _values(self, xw: torch.Tensor) -> torch.Tensor:
        p, qa = self.p.to(xw.dtype), self.q.to(xw.dtype).abs()
        small = xw.abs() <= 1
        one = torch.ones_like(xw)
        u = torch.where(small, xw, 0 * one)                  # |x| <= 1 lanes: x; others 0
        t = torch.where(small, one, xw).reciprocal()         # |x| > 1 lanes: 1 / x; others 1 (finite both ways)
        au, at = u.abs(), t.abs()
        num_s, num_l = p[5], p[0]
        for k in range(4, -1, -1):
            num_s = torch.addcmul(p[k], num_s, u)            # a_0 + a_1 u + ... + a_5 u^5
            num_l = torch.addcmul(p[5 - k], num_l, t)        # a_5 + a_4 t + ... + a_0 t^5
        den_s, den_l = qa[3], at + qa[0]
        for k in (2, 1, 0):
            den_s = torch.addcmul(qa[k], den_s, au)          # |b_1| + |b_2| |u| + |b_3| u^2 + |b_4| |u|^3
        for k in (1, 2, 3):
            den_l = torch.addcmul(qa[k], den_l, at)          # t^4 + |b_1| |t|^3 + ... + |b_4|
        return torch.where(small, num_s / (den_s * au + 1), num_l / (den_l * t))


def _relus(module: nn.Module) -> list[tuple[nn.Module, str]]:
    """(parent, attribute name) of every ``nn.ReLU`` inside ``module``, in module order."""
    return [(parent, name) for parent in module.modules() for name, child in parent.named_children()
            if isinstance(child, nn.ReLU)]


def install_rationals(module: nn.Module) -> nn.Module:
    """Every ``nn.ReLU`` inside ``module`` replaced by a new ``Rational(relu_outside=True)`` (in
    place: a ReLU still, the rational inside ``CIMModel.active()``); returns it."""
    dev = next((p.device for p in module.parameters()), None)
    for parent, name in _relus(module):
        r = Rational(relu_outside=True)
        setattr(parent, name, r.to(dev) if dev is not None else r)
    return module


def phi_names(net: nn.Module) -> set[str]:
    """Names of the net's parameters that belong to its rationals (phi)."""
    return {f"{m}.{p}" if m else p for m, mod in net.named_modules() if isinstance(mod, Rational)
            for p, _ in mod.named_parameters()}


class CIMModel:
    """The mask model phi as the official code builds it (``convs/resnet.py:44-63, 100-125``;
    ``utils/inc_net.py`` ``FOSTERNet.forward(x, params=None, activation='relu')``): the CIL
    network with a second activation in every ReLU slot of its backbone (the stem's, and both of
    each residual block). The CIL model's own forward (training, the CIM inner step and its
    validation, evaluation) runs the ReLUs; the CIM forward (``active()``: the masks and the CIM
    model's logits, official ``activation='ratl'``) runs learnable ``Rational``s in their place
    through the **same** convolutions, BatchNorm layers (their running statistics are the ReLU
    network's) and head. phi is the rationals' coefficients: the training loop leaves them out
    (``trained_by_component``) and only the CIM step trains them, also those of a frozen old
    extractor (``models/foster.py:51-54``). An expandable backbone gets rationals in each new
    extractor. The CAM ``class_vector . maps`` of the CIM forward's last stage gives the masks,
    its logits the CIM model's CE."""

    def __init__(self):
        self.net: nn.Module | None = None
        self.fallbacks = 0          # images whose CAM was not finite (boxed as the whole image)

    def ensure(self, net: nn.Module) -> "CIMModel":
        """Rationals in place of every ReLU of ``net``'s backbone, now and in the extractors an
        expandable backbone adds later (idempotent)."""
        bb = net.backbone
        install_rationals(bb)
        if hasattr(bb, "builder") and not getattr(bb.builder, "with_rationals", False):
            builder = bb.builder

            def with_rationals():
                return install_rationals(builder())
            with_rationals.with_rationals = True
            bb.builder = with_rationals
        self.net = net
        return self

    @property
    def acts(self) -> list[nn.Module]:
        return [m for m in self.net.backbone.modules() if isinstance(m, Rational)] if self.net is not None else []

    def parameters(self) -> list[nn.Parameter]:
        """phi's coefficients (a frozen extractor's rationals too: the official code trains the old
        backbone's rationals with phi, ``models/foster.py:51-54``)."""
        return [p for a in self.acts for p in a.parameters()]

    def wake(self) -> list[nn.Parameter]:
        """phi's coefficients with their gradient on, for a CIM step (``rest`` turns it off)."""
        return [p.requires_grad_(True) for p in self.parameters()]

    def rest(self) -> None:
        """phi's coefficients without gradient between CIM steps (the CIL training neither runs
        nor trains them)."""
        for p in self.parameters():
            p.requires_grad_(False)

    @contextlib.contextmanager
    def active(self):
        """The block runs the net with phi's rationals in place of its ReLUs (the CIM forward)."""
        acts = self.acts
        for a in acts:
            a.active = True
        try:
            yield
        finally:
            for a in acts:
                a.active = False

    def cam_and_logits(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(soft masks ``[B, H, W]`` in [0, 1], CIM logits ``[B, K]``, the same CAM at feature
        resolution ``[B, h, w]``) of normalised ``x`` for the labels ``y`` by the CIM forward;
        differentiable in phi (the head's parameters are constants here)."""
        with self.active():
            maps = net(x).maps[-1]                                            # [B, D, h, w]
        head = {k: v.detach() for k, v in net.head.named_parameters()}       # no gradient into the CIL head
        logits = functional_call(net.head, head, (maps.mean((2, 3)),))
        v = class_vectors(net.head)[y].detach()
        return cam(maps, v, tuple(x.shape[-2:])), logits, cam(maps, v, tuple(maps.shape[-2:]))

    @torch.no_grad()
    def masks(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The CAM ``[B, H, W]`` of classes ``y`` on normalised ``x`` by the CIM forward (for the boxes)."""
        with self.active():
            maps = net(x).maps[-1]
        self.fallbacks += int((~torch.isfinite(maps.flatten(1)).all(1)).sum())
        return cam(maps, class_vectors(net.head)[y], tuple(x.shape[-2:]))


def soft_compress(x: torch.Tensor, c: torch.Tensor, s: int, mode: str = "nearest") -> torch.Tensor:
    """``c * x + (1 - c) * up(down(x))`` (``c [B, H, W]``), differentiable in ``c``."""
    return c[:, None] * x + (1 - c[:, None]) * blur(x, s, mode)


def cim_outer_loss(net: nn.Module, cim: CIMModel, trainable: dict[str, torch.Tensor], fixed: dict[str, torch.Tensor],
                   new_x: torch.Tensor, new_y: torch.Tensor, ex_x: torch.Tensor | None, ex_y: torch.Tensor | None,
                   val_x: torch.Tensor, val_y: torch.Tensor, s: int, inner_lr: float, mu: float, mu_cls: float,
                   mode: str = "nearest", inner_loss=None) -> tuple[torch.Tensor, dict[str, float]]:
    """The CIM bilevel objective (paper Sec. 4) for one outer step, a scalar differentiable in phi:

    * inner: one SGD step of the CIL parameters ``trainable`` (``fixed``: the others and the
      buffers) on ``inner_loss(params, x, y)`` (default: CE of the net's logits; ``cim-meta``:
      the method's full training loss, ``method_inner_loss``) over the exemplars ``(ex_x,
      ex_y)`` and the new images softly compressed by the CIM masks ``c``:
      ``theta' = theta - inner_lr * grad`` (the graph kept back to phi);
    * outer: CE of ``theta'`` on a fresh real batch ``(val_x, val_y)`` + ``mu * mean(c_f^2)``, the
      memory regulariser on the normalised CAM at feature resolution ``c_f`` (the official code's
      ``MSE(CAM, 0)``: a larger mask costs memory) + ``mu_cls * CE`` of the CIM model.
    All images normalised ``[B, C, H, W]``."""
    c, cim_logits, c_feat = cim.cam_and_logits(net, new_x, new_y)
    soft = soft_compress(new_x, c, s, mode)
    xs = soft if ex_x is None else torch.cat([ex_x, soft])
    ys = new_y if ex_y is None else torch.cat([ex_y, new_y])
    if inner_loss is None:
        inner = F.cross_entropy(_wide(functional_call(net, {**fixed, **trainable}, (xs,)).logits), ys)
    else:
        inner = _wide(inner_loss(trainable, xs, ys))
    names = list(trainable)
    grads = torch.autograd.grad(inner, [trainable[k] for k in names], create_graph=True, allow_unused=True)
    updated = {k: trainable[k] if g is None else trainable[k] - inner_lr * g for k, g in zip(names, grads)}
    val = F.cross_entropy(_wide(functional_call(net, {**fixed, **updated}, (val_x,)).logits), val_y)
    reg = (c_feat ** 2).mean()
    ce_cim = F.cross_entropy(_wide(cim_logits), new_y)
    loss = val + mu * reg + mu_cls * ce_cim
    return loss, {k: float(v.detach()) for k, v in (("val", val), ("reg", reg), ("ce_cim", ce_cim), ("mask", c.mean()))}


# ---------------------------------------------------------------- compressors
class Compressor:
    """Turns a class's candidate exemplars (uint8 ``[N, C, H, W]``, selection order) into boxes.
    ``fit`` runs once per phase before the boxes are taken (CIM: the bilevel training)."""
    with_boxes = True
    name: str                     # the registry name (--memory.compressor)

    def __init__(self, cfg: "CompressionConfig"):
        self.cfg = cfg
        self.s = math.isqrt(cfg.eta)
        self.mode = cfg.resample          # nearest (official) | area
        self.stats: dict[str, float] = {}

    def fit(self, net, normalize, x, y, classes, memory_data, gen) -> None:
        pass

    def boxes(self, net, normalize, x: torch.Tensor, c: int) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def state(self) -> dict:
        return {}

    def load_state(self, state: dict, device) -> None:
        pass


@COMPRESSORS.register("full")
class FullCompressor(Compressor):
    """The whole image downsampled (no box): cost 1 / eta."""
    name = "full"
    with_boxes = False

    def boxes(self, net, normalize, x, c):
        return torch.zeros(len(x), 4, dtype=torch.long, device=x.device)


def _batched_boxes(fn, x: torch.Tensor, bs: int = 256) -> torch.Tensor:
    return torch.cat([fn(x[i:i + bs]) for i in range(0, len(x), bs)]) if len(x) else \
        torch.zeros(0, 4, dtype=torch.long, device=x.device)


@COMPRESSORS.register("cam-threshold")
class CAMCompressor(Compressor):
    """Boxes of the CIL model's CAM of the label class at threshold tau (the paper's baseline)."""
    name = "cam-threshold"

    @torch.no_grad()
    def boxes(self, net, normalize, x, c):
        def one(xb):
            out = net(normalize(xb))
            v = class_vectors(net.head).float()[c].expand(len(xb), -1)
            return boxes_from_cam(cam(out.maps[-1].float(), v, tuple(xb.shape[-2:])), self.cfg.tau)
        with eval_mode(net):
            return _batched_boxes(one, x)


@COMPRESSORS.register("cim")
class CIMCompressor(Compressor):
    """Boxes of the CIM model's CAM at threshold tau, the CIM model trained at each phase end by the
    bilevel step (``cim_outer_loss``): ``iterations`` Adam steps (lr 0.01, gradient norm clipped
    at 1: the official configuration's ``phi_lr`` / ``max_phi_grad_norm``) on batches of
    ``batch_size`` new images and as many exemplars."""
    name = "cim"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.model: CIMModel | None = None

    def _ensure(self, net) -> CIMModel:
        """phi, with one rational per ReLU of ``net`` (an expandable net adds extractors, hence ReLUs)."""
        if self.model is None:
            self.model = CIMModel()
        return self.model.ensure(net)

    def fit(self, net, normalize, x, y, classes, memory_data, gen) -> None:
        cfg = self.cfg
        with eval_mode(net):              # BatchNorm with running statistics, as the Mnemonics step
            model = self._ensure(net)
            if cfg.iterations == 0 or len(x) == 0:
                return
            trainable, fixed = cil_split(net)
            params = model.wake()                   # phi only: no gradient for the CIL copies' leaves
            opt = torch.optim.Adam(params, lr=cfg.lr)
            first = last = None
            skipped = 0
            for _ in range(cfg.iterations):
                loss, terms = cim_outer_loss(net, model, trainable, fixed,
                                             *meta_batch(x, y, memory_data, cfg.batch_size, gen, normalize),
                                             self.s, self.inner_lr(), cfg.reg_weight, cfg.cls_weight, self.mode)
                skipped += not phi_step(loss, params, opt, cfg.grad_clip)
                last = {**terms, "loss": float(loss.detach())}
                first = first or last
            model.rest()
            self.stats = {"cim_loss_first": first["loss"], "cim_loss_last": last["loss"],
                          "cim_mask_first": first["mask"], "cim_mask_last": last["mask"], "cim_skipped": skipped}

    def inner_lr(self) -> float:
        return self.cfg.inner_lr if self.cfg.inner_lr is not None else self.default_inner_lr

    default_inner_lr = 0.1      # the CIL model's learning rate in the official configurations (theta_lr)

    @torch.no_grad()
    def boxes(self, net, normalize, x, c):
        def one(xb):
            model = self._ensure(net)
            y = torch.full((len(xb),), c, dtype=torch.long, device=xb.device)
            return boxes_from_cam(model.masks(net, normalize(xb), y), self.cfg.tau)
        with eval_mode(net):
            return _batched_boxes(one, x)

    # phi's coefficients live in the CIL network (its state_dict); nothing of the compressor's own
    # is checkpointed (a checkpoint's "cim" entry of an earlier cilearn is ignored)


def build(cfg) -> Compressor | None:
    """The run's compressor (``cfg``: the RunConfig), or None for ``none``."""
    name = cfg.memory.compressor or "none"
    if name == "none":
        return None
    comp = COMPRESSORS.get(name)(cfg.memory.compression)
    if isinstance(comp, CIMCompressor):
        comp.default_inner_lr = cfg.train.lr
    return comp


COMPRESSORS.register("none")(lambda cfg: None)
