"""The released splits of the pre-trained-model benchmarks: ``imagenet-r``, ``imagenet-a``,
``cub200``, ``objectnet``, ``omnibenchmark`` and ``vtab``, read from ``--data-dir`` as their
authors distribute them (the processed archives linked from the READMEs of RevisitingCIL/APER,
PILOT and RanPAC).

Every release is two folders, ``train/<class>/*`` and ``test/<class>/*``, which the reference code
reads with ``torchvision.datasets.ImageFolder``: its labels are the class folders in sorted order,
and so are cilearn's (``cilearn.data.imagefolder``'s ``folders`` layout, the test split read from
``test/`` only). ``--data-dir`` is that extracted folder, or a folder above it holding it under the
name the reference code uses (``imagenet-r/``, ``vtab-cil/vtab/``, ...; ``Release.folders``).

Class order: the reference code shuffles the labels with ``np.random.seed(seed)`` then
``np.random.permutation(num_classes)``, the same permutation as ``RandomState(seed)`` (cilearn's
``scenario.class_order``; seed 1993 in every reference config), except on VTAB, whose
configurations keep the folder order (``shuffle: false``): its five source data sets of ten
classes come one after another. ``Release.fixed_order`` gives that order to the run
(``DataPlan.class_order``) unless ``--scenario.class-order`` says otherwise.

Images are decoded, resized so the short side is ``--image-size`` (default 256) and center-cropped
to a square, into the image folders' uint8 cache (``cilearn.data.image_cache``): the same cache
files an ``imagefolder`` run on the same folder uses. At 256 px, ``--input-size 224`` evaluates on
the centre 224 crop: the reference's ``Resize(256) + CenterCrop(224)``.

Bad input is the image folders' (one ``DataError`` line, nothing written): no ``train/`` or no
``test/`` folder, a class folder without images, a class folder in one split only, an image that
does not decode.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import DataError
from .base import DATASETS, PLANNERS, DataOptions, DataPlan, ImageDataset, reads
from .imagefolder import IMAGE_EXTENSIONS, _layout_folders, image_folder_dir, image_size, plan_listed

__all__ = ["Release", "RELEASES", "DEFAULT_IMAGE_SIZE", "plan_release"]

DEFAULT_IMAGE_SIZE = 256     # px: the reference's test view is Resize(256) + CenterCrop(224)


@dataclass(frozen=True)
class Release:
    """One released split: ``name`` (``--dataset``), ``title``, ``folders``: where the reference
    code reads it, relative to its data folder (looked for under ``--data-dir``), ``classes`` in
    the release (the docs' number; a folder with other classes is read as it is), ``fixed_order``:
    the reference configurations keep the folders' order."""

    name: str
    title: str
    folders: tuple[str, ...]
    classes: int
    fixed_order: bool = False

    def expected(self) -> str:
        return (f"expected {self.title}'s released split: train/<class>/* and test/<class>/* "
                f"(images {' '.join(IMAGE_EXTENSIONS)}) in --data-dir or in its subfolder "
                + " or ".join(f"{f}/" for f in self.folders))


RELEASES = (
    Release("imagenet-r", "ImageNet-R", ("imagenet-r",), 200),
    Release("imagenet-a", "ImageNet-A", ("imagenet-a",), 200),
    Release("cub200", "CUB-200-2011", ("cub",), 200),
    Release("objectnet", "ObjectNet", ("objectnet",), 200),
    Release("omnibenchmark", "OmniBenchmark", ("omnibenchmark",), 300),
    Release("vtab", "VTAB", ("vtab-cil/vtab", "vtab"), 50, fixed_order=True),
)


def _root(release: Release, data_dir: str) -> str:
    """The folder holding ``train/``: ``data_dir`` itself, else the first of ``release.folders``
    under it that does."""
    for cand in (data_dir, *(os.path.join(data_dir, f) for f in release.folders)):
        if os.path.isdir(os.path.join(cand, "train")):
            return cand
    raise DataError(f"{release.name}: no train/ folder in {data_dir}; {release.expected()}")


def plan_release(release: Release, opts: DataOptions) -> DataPlan:
    """A released split's listing (classes, images of both splits), nothing decoded or written;
    its ``load()`` decodes them into the image folders' cache."""
    data_dir = image_folder_dir(opts, release.name, release.expected())
    size = image_size(opts, DEFAULT_IMAGE_SIZE)
    root = _root(release, data_dir)
    listed = _layout_folders(root, ("test",), release.name)
    order = list(range(len(listed[2]))) if release.fixed_order else None
    return plan_listed(release.name, opts, "folders", root, listed, size, order)


def _register(release: Release) -> None:
    def plan(opts: DataOptions) -> DataPlan:
        return plan_release(release, opts)

    def load(opts: DataOptions) -> ImageDataset:
        return plan(opts).load()

    load.__doc__ = f"{release.title}'s released train/test split (``cilearn.data.released``)."
    DATASETS.register(release.name)(reads("data_dir", "image_size", "cache_dir", "workers")(load))
    PLANNERS[release.name] = plan


for _release in RELEASES:
    _register(_release)
