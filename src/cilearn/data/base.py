"""The data set record every loader returns, and the data set registry."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..registry import Registry


@dataclass
class ImageDataset:
    """A whole data set in memory as uint8 images, loaded once.

    Images are ``uint8 [N, C, H, W]`` (C = 1 or 3), labels ``int64 [N]`` in ``[0, num_classes)``.
    ``mean``/``std`` are per-channel, in units of [0, 1] pixel values, used for normalisation.
    ``augment`` names the default training augmentation (see ``cilearn.data.augment``):
    ``"crop-flip"`` (random crop with ``pad`` pixels of zero padding + horizontal flip),
    ``"flip"``, ``"none"``, or ``"rrc-flip"`` (random-resized-crop + flip, for image folders).
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str = "crop-flip"
    pad: int = 4
    info: dict = field(default_factory=dict)  # free-form provenance (files, cache path, split seed)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])  # type: ignore[return-value]


# A loader is ``fn(options: DataOptions) -> ImageDataset``.
DATASETS: Registry = Registry("data set")
# the ``data.*`` options a loader may read (``reads``); config.yaml keeps those of the run's data set only
LOADER_OPTIONS = ("data_dir", "image_size", "train_list", "test_list", "cache_dir", "workers")


def reads(*options: str):
    """Decorator of a loader: the ``LOADER_OPTIONS`` it reads (an option set for a data set that
    does not read it is refused, and left out of ``config.yaml``)."""
    assert set(options) <= set(LOADER_OPTIONS), options

    def deco(fn):
        fn.reads = options
        return fn
    return deco


@dataclass
class DataPlan:
    """What a data set holds, known before any image is decoded and before any file is written
    (a cache): enough to validate a run's configuration against it. ``load()`` reads the images.
    Fields as ``ImageDataset``'s; ``class_order``: the order of the labels its benchmark fixes
    (the reference code does not shuffle them, e.g. VTAB's domains one after another), or None: the
    run's seeded permutation (``cilearn.data.scenario.class_order``)."""

    name: str
    num_classes: int
    class_names: list[str]
    image_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str
    pad: int
    load: Callable[[], ImageDataset]
    class_order: list[int] | None = None

    @classmethod
    def of(cls, ds: ImageDataset) -> "DataPlan":
        """The plan of a data set already in memory (its loader wrote nothing)."""
        return cls(ds.name, ds.num_classes, list(ds.class_names), ds.image_shape, ds.mean, ds.std, ds.augment,
                   ds.pad, lambda: ds)


# Data sets whose loading writes files (image folders: the decoded cache) register a planner,
# ``fn(options) -> DataPlan``, that reads their listing only; the others are planned by loading them.
PLANNERS: dict[str, Callable[["DataOptions"], DataPlan]] = {}


@dataclass
class DataOptions:
    """What a loader may be told. ``data_dir=None`` means the loader's documented default."""

    data_dir: str | None = None
    image_size: int | None = None      # image folders: images are resized once to this size (square)
    train_list: str | None = None      # image folders: "relative/path.jpg label" lines
    test_list: str | None = None
    cache_dir: str | None = None       # image folders: where decoded uint8 arrays are cached
    workers: int | None = None         # image folders: decoding processes; None: the CPUs, at most 32
    progress: bool = True              # image folders: a bar while decoding (cilearn.progress.bars)
