"""Batched augmentation on the training device (no per-sample Python), and the input view the
network's weights expect.

Input: uint8 ``[B, C, H, W]`` (the stored images); output: normalised float ``[B, C', S, S]``,
``S`` the network input (``size``; default: the stored images' own side). Policies: ``none``;
``flip`` (horizontal, p = 0.5); ``crop-flip`` (zero-pad by ``pad`` px, random SxS window,
flip); ``rrc-flip`` (random-resized-crop, scale (``rrc_scale``, 1) (default 0.08), ratio (3/4, 4/3), resized to SxS,
flip). Where the stored images are larger than ``S`` (image folders with ``--data.input-size``),
evaluation takes their centre SxS crop (``test``; ImageNet's Resize(256) + CenterCrop(224) when
they are stored at 256 for 224) and ``none`` / ``flip`` train on it too.

The input view (``--input-size``, ``--data.resize``, ``--data.interpolation``, ``--normalize``;
a pre-trained backbone's defaults: ``InputSpec``): the stored images are first resized to
``resize`` x ``resize`` (``interpolation``, antialiased, rounded to integer pixels as an image
library's resize gives them; default: the input side when it is larger than the stored images,
else no resize), then cropped to ``S`` as above (``rrc-flip`` crops the stored image directly,
bilinear: the same region, one resampling); a 1-channel image is repeated to the network's
``channels`` (a 3-channel pre-trained model on digits or Fashion-MNIST); the mean/std are those
of ``--normalize``. Without a resize and a channel repeat every view is what it was before the
input view existed, bit for bit.

A batch's random parameters are drawn first (``draw``: a ``Draw``, what was drawn for each row),
then applied (``apply``); ``train`` does both. A component that changes stored images before
their augmentation (CIM's artifact augmentation) applies a batch's own ``Draw`` to its changed
images (``Batch.aug``).

``none`` and ``flip`` have a finite set of views (1 and 2). ``train`` then also returns the view
id of each sample, so a frozen teacher's outputs can be computed once per view and looked up
(``cilearn.services.OldOutputs``) instead of running the teacher on every batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .rows import as_tensor

POLICIES = ("none", "flip", "crop-flip", "rrc-flip")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
# --normalize: a named mean/std or explicit values (``normalization``)
NORMALIZE = ("dataset", "imagenet", "model", "none")
IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))   # torchvision's ImageNet statistics


@dataclass(frozen=True)
class InputSpec:
    """What a backbone's weights expect of its input (a pre-trained model's own configuration:
    timm's ``pretrained_cfg``): ``channels``, the side ``size`` (px), the resize ``interpolation``,
    and the per-channel ``mean``/``std`` in [0, 1] pixel units; ``fixed``: the model takes inputs
    of side ``size`` only (a ViT's position embeddings)."""
    channels: int
    size: int
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    fixed: bool = False


def format_mean_std(mean, std) -> str:
    """``M1,M2,M3/S1,S2,S3``: the explicit form of ``--normalize``."""
    return ",".join(repr(float(v)) for v in mean) + "/" + ",".join(repr(float(v)) for v in std)


def normalization(text: str, dataset: tuple, model: InputSpec | None = None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) of ``--normalize text``: ``dataset`` (the data set's, ``dataset`` = (mean,
    std)), ``imagenet``, ``model`` (the backbone's ``InputSpec``), ``none`` (inputs in [0, 1]), or
    ``M1,M2,M3/S1,S2,S3`` (one value per channel, or one for all). A ConfigError otherwise."""
    if text == "dataset":
        return tuple(dataset[0]), tuple(dataset[1])
    if text == "imagenet":
        return IMAGENET_MEAN_STD
    if text == "none":
        return (0.0,), (1.0,)
    if text == "model":
        if model is None:
            raise ConfigError("--normalize model: this backbone has no pre-trained input configuration; "
                              "use dataset, imagenet, none or MEAN/STD values")
        return tuple(model.mean), tuple(model.std)
    parts = text.split("/")
    try:
        mean, std = ([float(v) for v in part.split(",")] for part in parts) if len(parts) == 2 else (None, None)
    except ValueError:
        mean = std = None
    if (not mean or not std or len(mean) != len(std) or not all(math.isfinite(v) for v in mean + std)
            or min(std) <= 0):
        raise ConfigError(f"--normalize must be one of {', '.join(NORMALIZE)} or per-channel values "
                          f"MEAN1,MEAN2,MEAN3/STD1,STD2,STD3 (std > 0), got '{text}'")
    return tuple(mean), tuple(std)


class Draw(NamedTuple):
    """The random parameters one batch's rows got (``Augmenter.draw``); None where the policy
    draws none."""
    flip: torch.Tensor | None = None       # [B] bool: flipped
    corner: torch.Tensor | None = None     # [B, 2] long (row, column): crop-flip's window in the padded image
    theta: torch.Tensor | None = None      # [B, 2, 3]: rrc-flip's crop, an affine map of normalised coordinates

    def rows(self, keep: torch.Tensor) -> "Draw":
        """The parameters of rows ``keep`` (an index or a [B] bool mask)."""
        return Draw(*(None if t is None else t[keep] for t in self))


class Augmenter:
    def __init__(self, policy: str, pad: int, mean, std, channels_last: bool = True, size: int | None = None,
                 resize: int | None = None, interpolation: str = "bilinear", channels: int | None = None,
                 rrc_scale: float = 0.08):
        if policy not in POLICIES:
            raise ConfigError(f"--data.augment must be one of {', '.join(POLICIES)}, got '{policy}'")
        if interpolation not in INTERPOLATIONS:
            raise ConfigError(f"--data.interpolation must be one of {', '.join(INTERPOLATIONS)}, got '{interpolation}'")
        self.policy, self.pad, self.channels_last = policy, pad, channels_last
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        self.size = size                      # the network input's side (px); None: the stored images'
        self.resize = resize                  # the side (px) images are resized to first; None: see resized_side
        self.interpolation = interpolation
        self.channels = channels              # the network's input channels; None: the images'
        self.rrc_scale = rrc_scale            # rrc-flip: the smallest crop's share of the image's area
        std_t = torch.tensor(std, dtype=torch.float32)
        self._scale = (1.0 / (255.0 * std_t)).view(1, -1, 1, 1)        # x_norm = x * scale + shift
        self._shift = (-torch.tensor(mean, dtype=torch.float32) / std_t).view(1, -1, 1, 1)

    @property
    def num_views(self) -> int | None:
        """Number of distinct training views, or None when they are continuous."""
        return {"none": 1, "flip": 2}.get(self.policy)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 or float pixels in [0, 255] -> normalised float32, a 1-channel image repeated to
        the network's ``channels``. ``x`` may be a host-resident view
        (``cilearn.data.rows.HostRows``) of a batch: its rows are moved to the device here."""
        x = as_tensor(x)
        if self.channels is not None and x.shape[1] != self.channels:
            if x.shape[1] != 1:
                raise ConfigError(f"images with {x.shape[1]} channels cannot feed a network that takes "
                                  f"{self.channels} (only 1-channel images are repeated)")
            x = x.expand(-1, self.channels, -1, -1)
        if self._scale.device != x.device:
            self._scale, self._shift = self._scale.to(x.device), self._shift.to(x.device)
        out = torch.addcmul(self._shift, x.float(), self._scale)
        return out.contiguous(memory_format=torch.channels_last) if self.channels_last else out

    def out_size(self, H: int, W: int) -> tuple[int, int]:
        """The network input's (height, width) for stored images of ``H x W``."""
        return self.resized_side(H, W) if self.size is None else (self.size, self.size)

    def resized_side(self, H: int, W: int) -> tuple[int, int]:
        """(height, width) of stored ``H x W`` images after the resize: ``resize`` square when
        given, else the input side when it is larger than the images, else ``H x W`` (no resize)."""
        if self.resize is not None:
            return self.resize, self.resize
        if self.size is not None and (self.size > H or self.size > W):
            return self.size, self.size
        return H, W

    def resized(self, x: torch.Tensor) -> torch.Tensor:
        """The images resized to ``resized_side`` (``interpolation``; antialiased where it shrinks;
        rounded and clamped to integer pixels, in ``x``'s dtype), ``x`` itself where no resize applies."""
        x = as_tensor(x)
        return resize_pixels(x, self.resized_side(*x.shape[-2:]), self.interpolation)

    def centre(self, x: torch.Tensor) -> torch.Tensor:
        """The evaluation view's pixels: the images resized (``resized``), then their centre ``size
        x size`` crop where they are larger (the images themselves otherwise)."""
        x = self.resized(x)
        H, W = x.shape[-2:]
        if self.size is None or (self.size >= H and self.size >= W):
            return x
        S = self.size
        top, left = max(0, (H - S) // 2), max(0, (W - S) // 2)
        return x[..., top:top + S, left:left + S]

    def test(self, x: torch.Tensor) -> torch.Tensor:
        """The evaluation view: normalised, the centre crop of images larger than the input."""
        return self.normalize(self.centre(as_tensor(x)))

    def whole(self, x: torch.Tensor) -> torch.Tensor:
        """The whole stored image resized (``interpolation``, antialiased) to the network input, normalised:
        the view the CAM boxes are computed on (CIM's official ``cam_trsf``, Resize((224, 224)));
        the test view where the images are the input's size."""
        x = as_tensor(x)
        return self.normalize(resize_pixels(x, self.out_size(*x.shape[-2:]), self.interpolation))

    def view(self, x: torch.Tensor, v: int) -> torch.Tensor:
        """Deterministic view ``v`` (0: identity, 1: flipped) of a finite policy."""
        x = self.centre(as_tensor(x))
        return self.normalize(x.flip(3) if v == 1 else x)

    def draw(self, shape: torch.Size | tuple, gen: torch.Generator, span: slice | None = None,
             batch: int | None = None, device: torch.device | str | None = None) -> Draw:
        """The random parameters of a batch of stored images of ``shape`` ``[B, C, H, W]``, on
        ``device``. The batch may be the rows ``span`` of a batch of ``batch`` images (one rank's
        part under torchrun): the parameters are drawn for the whole batch, as one process would,
        and the part's rows kept, so the generator advances identically on every rank."""
        B, _, H, W = shape
        span, batch = (slice(0, B), B) if span is None else (span, batch)
        dev = gen.device if device is None else device

        def uniform() -> torch.Tensor:
            return torch.rand(batch, generator=gen, device=gen.device).to(dev)[span]
        if self.policy == "none":
            return Draw()
        flip = uniform() < 0.5
        H, W = self.resized_side(H, W)                           # crop-flip crops the resized images
        if self.policy == "crop-flip" and (self.pad > 0 or self.out_size(H, W) != (H, W)):
            n = H + 2 * self.pad - self.out_size(H, W)[0] + 1    # window positions per side (square images)
            corner = torch.randint(0, n, (2, batch), generator=gen, device=gen.device).to(dev)[:, span]
            return Draw(flip, corner.T)
        if self.policy == "rrc-flip":
            return Draw(flip, theta=resized_crop_theta(uniform, (self.rrc_scale, 1.0)))
        return Draw(flip)

    def apply(self, x: torch.Tensor, d: Draw) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Stored images ``x`` augmented by the parameters ``d`` (``draw``): (normalised batch
        ``[B, C, S, S]``, view ids ``[B]`` for finite policies, else None)."""
        x = as_tensor(x)
        B, dev = x.shape[0], x.device
        size = self.out_size(*x.shape[-2:])
        if d.corner is not None:
            x = crop_windows(F.pad(self.resized(x), (self.pad,) * 4), d.corner.to(dev), size)
        elif d.theta is not None:
            x = resized_crop(x, d.theta.to(dev), size)
        else:
            x = self.centre(x)
        if d.flip is not None:
            x = torch.where(d.flip.to(dev).view(B, 1, 1, 1), x.flip(3), x)
        view = {"none": torch.zeros(B, dtype=torch.long, device=dev),
                "flip": None if d.flip is None else d.flip.to(dev).long()}.get(self.policy)
        return self.normalize(x), view

    def train(self, x: torch.Tensor, gen: torch.Generator, span: slice | None = None,
              batch: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns (augmented normalised batch, view ids [B] or None): ``apply(x, draw(...))``."""
        x = as_tensor(x)
        return self.apply(x, self.draw(x.shape, gen, span, batch, x.device))


def resize_pixels(x: torch.Tensor, size: tuple[int, int], interpolation: str) -> torch.Tensor:
    """Images ``x [B, C, H, W]`` (pixels in [0, 255]) resized to ``size`` (h, w) with
    ``interpolation`` (antialiased for bilinear and bicubic, which matters where they shrink),
    rounded and clamped to integer pixels and returned in ``x``'s dtype, as an image library's
    resize of uint8 images gives them; ``x`` itself when it has that size already."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    smooth = interpolation != "nearest"
    out = F.interpolate(x.float(), size=size, mode=interpolation, antialias=smooth,
                        align_corners=False if smooth else None)
    return out.round_().clamp_(0, 255).to(x.dtype)


def crop_windows(xp: torch.Tensor, corner: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The ``size`` (h, w) window of each image of ``xp [B, C, H, W]`` at ``corner [B, 2]`` (row,
    column of its top-left pixel), one gather."""
    B, (h, w) = xp.shape[0], size
    rows = (corner[:, 0, None] + torch.arange(h, device=xp.device))[:, :, None]   # [B, h, 1]
    cols = (corner[:, 1, None] + torch.arange(w, device=xp.device))[:, None, :]   # [B, 1, w]
    b = torch.arange(B, device=xp.device)[:, None, None]
    return xp.permute(0, 2, 3, 1)[b, rows, cols].permute(0, 3, 1, 2)              # [B, C, h, w]


def random_crop(x: torch.Tensor, pad: int, gen: torch.Generator, span: slice | None = None,
                batch: int | None = None) -> torch.Tensor:
    """Zero-pad by ``pad`` and take a random HxW window per sample (``crop-flip`` without its flip;
    ``span``/``batch``: see ``Augmenter.draw``)."""
    B, C, H, W = x.shape
    span, batch = (slice(0, B), B) if span is None else (span, batch)
    corner = torch.randint(0, 2 * pad + 1, (2, batch), generator=gen, device=gen.device).to(x.device)[:, span]
    return crop_windows(F.pad(x, (pad, pad, pad, pad)), corner.T, (H, W))


def resized_crop_theta(uniform, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    """``[B, 2, 3]``: random-resized-crops (area a fraction in ``scale`` of the image, aspect ratio in
    ``ratio``, uniform position) as affine maps of normalised coordinates, from four draws of
    ``uniform() -> [B]`` in [0, 1)."""
    area = scale[0] + (scale[1] - scale[0]) * uniform()                        # fraction of image
    logr = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * uniform()
    r = torch.exp(logr)
    w = torch.sqrt(area * r).clamp(max=1.0)                                     # fraction of width
    h = torch.sqrt(area / r).clamp(max=1.0)
    cx = (uniform() * 2 - 1) * (1 - w)                                         # centre in [-1, 1]
    cy = (uniform() * 2 - 1) * (1 - h)
    theta = torch.zeros(len(w), 2, 3, device=w.device)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w, cx, h, cy
    return theta


def resized_crop(x: torch.Tensor, theta: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The crops ``theta [B, 2, 3]`` of ``x [B, C, H, W]`` resized (bilinear) to ``size`` (h, w),
    float pixels rounded to integers, one ``grid_sample``."""
    B, C = x.shape[:2]
    grid = F.affine_grid(theta, (B, C, *size), align_corners=False)
    out = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.round_().clamp_(0, 255)

