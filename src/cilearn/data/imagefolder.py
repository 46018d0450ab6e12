"""The ``imagefolder`` loader: ImageNet(-subset), Food-101 and any folder of images.

Three layouts under ``--data-dir`` are detected automatically, in this order:

1. **List files** (when ``--train-list``/``--test-list`` are given; both are required): one image
   root (``data_dir``) and two text files with lines ``relative/path.jpg label`` (the
   LUCIR/PODNet/FACIL ImageNet-subset lists). Paths are relative to ``data_dir``; a list file path
   is taken as given, or relative to ``data_dir`` if it does not exist as given. Blank lines are
   ignored; labels are integers and the training labels must be exactly ``0..K-1``. Class names are
   the images' parent folder names when every class has exactly one (distinct) parent folder,
   else ``str(label)``.
2. **Split folders**: ``train/<class>/...`` and ``val/<class>/...`` (or ``test/<class>/...``
   when there is no ``val/``). Classes are the sorted folder names of ``train/``; ``val/`` must
   have the same class set. Images are searched recursively inside each class folder.
3. **Food-101's release layout**: ``images/<class>/*.jpg`` with ``meta/train.txt`` and
   ``meta/test.txt`` (lines like ``apple_pie/1005649``, no extension); classes come from
   ``meta/classes.txt`` when present, else the sorted folder names of ``images/``.
   ``data_dir`` may also be the parent of the extracted ``food-101/`` folder.

Accepted extensions: .jpg .jpeg .png .bmp .webp (any case); other files are ignored. Hidden files
and folders (starting with ".") are ignored.

Images are decoded once with Pillow and converted to RGB (grayscale images are replicated to three
channels, palette images are expanded, an alpha channel is dropped), resized (bilinear,
antialiased) so that the SHORT side is ``image_size`` and center-cropped to a square
``image_size x image_size``. JPEGs are decoded with Pillow's draft mode (DCT-domain downscaling to
no less than ``image_size``) for speed. ``image_size`` defaults to 64 (``--image-size 224`` etc.).

Decoding runs in ``workers`` processes (``--data.workers``, default: the CPUs this process may
use, at most ``MAX_DEFAULT_WORKERS``; 1 decodes in this process), chunks of rows each, with a
progress bar, straight into the cache file. The cache is two files in ``cache_dir`` (default
``<data_dir>/.cilearn-cache``, or ``$XDG_CACHE_HOME/cilearn`` i.e. ``~/.cache/cilearn`` when
``data_dir`` is not writable), named ``imagefolder-<layout>-<size>px-<where>`` where ``<where>``
hashes the data directory's real path (and the list files' paths):

* ``.u8``: raw uint8 pixels, ``[N_train + N_test, 3, size, size]`` in C order (training images
  first, each split in listing order), no header; opened with ``numpy.memmap``, so images are read
  from disk only when used and the data set may be larger than RAM;
* ``.json``: the index: ``format``, ``version`` (``CACHE_VERSION``), ``layout``, ``image_size``,
  ``order`` ("NCHW"), ``train``/``test`` counts, ``classes``, the labels of both splits and
  ``key``: a sha1 of the layout, the image size, the data directory's real path, the class names
  and, per split, the ordered list of (relative path, label, file size, mtime).

A cache is used when its index has the current version and key and the ``.u8`` file has the
expected size; otherwise it is rebuilt: any change of the file list, a label, a file, the layout
or the size re-decodes. Both files are written under temporary names (``.tmp-*``) and renamed into
place, the ``.u8`` first and the index last, so an interrupted or failed build (an unreadable
image: one-line ``DataError`` naming the file) leaves no cache that could be used. Caches of other
sizes are kept; the ``.npz`` caches of cilearn <= 0.1 (version 1) are ignored, not deleted. With
no writable cache directory the images are decoded into RAM (a warning), again at every run.

``plan_imagefolder`` lists the folder (layout, classes, images; every image is stat'ed for the
cache key) without decoding or writing anything, so that a run checks its whole configuration
first; the plan's ``load()`` then opens or builds the cache. ``load_imagefolder`` does both.

``ImageDataset.train_x``/``test_x`` are tensors over the memory map (no copy); the runner moves
them to the training device or keeps them on the host (``--data.resident``, ``cilearn.data.rows``).

Default augmentation ``"rrc-flip"``; mean/std are ImageNet's.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConfigError, DataError, one_line
from .base import DATASETS, PLANNERS, DataOptions, DataPlan, ImageDataset, reads
from .image_cache import (CACHE_FORMAT, CACHE_VERSION, WHO, Item, _build_cache, _cache_candidates, _cache_dir,
                          _cache_key, _cache_name, _decode_all, _read_cache, _warn, decode_image, default_workers)

__all__ = ["load_imagefolder", "plan_imagefolder", "decode_image", "IMAGE_EXTENSIONS", "DEFAULT_IMAGE_SIZE"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
DEFAULT_IMAGE_SIZE = 64
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_LAYOUTS_HELP = ("expected train/<class>/ + val/<class>/ folders, or Food-101's images/ + "
                 "meta/train.txt + meta/test.txt, or an image root with --train-list/--test-list")



def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _subdirs(path: str) -> list[str]:
    try:
        with os.scandir(path) as it:
            return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))
    except OSError as e:
        raise DataError(f"{WHO}: cannot list folder {path}: {one_line(e)}") from None


def _images_under(folder: str) -> list[str]:
    """Image files under ``folder`` (recursive, sorted, hidden entries skipped)."""
    out = []
    for root, dirs, files in os.walk(folder, onerror=None):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out.extend(os.path.join(root, f) for f in sorted(files) if _is_image(f))
    return out


# ------------------------------------------------------------------------------------- decoding


# -------------------------------------------------------------------------------------- layouts

def _check_has_images(items: list[Item], classes: list[str], folder_of, split: str) -> None:
    counts = np.bincount(np.array([it[2] for it in items], dtype=np.int64), minlength=len(classes))
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        raise DataError(f"{WHO}: class folder {folder_of(int(empty[0]))} has no {split} images "
                        f"(accepted extensions: {' '.join(IMAGE_EXTENSIONS)})")


def _layout_folders(data_dir: str, test_names: tuple[str, ...] = ("val", "test"), who: str = WHO):
    """``train/<class>/`` and the first of ``test_names`` that exists (``val/``, else ``test/``),
    with the same class folders; classes in sorted folder order. ``who`` names the data set in errors."""
    train_dir = os.path.join(data_dir, "train")
    test_dir = next((os.path.join(data_dir, n) for n in test_names
                     if os.path.isdir(os.path.join(data_dir, n))), None)
    if test_dir is None:
        wanted = " nor ".join(os.path.join(data_dir, n) for n in test_names)
        raise DataError(f"{who}: found {train_dir} but {'neither ' if len(test_names) > 1 else 'not '}{wanted}")
    classes = _subdirs(train_dir)
    if not classes:
        raise DataError(f"{who}: no class folders in {train_dir}; expected train/<class>/*.jpg")
    test_classes = _subdirs(test_dir)
    if set(test_classes) != set(classes):
        only_train = sorted(set(classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(classes))
        parts = []
        if only_train:
            parts.append(f"missing {', '.join(only_train[:5])}{' ...' if len(only_train) > 5 else ''}")
        if only_test:
            parts.append(f"extra {', '.join(only_test[:5])}{' ...' if len(only_test) > 5 else ''}")
        raise DataError(f"{who}: class folders of {test_dir} differ from those of {train_dir} "
                        f"({'; '.join(parts)})")
    splits = {}
    for split, root in (("train", train_dir), ("test", test_dir)):
        items = []
        for label, c in enumerate(classes):
            folder = os.path.join(root, c)
            files = _images_under(folder)
            if not files:
                raise DataError(f"{who}: class folder {folder} has no images "
                                f"(accepted extensions: {' '.join(IMAGE_EXTENSIONS)})")
            items.extend((p, os.path.relpath(p, data_dir), label, folder) for p in files)
        splits[split] = items
    return splits["train"], splits["test"], classes, {"train_dir": train_dir, "test_dir": test_dir}


def _read_lines(path: str) -> list[tuple[int, str]]:
    try:
        with open(path, encoding="utf-8") as f:
            return [(i, line.strip()) for i, line in enumerate(f, 1) if line.strip()]
    except FileNotFoundError:
        raise DataError(f"{WHO}: list file {path} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{WHO}: cannot read list file {path}: {one_line(e)}") from None


def _resolve_list(path: str, data_dir: str) -> str:
    path = os.path.expanduser(path)
    if os.path.isfile(path) or os.path.isabs(path):
        return path
    alt = os.path.join(data_dir, path)
    return alt if os.path.isfile(alt) else path


def _parse_list(path: str, data_dir: str) -> list[Item]:
    items = []
    for lineno, line in _read_lines(path):
        parts = line.rsplit(maxsplit=1)
        label = None
        if len(parts) == 2:
            try:
                label = int(parts[1])
            except ValueError:
                label = None
        if label is None or label < 0:
            raise DataError(f"{WHO}: {path}:{lineno}: expected 'relative/path.jpg label' with an "
                            f"integer label >= 0, got {line[:80]!r}")
        rel = parts[0]
        items.append((os.path.join(data_dir, rel), rel, label, f"{path}:{lineno}"))
    if not items:
        raise DataError(f"{WHO}: list file {path} lists no images")
    return items


def _layout_lists(data_dir: str, opts: DataOptions):
    if not opts.train_list or not opts.test_list:
        raise ConfigError("--train-list and --test-list must be given together")
    train_list = _resolve_list(opts.train_list, data_dir)
    test_list = _resolve_list(opts.test_list, data_dir)
    train = _parse_list(train_list, data_dir)
    test = _parse_list(test_list, data_dir)
    present = sorted({it[2] for it in train})
    k = present[-1] + 1
    if len(present) != k:
        missing = sorted(set(range(k)) - set(present))
        raise DataError(f"{WHO}: labels in {train_list} must be 0..K-1 with none missing; "
                        f"missing {', '.join(map(str, missing[:10]))}"
                        f"{' ...' if len(missing) > 10 else ''}")
    for it in test:
        if it[2] >= k:
            raise DataError(f"{WHO}: {it[3]}: label {it[2]} out of range; {train_list} has "
                            f"labels 0..{k - 1}")
    parents: list[set[str]] = [set() for _ in range(k)]
    for it in train:
        parents[it[2]].add(os.path.basename(os.path.dirname(os.path.normpath(it[1]))))
    names = [next(iter(p)) if len(p) == 1 else "" for p in parents]
    if any(not n for n in names) or len(set(names)) != k:
        names = [str(i) for i in range(k)]
    return train, test, names, {"train_list": train_list, "test_list": test_list}


def _food_root(data_dir: str) -> str | None:
    for cand in (data_dir, os.path.join(data_dir, "food-101")):
        if os.path.isdir(os.path.join(cand, "images")) and \
                os.path.isfile(os.path.join(cand, "meta", "train.txt")):
            return cand
    return None


def _layout_food(root: str):
    images = os.path.join(root, "images")
    classes_file = os.path.join(root, "meta", "classes.txt")
    if os.path.isfile(classes_file):
        classes = [line for _, line in _read_lines(classes_file)]
        if len(set(classes)) != len(classes):
            raise DataError(f"{WHO}: {classes_file} lists a class twice")
    else:
        classes = _subdirs(images)
    if not classes:
        raise DataError(f"{WHO}: no classes: {classes_file} missing and no class folders in {images}")
    index = {c: i for i, c in enumerate(classes)}
    splits = {}
    for split in ("train", "test"):
        path = os.path.join(root, "meta", f"{split}.txt")
        items = []
        for lineno, line in _read_lines(path):
            cls, sep, rest = line.partition("/")
            if not sep or not rest or cls not in index:
                why = "unknown class" if sep and rest else "expected '<class>/<image id>'"
                raise DataError(f"{WHO}: {path}:{lineno}: {why}, got {line[:80]!r}")
            rel = os.path.join("images", line if _is_image(os.path.basename(line)) else line + ".jpg")
            items.append((os.path.join(root, rel), rel, index[cls], f"{path}:{lineno}"))
        if not items:
            raise DataError(f"{WHO}: {path} lists no images")
        _check_has_images(items, classes, lambda i: os.path.join(images, classes[i]), split)
        splits[split] = items
    return splits["train"], splits["test"], classes, {"root": root}


# ---------------------------------------------------------------------------------------- cache


# --------------------------------------------------------------------------------------- loader

@dataclass
class Listing:
    """An image folder as its files and folders give it, nothing decoded: ``key`` is the cache key
    (``_cache_key``), ``extra`` the layout's paths (list files, split folders)."""
    layout: str
    data_dir: str
    size: int
    workers: int
    key: str
    train: list[Item]
    test: list[Item]
    classes: list[str]
    extra: dict


def image_folder_dir(opts: DataOptions, who: str, expected: str) -> str:
    """``--data-dir`` as given (``~`` expanded): required, and a folder (else a ``DataError`` saying
    what ``expected`` layout it should hold)."""
    if opts.data_dir is None:
        raise DataError(f"{who}: --data-dir is required; {expected}")
    data_dir = os.path.expanduser(opts.data_dir)
    if not os.path.isdir(data_dir):
        raise DataError(f"{who}: data directory {data_dir} not found; {expected}")
    return data_dir


def image_size(opts: DataOptions, default: int) -> int:
    """``--image-size``, else ``default``; checked."""
    size = default if opts.image_size is None else opts.image_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"--image-size must be an integer >= 1, got {size!r}")
    return size


def plan_listed(name: str, opts: DataOptions, layout: str, data_dir: str, listed: tuple, size: int,
                class_order: list[int] | None = None) -> DataPlan:
    """The plan of an image folder whose layout has been read: ``listed`` is a layout's
    ``(train, test, classes, extra)``, ``size`` the stored side (``image_size``); ``--data.workers``
    is checked and every image is stat'ed for the cache key, nothing is decoded or written.
    ``name`` names the data set (its ``ImageDataset.name``), ``class_order`` its fixed order if any."""
    workers = default_workers() if opts.workers is None else opts.workers
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"--data.workers must be an integer >= 1, got {workers!r}")
    train, test, classes, extra = listed
    key = _cache_key(layout, size, data_dir, classes, {"train": train, "test": test})   # stats every image
    listing = Listing(layout, data_dir, size, workers, key, train, test, classes, extra)
    return DataPlan(name, len(classes), list(classes), (3, size, size), IMAGENET_MEAN, IMAGENET_STD,
                    "rrc-flip", 0, lambda: _load(name, opts, listing), class_order)


def plan_imagefolder(opts: DataOptions) -> DataPlan:
    """An image folder's listing (layout, classes, images of each split; see the module docstring),
    read without decoding an image or writing a file; its ``load()`` decodes them into the cache."""
    data_dir = image_folder_dir(opts, WHO, _LAYOUTS_HELP)
    size = image_size(opts, DEFAULT_IMAGE_SIZE)
    if opts.train_list or opts.test_list:
        layout = "lists"
        listed = _layout_lists(data_dir, opts)
    elif os.path.isdir(os.path.join(data_dir, "train")):
        layout = "folders"
        listed = _layout_folders(data_dir)
    elif (food := _food_root(data_dir)) is not None:
        layout = "food101"
        listed = _layout_food(food)
    else:
        raise DataError(f"{WHO}: no known layout in {data_dir}; {_LAYOUTS_HELP}")
    return plan_listed(WHO, opts, layout, data_dir, listed, size)


@DATASETS.register("imagefolder")
@reads("data_dir", "image_size", "train_list", "test_list", "cache_dir", "workers")
def load_imagefolder(opts: DataOptions) -> ImageDataset:
    """Load an image-folder data set (layout detected automatically, see the module docstring)."""
    return plan_imagefolder(opts).load()


PLANNERS[WHO] = plan_imagefolder


def _load(name: str, opts: DataOptions, listing: Listing) -> ImageDataset:
    """The images of a listed image folder: from its cache, or decoded (into a new cache)."""
    layout, data_dir, size, workers, key = listing.layout, listing.data_dir, listing.size, listing.workers, listing.key
    train, test, classes, extra = listing.train, listing.test, listing.classes, listing.extra
    paths = [it[0] for it in train] + [it[0] for it in test]
    labels = {"train_labels": [it[2] for it in train], "test_labels": [it[2] for it in test]}
    cdir = _cache_dir(opts, data_dir)
    base = os.path.join(cdir, _cache_name(layout, size, data_dir, extra)) if cdir else None
    got = _read_cache(base, key, len(paths), size) if base else None
    cache_hit = got is not None
    if got is not None:   # labels stay the listing's: never taken from the index (its key covers them)
        rows = got[0]
    else:
        index = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "layout": layout, "image_size": size,
                 "order": "NCHW", "train": len(train), "test": len(test), "classes": list(classes),
                 "key": key, **labels}
        rows = _build_cache(base, paths, size, workers, index, opts.progress) if base else None
        if rows is None:
            if base is None:
                _warn(f"no writable cache directory (tried {', '.join(_cache_candidates(data_dir))}); "
                      "images will be decoded again next time")
            base = None
            rows = _decode_all(paths, size, workers, None, opts.progress)
    x = torch.from_numpy(rows)           # over the memory map: nothing is read yet
    n_train = len(train)
    arrays = {"train_x": x[:n_train], "test_x": x[n_train:],
              "train_y": np.asarray(labels["train_labels"], dtype=np.int64),
              "test_y": np.asarray(labels["test_labels"], dtype=np.int64)}

    return ImageDataset(
        name=name,
        train_x=arrays["train_x"], train_y=torch.from_numpy(arrays["train_y"]),
        test_x=arrays["test_x"], test_y=torch.from_numpy(arrays["test_y"]),
        num_classes=len(classes), class_names=list(classes),
        mean=IMAGENET_MEAN, std=IMAGENET_STD, augment="rrc-flip", pad=0,
        info={"layout": layout, "data_dir": data_dir, "image_size": size,
              "cache": base + ".u8" if base else None, "cache_index": base + ".json" if base else None,
              "cache_hit": cache_hit, "cache_key": key, "workers": workers, **extra},
    )
