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

The decoded uint8 arrays are cached as ``imagefolder-<layout>-<size>px-<key>.npz`` in
``cache_dir`` (default ``<data_dir>/.cilearn-cache``, or ``$XDG_CACHE_HOME/cilearn`` i.e.
``~/.cache/cilearn`` when ``data_dir`` is not writable). The key is a sha1 of the layout,
the image size, the data directory's real path, the class names, and, per split, the ordered list
of (relative path, label, file size, mtime); any change of the file list, a label or a file
re-decodes. Cache files are written atomically (temp file + ``os.replace``); an unreadable cache
file is ignored and rebuilt. Old cache files are not deleted automatically.

The whole data set is held in memory (ImageNet at 64 px is about 15 GB of uint8).
Default augmentation ``"rrc-flip"``; mean/std are ImageNet's.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import zipfile

import numpy as np
import torch

from ..errors import ConfigError, DataError, one_line
from .base import DATASETS, DataOptions, ImageDataset

__all__ = ["load_imagefolder", "decode_image", "IMAGE_EXTENSIONS", "DEFAULT_IMAGE_SIZE"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
DEFAULT_IMAGE_SIZE = 64
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CACHE_VERSION = 1
WHO = "imagefolder"
_LAYOUTS_HELP = ("expected train/<class>/ + val/<class>/ folders, or Food-101's images/ + "
                 "meta/train.txt + meta/test.txt, or an image root with --train-list/--test-list")

# An item is (absolute path, path relative to data_dir, label, where it came from).
Item = tuple




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

def decode_image(path: str, size: int) -> np.ndarray:
    """Decode one image to uint8 ``[3, size, size]``: RGB, short side resized to ``size``,
    center crop. Raises DataError naming the file when Pillow cannot read it."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            if img.format == "JPEG":
                img.draft("RGB", (size, size))
            if img.mode == "P":
                img = img.convert("RGBA")   # palette (+ transparency) -> colours, then drop alpha
            img = img.convert("RGB")
            w, h = img.size
            if w < 1 or h < 1:
                raise ValueError(f"empty image {w}x{h}")
            if w <= h:
                nw, nh = size, max(size, int(round(h * size / w)))
            else:
                nw, nh = max(size, int(round(w * size / h))), size
            if (nw, nh) != (w, h):
                img = img.resize((nw, nh), getattr(Image, "Resampling", Image).BILINEAR)
            left, top = (nw - size) // 2, (nh - size) // 2
            if (nw, nh) != (size, size):
                img = img.crop((left, top, left + size, top + size))
            arr = np.asarray(img, dtype=np.uint8)
    except DataError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise DataError(f"{WHO}: cannot decode image {path}: {one_line(e)}") from None
    if arr.shape != (size, size, 3):
        raise DataError(f"{WHO}: image {path} decoded to shape {arr.shape}, expected "
                        f"({size}, {size}, 3)")
    return arr.transpose(2, 0, 1)


def _decode_all(items: list[Item], size: int, desc: str) -> np.ndarray:
    from tqdm import tqdm

    out = np.empty((len(items), 3, size, size), dtype=np.uint8)
    for i, it in enumerate(tqdm(items, desc=f"{WHO}: decoding {desc}", unit="img",
                                disable=len(items) < 100, file=sys.stderr, leave=False)):
        out[i] = decode_image(it[0], size)
    return out


# -------------------------------------------------------------------------------------- layouts

def _check_has_images(items: list[Item], classes: list[str], folder_of, split: str) -> None:
    counts = np.bincount(np.array([it[2] for it in items], dtype=np.int64), minlength=len(classes))
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        raise DataError(f"{WHO}: class folder {folder_of(int(empty[0]))} has no {split} images "
                        f"(accepted extensions: {' '.join(IMAGE_EXTENSIONS)})")


def _layout_folders(data_dir: str):
    train_dir = os.path.join(data_dir, "train")
    test_dir = next((os.path.join(data_dir, n) for n in ("val", "test")
                     if os.path.isdir(os.path.join(data_dir, n))), None)
    if test_dir is None:
        raise DataError(f"{WHO}: found {train_dir} but neither {os.path.join(data_dir, 'val')} "
                        f"nor {os.path.join(data_dir, 'test')}")
    classes = _subdirs(train_dir)
    if not classes:
        raise DataError(f"{WHO}: no class folders in {train_dir}; expected train/<class>/*.jpg")
    test_classes = _subdirs(test_dir)
    if set(test_classes) != set(classes):
        only_train = sorted(set(classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(classes))
        parts = []
        if only_train:
            parts.append(f"missing {', '.join(only_train[:5])}{' ...' if len(only_train) > 5 else ''}")
        if only_test:
            parts.append(f"extra {', '.join(only_test[:5])}{' ...' if len(only_test) > 5 else ''}")
        raise DataError(f"{WHO}: class folders of {test_dir} differ from those of {train_dir} "
                        f"({'; '.join(parts)})")
    splits = {}
    for split, root in (("train", train_dir), ("test", test_dir)):
        items = []
        for label, c in enumerate(classes):
            folder = os.path.join(root, c)
            files = _images_under(folder)
            if not files:
                raise DataError(f"{WHO}: class folder {folder} has no images "
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

def _cache_candidates(data_dir: str) -> list[str]:
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return [os.path.join(data_dir, ".cilearn-cache"), os.path.join(xdg, "cilearn")]


def _usable_dir(path: str) -> bool:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK | os.X_OK)


def _cache_dir(opts: DataOptions, data_dir: str) -> str | None:
    if opts.cache_dir:
        path = os.path.expanduser(opts.cache_dir)
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            raise DataError(f"{WHO}: cannot create cache directory {path}: {one_line(e)}") from None
        return path
    for cand in _cache_candidates(data_dir):
        if _usable_dir(cand):
            return cand
    return None


def _cache_key(layout: str, size: int, data_dir: str, classes: list[str],
               splits: dict[str, list[Item]]) -> str:
    h = hashlib.sha1()
    h.update(json.dumps({"v": CACHE_VERSION, "layout": layout, "size": size,
                         "dir": os.path.realpath(data_dir), "classes": classes}).encode())
    for split, items in splits.items():
        h.update(f"\n#{split}\n".encode())
        for abs_path, rel, label, origin in items:
            try:
                st = os.stat(abs_path)
            except FileNotFoundError:
                raise DataError(f"{WHO}: image {abs_path} not found (from {origin})") from None
            except OSError as e:
                raise DataError(f"{WHO}: cannot stat {abs_path}: {one_line(e)}") from None
            h.update(json.dumps([rel, label, st.st_size, st.st_mtime_ns]).encode())
            h.update(b"\n")
    return h.hexdigest()


def _warn(msg: str) -> None:
    print(f"{WHO}: warning: {msg}", file=sys.stderr)


def _read_cache(path: str, n_train: int, n_test: int, size: int):
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in ("train_x", "train_y", "test_x", "test_y")}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        _warn(f"ignoring unreadable cache file {path} ({one_line(e)})")
        return None
    ok = (arrays["train_x"].shape == (n_train, 3, size, size) and arrays["train_x"].dtype == np.uint8
          and arrays["test_x"].shape == (n_test, 3, size, size) and arrays["test_x"].dtype == np.uint8
          and arrays["train_y"].shape == (n_train,) and arrays["test_y"].shape == (n_test,))
    if not ok:
        _warn(f"ignoring cache file {path} with unexpected contents")
        return None
    return arrays


def _write_cache(path: str, arrays: dict[str, np.ndarray]) -> bool:
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=os.path.dirname(path))
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
        return True
    except OSError as e:
        _warn(f"could not write cache file {path} ({one_line(e)}); continuing without it")
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        return False


# --------------------------------------------------------------------------------------- loader

@DATASETS.register("imagefolder")
def load_imagefolder(opts: DataOptions) -> ImageDataset:
    """Load an image-folder data set (layout detected automatically, see the module docstring)."""
    if opts.data_dir is None:
        raise DataError(f"{WHO}: --data-dir is required; {_LAYOUTS_HELP}")
    data_dir = os.path.expanduser(opts.data_dir)
    if not os.path.isdir(data_dir):
        raise DataError(f"{WHO}: data directory {data_dir} not found; {_LAYOUTS_HELP}")
    size = DEFAULT_IMAGE_SIZE if opts.image_size is None else opts.image_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"--image-size must be an integer >= 1, got {size!r}")

    if opts.train_list or opts.test_list:
        layout = "lists"
        train, test, classes, extra = _layout_lists(data_dir, opts)
    elif os.path.isdir(os.path.join(data_dir, "train")):
        layout = "folders"
        train, test, classes, extra = _layout_folders(data_dir)
    elif (food := _food_root(data_dir)) is not None:
        layout = "food101"
        train, test, classes, extra = _layout_food(food)
    else:
        raise DataError(f"{WHO}: no known layout in {data_dir}; {_LAYOUTS_HELP}")

    key = _cache_key(layout, size, data_dir, classes, {"train": train, "test": test})
    cdir = _cache_dir(opts, data_dir)
    cache_path = (os.path.join(cdir, f"imagefolder-{layout}-{size}px-{key[:20]}.npz")
                  if cdir else None)
    arrays = _read_cache(cache_path, len(train), len(test), size) if cache_path else None
    cache_hit = arrays is not None
    if arrays is None:
        arrays = {
            "train_x": _decode_all(train, size, "train"),
            "train_y": np.array([it[2] for it in train], dtype=np.int64),
            "test_x": _decode_all(test, size, "test"),
            "test_y": np.array([it[2] for it in test], dtype=np.int64),
        }
        if cache_path is None:
            _warn(f"no writable cache directory (tried {', '.join(_cache_candidates(data_dir))}); "
                  "images will be decoded again next time")
        elif not _write_cache(cache_path, arrays):
            cache_path = None

    return ImageDataset(
        name="imagefolder",
        train_x=torch.from_numpy(np.ascontiguousarray(arrays["train_x"])),
        train_y=torch.from_numpy(arrays["train_y"].astype(np.int64)),
        test_x=torch.from_numpy(np.ascontiguousarray(arrays["test_x"])),
        test_y=torch.from_numpy(arrays["test_y"].astype(np.int64)),
        num_classes=len(classes), class_names=list(classes),
        mean=IMAGENET_MEAN, std=IMAGENET_STD, augment="rrc-flip", pad=0,
        info={"layout": layout, "data_dir": data_dir, "image_size": size,
              "cache": cache_path, "cache_hit": cache_hit, "cache_key": key, **extra},
    )
