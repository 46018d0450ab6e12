"""Data set loaders: ``digits``, ``fashion-mnist``, ``cifar10``, ``cifar100`` (and ``imagefolder``,
registered by :mod:`cilearn.data.imagefolder`, and the released splits ``imagenet-r``, ``imagenet-a``,
``cub200``, ``objectnet``, ``omnibenchmark``, ``vtab``, registered by :mod:`cilearn.data.released`,
both imported here).

Every loader is ``fn(opts: DataOptions) -> ImageDataset`` and returns the whole data set in memory:
uint8 images ``[N, C, H, W]``, int64 labels ``[N]``. Anything the user can fix (missing, truncated
or corrupt files, a wrong layout) raises :class:`~cilearn.errors.DataError` with one line naming
the file or folder and what was expected.

``digits``
    scikit-learn's bundled 8x8 digits (``sklearn.datasets.load_digits``, 1797 images, 10 classes,
    no download). Pixel values 0..16 are scaled to uint8 with ``round(v * 255 / 16)``. The split is
    fixed and does NOT depend on the run seed: ``train_test_split(test_size=0.25, stratify=y,
    random_state=0)``, giving 1347 training and 450 test images. Default augmentation ``"none"``
    (flipping changes a digit's meaning, cropping an 8x8 image loses too much). mean/std are
    computed from the training images. ``data_dir`` is ignored.
``fashion-mnist``
    The four idx files (``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``,
    ``t10k-images-idx3-ubyte.gz``, ``t10k-labels-idx1-ubyte.gz``; the un-gzipped names are accepted
    too) in ``data_dir``, ``data_dir/fashion-mnist`` or ``data_dir/FashionMNIST/raw``; default
    directory ``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist``). Headers
    are checked (magic 0x00000803 / 0x00000801, big-endian dims, payload length). Default
    augmentation ``"flip"`` with ``pad=0``: horizontal flip only, no random crop. mean/std are
    computed from the training images (about 0.2860 / 0.3530 for the real data).
``cifar10`` / ``cifar100``
    The python-pickle releases: ``data_dir/cifar-10-batches-py/`` (``data_batch_1``..``5``,
    ``test_batch``, ``batches.meta``) and ``data_dir/cifar-100-python/`` (``train``, ``test``,
    ``meta``); ``data_dir`` may also be that inner directory itself. ``--data-dir`` is required.
    Default augmentation ``"crop-flip"`` with ``pad=4``; the usual published mean/std.
    These files are Python pickles; they are read with a restricted unpickler
    (:mod:`cilearn.data.safe_pickle`) that builds dicts, lists, bytes, ints and plain numeric numpy
    arrays and refuses any other global before it runs: a file that tries to run code is a
    ``DataError`` naming the file and the refused global.
"""
from __future__ import annotations

import gzip
import math
import os
import struct
import zlib

import numpy as np
import torch

from ..errors import ConfigError, DataError, one_line
from . import imagefolder  # noqa: F401  (registers the "imagefolder" loader)
from . import released  # noqa: F401  (registers the released splits: imagenet-r, vtab, ...)
from . import safe_pickle
from .base import DATASETS, PLANNERS, DataOptions, DataPlan, ImageDataset, reads

__all__ = [
    "DATASETS", "load_dataset", "plan_dataset", "is_image_folder", "subsample_per_class", "channel_stats", "read_idx",
    "load_digits_dataset", "load_fashion_mnist", "load_cifar10", "load_cifar100",
    "FASHION_MNIST_DIR", "FASHION_MNIST_CLASSES",
]


def load_dataset(name: str, opts: DataOptions | None = None) -> ImageDataset:
    """Look ``name`` up in :data:`DATASETS` (unknown name: ``ConfigError``) and load it."""
    loader = DATASETS.get(name)
    return loader(opts if opts is not None else DataOptions())


def plan_dataset(name: str, opts: DataOptions | None = None) -> DataPlan:
    """What ``name`` holds (classes, image size, ...) before anything is written: an image folder's
    listing is read, its images are decoded (and cached) by the plan's ``load()``; the other data
    sets are loaded here (nothing is written)."""
    DATASETS.get(name)                                   # an unknown name: the registry's ConfigError
    opts = opts if opts is not None else DataOptions()
    return PLANNERS[name](opts) if name in PLANNERS else DataPlan.of(load_dataset(name, opts))


def is_image_folder(name: str) -> bool:
    """``name`` is read from folders of full-size images (``imagefolder``, the released splits):
    the data sets on which the recipes take their ImageNet training defaults and options."""
    return name in PLANNERS


def subsample_per_class(x, y, n: int, seed: int, option: str = "--train-per-class"):
    """Keep a seeded random subset of ``n`` samples per class (all of a class that has fewer):
    ``numpy.random.default_rng(seed)`` draws each class's subset in turn, classes in label order.
    ``option`` names the flag in the error of a bad ``n``.

    The kept samples stay in their original relative order. ``x`` and ``y`` may be torch tensors
    or numpy arrays (indexed along the first dimension); returns ``(x, y)`` of the same types.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ConfigError(f"{option} must be an integer >= 1, got {n!r}")
    y_np = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    if len(x) != len(y_np):
        raise ValueError(f"subsample_per_class: {len(x)} samples but {len(y_np)} labels")
    rng = np.random.default_rng(seed)
    keep_parts = []
    for c in np.unique(y_np):  # sorted, so the draws do not depend on the data order of classes
        idx = np.flatnonzero(y_np == c)
        if len(idx) > n:
            idx = rng.choice(idx, size=int(n), replace=False)
        keep_parts.append(idx)
    keep = np.sort(np.concatenate(keep_parts)) if keep_parts else np.zeros(0, dtype=np.int64)

    def take(a):
        if isinstance(a, torch.Tensor):
            return a[torch.from_numpy(keep.astype(np.int64)).to(a.device)]
        return np.asarray(a)[keep]

    return take(x), take(y)


def channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (population) of uint8 images ``[N, C, H, W]``, in [0, 1] units.

    Exact integer sums over chunks, so memory stays small for large data sets.
    """
    n, c = x.shape[0], x.shape[1]
    per_image = max(1, int(np.prod(x.shape[1:])))
    chunk = max(1, (1 << 22) // per_image)
    s = torch.zeros(c, dtype=torch.int64)
    s2 = torch.zeros(c, dtype=torch.int64)
    for i in range(0, n, chunk):
        b = x[i:i + chunk].to(torch.int64)
        s += b.sum(dim=(0, 2, 3))
        s2 += (b * b).sum(dim=(0, 2, 3))
    m = n * x.shape[2] * x.shape[3]
    if m == 0:
        return (0.0,) * c, (1.0,) * c
    means, stds = [], []
    for k in range(c):
        mu = s[k].item() / m / 255.0
        var = s2[k].item() / m / (255.0 ** 2) - mu * mu
        means.append(mu)
        stds.append(math.sqrt(max(var, 0.0)))
    return tuple(means), tuple(stds)




# --------------------------------------------------------------------------------------- digits

@DATASETS.register("digits")
@reads()
def load_digits_dataset(opts: DataOptions) -> ImageDataset:
    """scikit-learn's 8x8 digits with a fixed stratified 75/25 split (``random_state=0``)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = np.asarray(d.images, dtype=np.float64)          # [1797, 8, 8], values 0..16
    x = np.floor(images * 255.0 / 16.0 + 0.5).clip(0, 255).astype(np.uint8)[:, None]
    y = np.asarray(d.target, dtype=np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, stratify=y, random_state=0)
    train_x = torch.from_numpy(np.ascontiguousarray(x_tr))
    mean, std = channel_stats(train_x)
    return ImageDataset(
        name="digits",
        train_x=train_x, train_y=torch.from_numpy(np.ascontiguousarray(y_tr)),
        test_x=torch.from_numpy(np.ascontiguousarray(x_te)),
        test_y=torch.from_numpy(np.ascontiguousarray(y_te)),
        num_classes=10, class_names=[str(i) for i in range(10)],
        mean=mean, std=std, augment="none", pad=0,
        info={"source": "sklearn.datasets.load_digits",
              "split": "train_test_split(test_size=0.25, stratify=y, random_state=0)"},
    )


# -------------------------------------------------------------------------------- fashion-mnist

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
_FMNIST_FILES = {
    "train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte",
}
_FMNIST_HINT = ("install Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist) "
                "or pass --data-dir DIR holding the four idx .gz files")
IDX_IMAGES_MAGIC = 0x00000803   # unsigned bytes, 3 dims
IDX_LABELS_MAGIC = 0x00000801   # unsigned bytes, 1 dim


def _read_maybe_gzip(path: str, who: str) -> bytes:
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise DataError(f"{who}: file {path} not found") from None
    except EOFError:
        raise DataError(f"{who}: file {path} is truncated (gzip stream ends early)") from None
    except (gzip.BadGzipFile, zlib.error) as e:
        raise DataError(f"{who}: file {path} is not a valid gzip file ({one_line(e)})") from None
    except OSError as e:
        raise DataError(f"{who}: cannot read {path}: {one_line(e)}") from None


def read_idx(path: str, magic: int, who: str = "idx") -> np.ndarray:
    """Parse an idx file (optionally gzipped) of unsigned bytes with the given magic number."""
    raw = _read_maybe_gzip(path, who)
    if len(raw) < 4:
        raise DataError(f"{who}: file {path} is truncated: {len(raw)} bytes, no idx header")
    got = int.from_bytes(raw[:4], "big")
    if got != magic:
        raise DataError(f"{who}: file {path} has idx magic 0x{got:08x}, expected 0x{magic:08x} "
                        f"({'images' if magic == IDX_IMAGES_MAGIC else 'labels'} file)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{who}: file {path} is truncated inside the idx header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims, dtype=np.int64))
    have = len(raw) - header
    if have != expected:
        kind = "truncated" if have < expected else "corrupt"
        raise DataError(f"{who}: file {path} is {kind}: header says {'x'.join(map(str, dims))} "
                        f"({expected} bytes of data) but it has {have}")
    return np.frombuffer(raw, dtype=np.uint8, count=expected, offset=header).reshape(dims).copy()


def _fmnist_dir(opts: DataOptions) -> str:
    if opts.data_dir is None:
        base = FASHION_MNIST_DIR
        if not os.path.isdir(base):
            raise DataError(f"fashion-mnist: default directory {base} not found; {_FMNIST_HINT}")
        return base
    base = os.path.expanduser(opts.data_dir)
    if not os.path.isdir(base):
        raise DataError(f"fashion-mnist: data directory {base} not found; {_FMNIST_HINT}")
    first = _FMNIST_FILES["train_x"]
    for cand in (base, os.path.join(base, "fashion-mnist"), os.path.join(base, "FashionMNIST", "raw")):
        if any(os.path.isfile(os.path.join(cand, first + ext)) for ext in (".gz", "")):
            return cand
    return base


@DATASETS.register("fashion-mnist")
@reads("data_dir")
def load_fashion_mnist(opts: DataOptions) -> ImageDataset:
    """Fashion-MNIST from its four idx files (gzipped or not)."""
    who = "fashion-mnist"
    d = _fmnist_dir(opts)
    paths = {}
    for key, stem in _FMNIST_FILES.items():
        gz, plain = os.path.join(d, stem + ".gz"), os.path.join(d, stem)
        if os.path.isfile(gz):
            paths[key] = gz
        elif os.path.isfile(plain):
            paths[key] = plain
        else:
            raise DataError(f"{who}: file {gz} not found; {_FMNIST_HINT}")
    arrays = {}
    for key, path in paths.items():
        magic = IDX_IMAGES_MAGIC if key.endswith("_x") else IDX_LABELS_MAGIC
        a = read_idx(path, magic, who)
        if key.endswith("_x") and a.ndim != 3:
            raise DataError(f"{who}: file {path} has {a.ndim} dims, expected 3 (N, rows, cols)")
        if key.endswith("_y") and a.ndim != 1:
            raise DataError(f"{who}: file {path} has {a.ndim} dims, expected 1")
        arrays[key] = a
    for split in ("train", "test"):
        nx, ny = len(arrays[f"{split}_x"]), len(arrays[f"{split}_y"])
        if nx != ny:
            raise DataError(f"{who}: {paths[f'{split}_x']} holds {nx} images but "
                            f"{paths[f'{split}_y']} holds {ny} labels")
        bad = arrays[f"{split}_y"] >= 10
        if bad.any():
            raise DataError(f"{who}: file {paths[f'{split}_y']} has label "
                            f"{int(arrays[f'{split}_y'][bad][0])}, expected 0..9")
    if arrays["train_x"].shape[1:] != arrays["test_x"].shape[1:]:
        raise DataError(f"{who}: {paths['train_x']} images are {arrays['train_x'].shape[1:]} but "
                        f"{paths['test_x']} images are {arrays['test_x'].shape[1:]}")
    train_x = torch.from_numpy(arrays["train_x"][:, None])
    mean, std = channel_stats(train_x)
    return ImageDataset(
        name="fashion-mnist",
        train_x=train_x, train_y=torch.from_numpy(arrays["train_y"].astype(np.int64)),
        test_x=torch.from_numpy(arrays["test_x"][:, None]),
        test_y=torch.from_numpy(arrays["test_y"].astype(np.int64)),
        num_classes=10, class_names=list(FASHION_MNIST_CLASSES),
        mean=mean, std=std, augment="flip", pad=0,
        info={"dir": d, "files": paths},
    )


# ---------------------------------------------------------------------------------------- CIFAR

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


class _CifarSpec:
    def __init__(self, name, inner, train_files, test_files, meta, label_key, names_key, k):
        self.name, self.inner, self.train_files, self.test_files = name, inner, train_files, test_files
        self.meta, self.label_key, self.names_key, self.k = meta, label_key, names_key, k

    def layout(self) -> str:
        files = ", ".join(self.train_files + self.test_files + [self.meta])
        return (f"DIR/{self.inner}/ holding {files} (the python pickle release, extracted), "
                f"or that folder itself")


_CIFAR10 = _CifarSpec("cifar10", "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)],
                      ["test_batch"], "batches.meta", b"labels", b"label_names", 10)
_CIFAR100 = _CifarSpec("cifar100", "cifar-100-python", ["train"], ["test"], "meta",
                       b"fine_labels", b"fine_label_names", 100)


def _cifar_dir(spec: _CifarSpec, opts: DataOptions) -> str:
    if opts.data_dir is None:
        raise DataError(f"{spec.name}: --data-dir is required; expected {spec.layout()}")
    base = os.path.expanduser(opts.data_dir)
    if not os.path.isdir(base):
        raise DataError(f"{spec.name}: data directory {base} not found; expected {spec.layout()}")
    inner = os.path.join(base, spec.inner)
    if os.path.isdir(inner):
        return inner
    if os.path.isfile(os.path.join(base, spec.train_files[0])):
        return base
    raise DataError(f"{spec.name}: folder {inner} not found; expected {spec.layout()}")


def _load_pickle(path: str, who: str):
    """The file's object, unpickled with ``safe_pickle`` (no code runs: other globals are refused)."""
    try:
        with open(path, "rb") as f:
            return safe_pickle.load(f)
    except safe_pickle.RefusedGlobal as e:
        raise DataError(f"{who}: file {path} is not a CIFAR release file: its pickle calls {e}, which the "
                        "release files never do; refused without running it") from None
    except FileNotFoundError:
        raise DataError(f"{who}: file {path} not found") from None
    except EOFError:
        raise DataError(f"{who}: file {path} is truncated or empty (pickle ends early)") from None
    except Exception as e:  # corrupt pickles raise almost anything
        raise DataError(f"{who}: file {path} is not a readable pickle "
                        f"({type(e).__name__}: {one_line(e)})") from None


def _get(d: dict, key: bytes):
    if key in d:
        return d[key]
    return d.get(key.decode("ascii"))  # re-pickled copies with str keys


def _cifar_batch(path: str, spec: _CifarSpec) -> tuple[np.ndarray, np.ndarray]:
    who = spec.name
    obj = _load_pickle(path, who)
    if not isinstance(obj, dict):
        raise DataError(f"{who}: file {path} is not the CIFAR layout: expected a dict, "
                        f"got {type(obj).__name__}")
    for key in (b"data", spec.label_key):
        if _get(obj, key) is None:
            raise DataError(f"{who}: file {path} is not the CIFAR layout: missing key {key!r}")
    data = _get(obj, b"data")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3072:
        desc = (f"{data.dtype} array of shape {tuple(data.shape)}" if isinstance(data, np.ndarray)
                else type(data).__name__)
        raise DataError(f"{who}: file {path}: b'data' is a {desc}, expected uint8 [N, 3072]")
    try:
        labels = np.asarray(_get(obj, spec.label_key))
        if labels.ndim != 1 or not (np.issubdtype(labels.dtype, np.integer) or labels.size == 0):
            raise ValueError
        labels = labels.astype(np.int64)
    except (ValueError, TypeError):
        raise DataError(f"{who}: file {path}: {spec.label_key!r} is not a list of integers") from None
    if len(labels) != len(data):
        raise DataError(f"{who}: file {path} has {len(data)} images but {len(labels)} labels")
    bad = (labels < 0) | (labels >= spec.k)
    if bad.any():
        raise DataError(f"{who}: file {path} has label {int(labels[bad][0])} out of range, "
                        f"expected 0..{spec.k - 1}")
    return data.reshape(-1, 3, 32, 32), labels


def _cifar_names(path: str, spec: _CifarSpec) -> list[str]:
    who = spec.name
    obj = _load_pickle(path, who)
    if not isinstance(obj, dict) or _get(obj, spec.names_key) is None:
        raise DataError(f"{who}: file {path} is not the CIFAR meta layout: "
                        f"missing key {spec.names_key!r}")
    raw = _get(obj, spec.names_key)
    try:
        names = [n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in raw]
    except TypeError:
        raise DataError(f"{who}: file {path}: {spec.names_key!r} is not a list of names") from None
    if len(names) != spec.k:
        raise DataError(f"{who}: file {path} lists {len(names)} class names, expected {spec.k}")
    return names


def _load_cifar(spec: _CifarSpec, opts: DataOptions, mean, std) -> ImageDataset:
    d = _cifar_dir(spec, opts)

    def load(files):
        xs, ys = [], []
        for fn in files:
            x, y = _cifar_batch(os.path.join(d, fn), spec)
            xs.append(x)
            ys.append(y)
        return (torch.from_numpy(np.ascontiguousarray(np.concatenate(xs))),
                torch.from_numpy(np.concatenate(ys)))

    train_x, train_y = load(spec.train_files)
    test_x, test_y = load(spec.test_files)
    names = _cifar_names(os.path.join(d, spec.meta), spec)
    return ImageDataset(
        name=spec.name, train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y,
        num_classes=spec.k, class_names=names, mean=mean, std=std,
        augment="crop-flip", pad=4, info={"dir": d},
    )


@DATASETS.register("cifar10")
@reads("data_dir")
def load_cifar10(opts: DataOptions) -> ImageDataset:
    """CIFAR-10 from ``cifar-10-batches-py/`` (python pickle release)."""
    return _load_cifar(_CIFAR10, opts, CIFAR10_MEAN, CIFAR10_STD)


@DATASETS.register("cifar100")
@reads("data_dir")
def load_cifar100(opts: DataOptions) -> ImageDataset:
    """CIFAR-100 (fine labels) from ``cifar-100-python/`` (python pickle release)."""
    return _load_cifar(_CIFAR100, opts, CIFAR100_MEAN, CIFAR100_STD)
