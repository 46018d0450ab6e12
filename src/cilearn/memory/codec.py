"""The exemplar codec after CIM (Luo, Liu, Schiele & Sun, "Class-Incremental Exemplar Compression
for Class-Incremental Learning", CVPR 2023): boxes, compressed codes and their byte accounting,
pure functions of tensors. The compressors that choose the boxes are in
``cilearn.memory.compressors``, CIM's mask model and its bilevel step in ``cilearn.memory.cim``.

An exemplar keeps a tight bounding box B of its discriminative pixels at full resolution; the rest
is downsampled by ``s = sqrt(eta)`` per side and upsampled back, both nearest-neighbour as the
official code (``utils/transform.py``; ``--memory.compression.resample area``: area average and
bilinear, cilearn's earlier choice): ``x~ = M_B * x + (1 - M_B) * up(down(x))`` (paper Sec. 3,
Fig. 2).

The boxes come from a compressor (``--compressor``: ``full`` no box, ``cam-threshold`` the CIL
model's CAM, ``cim`` the CIM model's CAM).

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

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.net import eval_mode

BOX_BYTES = 8            # (y0, x0, y1, x1) as int16


# ---------------------------------------------------------------- pure functions
def at_least_float32(t: torch.Tensor) -> torch.Tensor:
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
        return at_least_float32(x)
    if mode == "area":
        return F.avg_pool2d(at_least_float32(x), s, s, ceil_mode=True, count_include_pad=False)
    H, W = x.shape[-2:]
    return at_least_float32(x).index_select(-2, _cell_rows(H, s, x.device)).index_select(-1, _cell_rows(W, s, x.device))


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
    m = at_least_float32(torch.einsum("bd,bdhw->bhw", vectors.to(maps.dtype), maps))
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


def own_box_artifacts(x: torch.Tensor, boxes: torch.Tensor, changed: torch.Tensor, s: int,
                      mode: str = "nearest") -> torch.Tensor:
    """Rows ``changed [B]`` of ``x [B, C, H, W]`` (uint8, or float pixels) compressed around their
    own boxes ``[B, 4]`` (y0, x0, y1, x1): outside the box ``up(down(x))``, inside the pixels as
    they are; the images' dtype (uint8 rounded)."""
    H, W = x.shape[-2:]
    ii = torch.arange(H, device=x.device).view(1, H, 1)
    jj = torch.arange(W, device=x.device).view(1, 1, W)
    y0, x0, y1, x1 = (b.view(-1, 1, 1).to(x.device) for b in boxes.unbind(1))
    inbox = (ii >= y0) & (ii < y1) & (jj >= x0) & (jj < x1)                      # [B, H, W]
    keep = inbox | ~changed.view(-1, 1, 1)
    return torch.where(keep[:, None], x, _store_dtype(x, blur(x, s, mode)))


def soft_compress(x: torch.Tensor, c: torch.Tensor, s: int, mode: str = "nearest") -> torch.Tensor:
    """``c * x + (1 - c) * up(down(x))`` (``c [B, H, W]``), differentiable in ``c``."""
    return c[:, None] * x + (1 - c[:, None]) * blur(x, s, mode)
