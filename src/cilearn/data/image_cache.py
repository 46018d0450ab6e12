"""Decoding image files and the uint8 cache of a decoded image folder (``cilearn.data.imagefolder``
lists the folder; this module turns the listed files into images and keeps them): Pillow decoding
resized to a square (``decode_image``), decoding in worker processes, and the memory-mapped cache
with its index (keyed by the layout, size, folder, classes and files), written atomically and
reused by later runs.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile

import numpy as np

from ..errors import DataError, one_line
from .base import DataOptions

WHO = "imagefolder"            # how the errors name the loader
Item = tuple                   # (absolute path, path relative to data_dir, label, where it came from)
CACHE_VERSION = 2                  # 1: the .npz caches of cilearn <= 0.1
CACHE_FORMAT = "cilearn-imagefolder-cache"
CHUNK_ROWS = 256                   # images per decoding task, at most
MAX_DEFAULT_WORKERS = 32


def _fit_square(img, size: int, Image) -> np.ndarray:
    """An open Pillow image as uint8 ``[size, size, 3]``: RGB, short side resized (bilinear) to
    ``size``, center crop."""
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
    return np.asarray(img, dtype=np.uint8)


def decode_image(path: str, size: int) -> np.ndarray:
    """Decode one image to uint8 ``[3, size, size]``: RGB, short side resized to ``size``,
    center crop. Raises DataError naming the file when Pillow cannot read it."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            # Pillow's decompression-bomb limit (Image.MAX_IMAGE_PIXELS) is an error, not a warning
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                arr = _fit_square(img, size, Image)
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as e:
        raise DataError(f"{WHO}: cannot decode image {path}: {one_line(e)}") from None
    if arr.shape != (size, size, 3):
        raise DataError(f"{WHO}: image {path} decoded to shape {arr.shape}, expected "
                        f"({size}, {size}, 3)")
    return arr.transpose(2, 0, 1)


def _decode_rows(paths: list[str], size: int, out: str | None, start: int) -> np.ndarray | None:
    """Decode ``paths`` (one chunk, in a worker process or in this one) to uint8
    ``[len(paths), 3, size, size]``: written at row ``start`` of the raw file ``out`` (rows of
    ``3 * size * size`` bytes), or returned when ``out`` is None."""
    rows = np.empty((len(paths), 3, size, size), dtype=np.uint8)
    for i, path in enumerate(paths):
        rows[i] = decode_image(path, size)
    if out is None:
        return rows
    with open(out, "r+b") as f:
        f.seek(start * rows[0].nbytes)
        f.write(rows.tobytes())
    return None


def default_workers() -> int:
    """The CPUs this process may run on, at most ``MAX_DEFAULT_WORKERS``."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:               # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(n, MAX_DEFAULT_WORKERS))


def _decode_all(paths: list[str], size: int, workers: int, out: str | None, show_bar: bool) -> np.ndarray | None:
    """Decode every image of ``paths`` into the raw file ``out`` (already ``len(paths)`` rows long),
    or into an array that is returned when ``out`` is None. ``workers`` > 1: a process pool over
    chunks of rows; the same bytes as ``workers`` = 1. A ``DataError`` (an unreadable image) stops
    the pool and is raised here. ``show_bar``: a progress bar (``DataOptions.progress``) from 100 images."""
    from tqdm import tqdm

    n = len(paths)
    chunk = max(1, min(CHUNK_ROWS, -(-n // (4 * max(1, workers)))))
    spans = [(a, min(n, a + chunk)) for a in range(0, n, chunk)]
    arr = np.empty((n, 3, size, size), dtype=np.uint8) if out is None else None
    bar = tqdm(total=n, desc=f"{WHO}: decoding {n} images to {size}px ({workers} process"
               f"{'es' if workers > 1 else ''})", unit="img", disable=n < 100 or not show_bar, file=sys.stderr, leave=False)
    try:
        if workers <= 1 or len(spans) == 1:
            for a, b in spans:
                got = _decode_rows(paths[a:b], size, out, a)
                if arr is not None:
                    arr[a:b] = got
                bar.update(b - a)
            return arr
        import multiprocessing
        from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            futures = {pool.submit(_decode_rows, paths[a:b], size, out, a): (a, b) for a, b in spans}
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for f in done:
                    if f.exception() is not None:
                        for p in pending:
                            p.cancel()
                        raise f.exception()
                    a, b = futures[f]
                    if arr is not None:
                        arr[a:b] = f.result()
                    bar.update(b - a)
        return arr
    finally:
        bar.close()


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


def _cache_name(layout: str, size: int, data_dir: str, extra: dict) -> str:
    """``imagefolder-<layout>-<size>px-<where>``: one cache per data directory (and list files),
    layout and size; a changed listing rebuilds it in place."""
    where = json.dumps([os.path.realpath(data_dir), layout,
                        {k: os.path.realpath(v) for k, v in sorted(extra.items()) if k.endswith("_list")}])
    return f"imagefolder-{layout}-{size}px-{hashlib.sha1(where.encode()).hexdigest()[:16]}"


def _read_cache(base: str, key: str, n: int, size: int) -> tuple[np.ndarray, dict] | None:
    """The memory-mapped rows ``[n, 3, size, size]`` of cache ``base`` (``.u8`` + ``.json``) and
    its index, or None when it is absent, stale or damaged (a warning for the last)."""
    index_path, data_path = base + ".json", base + ".u8"
    if not os.path.isfile(index_path):
        return None
    try:
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
        if not isinstance(index, dict) or index.get("format") != CACHE_FORMAT \
                or index.get("version") != CACHE_VERSION or index.get("key") != key:
            return None                   # another listing or version: rebuilt without a warning
        expected = n * 3 * size * size
        if os.path.getsize(data_path) != expected or \
                [index.get("train"), index.get("test"), index.get("image_size")] != \
                [len(index["train_labels"]), len(index["test_labels"]), size] or \
                index["train"] + index["test"] != n:
            raise ValueError(f"{data_path} does not hold {n} images of 3x{size}x{size}")
        rows = np.memmap(data_path, dtype=np.uint8, mode="c", shape=(n, 3, size, size))
    except (OSError, ValueError, KeyError, TypeError) as e:
        _warn(f"ignoring damaged cache {base}.* ({one_line(e)}); rebuilding it")
        return None
    return rows, index


def _unlink_quietly(path: str | None) -> None:
    if path is not None:
        try:
            os.unlink(path)
        except OSError:
            pass


def _build_cache(base: str, paths: list[str], size: int, workers: int, index: dict, show_bar: bool) -> np.ndarray | None:
    """Decode ``paths`` into cache ``base``: ``.u8`` then ``.json``, each written under a ``.tmp-``
    name and renamed into place. Returns the memory-mapped rows, or None (with a warning) when the
    cache directory cannot be written; a ``DataError`` while decoding removes the temporary file."""
    folder, name = os.path.split(base)
    n, tmp = len(paths), None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".tmp-{name}-", suffix=".u8", dir=folder)
        try:
            os.ftruncate(fd, n * 3 * size * size)
        finally:
            os.close(fd)
        _decode_all(paths, size, workers, tmp, show_bar)
        with open(tmp, "r+b") as f:
            os.fsync(f.fileno())
        _unlink_quietly(base + ".json")   # the old index first: never a new .u8 under an old index
        os.replace(tmp, base + ".u8")
        tmp = None
        fd, tmp = tempfile.mkstemp(prefix=f".tmp-{name}-", suffix=".json", dir=folder)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(index, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, base + ".json")
        tmp = None
    except OSError as e:
        _warn(f"could not write cache {base}.* ({one_line(e)}); continuing without it")
        return None
    finally:
        _unlink_quietly(tmp)
    return np.memmap(base + ".u8", dtype=np.uint8, mode="c", shape=(n, 3, size, size))
