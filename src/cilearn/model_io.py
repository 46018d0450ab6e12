"""A finished run's model as files of its own, to evaluate it or predict with it after the run.

Two files in the run directory, written when the run finishes (before ``metrics.json``):

* ``model.safetensors``: the network's weights (``net.<name>``, the keys of its ``state_dict``)
  and, for a method with exemplars, the nearest-mean-of-exemplars class means
  (``prototypes`` ``[K, D]``, rows in incremental-id order), so that NME prediction works too.
  safetensors is a table of tensors that is parsed, never unpickled: loading runs no code.
* ``model.json``: what rebuilds and uses it (``ModelSpec``): the network's architecture
  (``build_net``'s arguments), its number of classes, the input (``[C, H, W]``, uint8 pixels,
  the input view: resize, interpolation, input side and channels, the per-channel mean/std of the
  normalisation), the class order (incremental id -> data set
  label), the class names (by data set label), each phase's id range, the precision and batch
  size the run evaluated with, and the SHA-256 of ``model.safetensors`` (a damaged or swapped
  weights file is refused).

Not saved: what only training needs (CIM's rational activations, which the classifier's forward
never runs: a ReLU in their slot is the same function; the optimizer; the exemplars).

``load_model(RUN_DIR)`` rebuilds a ``TrainedModel``: ``predict(images)`` -> data set labels,
``evaluate(images, labels)`` -> the accuracies ``cilearn.evaluate`` defines. On the device and
precision of the run it gives the run's numbers exactly (``cilearn eval`` checks this on the run's
own test split). Any problem with the files is a one-line ``ModelFileError`` naming the file.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from . import __version__
from .data.augment import Augmenter
from .data.imagefolder import decode_image
from .errors import CilearnError, DataError, one_line
from .evaluate import PhaseEval, evaluate_phase, nme_predict, predict
from .files import atomic_write
from .memory.cim import phi_names
from .models import create_net, part
from .models.weights import WeightsError, parse_safetensors
from .prepare import resolve_device

MODEL_FILE = "model.safetensors"
SPEC_FILE = "model.json"
FORMAT = "cilearn-model/1"


class ModelFileError(CilearnError):
    """A saved model could not be read (missing, corrupt, foreign) or does not fit the input."""


def architecture(plan, in_channels: int) -> dict[str, Any]:
    """``create_net``'s arguments for a run (its ``RunPlan``): the backbone and head components with
    their options, the input channels, expandable (DER, FOSTER) or not, and the adapter with its
    options (None: none)."""
    bb, head = plan.names("backbone")[0], plan.names("head")[0]
    adapter = (plan.names("adapter") or [None])[0]
    return {"backbone": bb, "backbone_options": plan.options[bb], "head": head, "head_options": plan.options[head],
            "in_channels": in_channels, "expandable": plan.recipe.expandable, "adapter": adapter,
            "adapter_options": plan.options[adapter] if adapter else None}


def build_from(arch: dict[str, Any], init=None) -> torch.nn.Module:
    """A fresh network (no classes yet) from ``architecture``'s dict (one-line errors for a name or
    an option this cilearn does not know); ``init``: ``create_net``'s (the run's initial weights)."""
    try:
        adapter = arch.get("adapter")
        return create_net(part("backbone", arch["backbone"], **arch["backbone_options"]),
                          part("head", arch["head"], **arch["head_options"]), arch["in_channels"], arch["expandable"],
                          init, part("adapter", adapter, **arch["adapter_options"]) if adapter else None)
    except (KeyError, TypeError) as e:
        raise ModelFileError(f"the model's architecture cannot be rebuilt: {one_line(e)}") from None


@dataclass
class ModelSpec:
    """``model.json``. Filled by ``run_spec`` from the run, completed by ``save_model``."""
    architecture: dict[str, Any]          # ``architecture()``
    image_shape: list[int]                # [C, H, W] of the input images (uint8 pixels)
    mean: list[float]                     # per channel (or one for all), in [0, 1] pixel units: x_norm = (x / 255 - mean) / std
    std: list[float]
    class_order: list[int]                # incremental id (head row) -> data set label
    class_names: list[str]                # data set label -> name (the labels as strings when the data set has none)
    tasks: list[list[int]]                # [start, end) incremental ids of each phase's classes
    dataset: str                          # the data set the run trained on
    seed: int                             # the run's seed (the seeded --test-per-class subset of cilearn eval)
    precision: str                        # fp32 | bf16: what the run evaluated with
    channels_last: bool
    eval_batch_size: int
    num_classes: int = 0                  # head rows (set by save_model)
    logit_bias: bool = False              # a calibration's per-class logit correction (BiC) is part of the net
    prototypes: bool = False              # NME class means saved in model.safetensors
    input_size: int | None = None         # the network input's side, the images' centre crop (None: H)
    resize: int | None = None             # the side the images are resized to before the crop (cilearn.data.augment)
    interpolation: str = "bilinear"       # of that resize
    channels: int | None = None           # the network's input channels, a 1-channel image repeated (None: C)
    weights_sha256: str = ""              # of model.safetensors
    cilearn_version: str = __version__
    format: str = FORMAT


def run_spec(cfg, ds, arch: dict[str, Any], tasks: Sequence[tuple[int, int]], amp: torch.dtype | None,
             view: Augmenter) -> ModelSpec:
    """The spec of a run's model (``cfg``: the resolved ``RunConfig``, ``ds``: its ``ImageDataset``,
    ``view``: its ``Augmenter``, whose input view evaluation uses)."""
    names = list(ds.class_names) if len(ds.class_names) == ds.num_classes else [str(i) for i in range(ds.num_classes)]
    return ModelSpec(architecture=arch, image_shape=list(ds.image_shape), mean=list(view.mean), std=list(view.std),
                     class_order=list(cfg.scenario.class_order), class_names=names,
                     tasks=[[a, b] for a, b in tasks], dataset=cfg.data.dataset, seed=cfg.seed,
                     precision="bf16" if amp is not None else "fp32", channels_last=cfg.train.channels_last,
                     eval_batch_size=cfg.train.eval_batch_size, input_size=view.size, resize=view.resize,
                     interpolation=view.interpolation, channels=view.channels)


def save_model(out: Path, net: torch.nn.Module, spec: ModelSpec, prototypes: torch.Tensor | None) -> None:
    """Writes ``model.safetensors`` then ``model.json`` into ``out`` (each atomically)."""
    from safetensors.torch import save

    skip = phi_names(net)                       # CIM's rationals: training only (module docstring)
    tensors = {f"net.{k}": v.detach().cpu().contiguous() for k, v in net.state_dict().items() if k not in skip}
    if prototypes is not None:
        tensors["prototypes"] = prototypes.detach().float().cpu().contiguous()
    data = save(tensors)
    spec = dataclasses.replace(spec, num_classes=int(net.num_classes), logit_bias=net.logit_bias is not None,
                               prototypes=prototypes is not None, weights_sha256=hashlib.sha256(data).hexdigest())
    atomic_write(out / MODEL_FILE, data)
    atomic_write(out / SPEC_FILE, json.dumps(dataclasses.asdict(spec), indent=2) + "\n")


def _spec_files(path: Path) -> tuple[Path, Path]:
    """(model.json, model.safetensors) of a run directory, or of the model.json given."""
    if path.is_dir():
        return path / SPEC_FILE, path / MODEL_FILE
    if path.name == MODEL_FILE:
        return path.with_name(SPEC_FILE), path
    return path, path.with_name(MODEL_FILE)


def read_spec(path: Path) -> ModelSpec:
    """The ``ModelSpec`` of ``model.json`` (a run directory or the file), checked field by field."""
    spec_file, _ = _spec_files(path)
    if not spec_file.is_file():
        run = spec_file.parent
        hint = ("" if not (run / "config.yaml").exists() else
                ": the run finished before cilearn saved models" if (run / "metrics.json").exists() else
                ": the run is not finished (no metrics.json; continue it with cilearn run --resume)")
        raise ModelFileError(f"{spec_file} not found{hint or ': not a cilearn run directory or model'}")
    try:
        d = json.loads(spec_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{spec_file} cannot be read as JSON: {one_line(e)}") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise ModelFileError(f"{spec_file} is not a cilearn model description (expected \"format\": \"{FORMAT}\")")
    kinds = {"architecture": dict, "image_shape": list, "mean": list, "std": list, "class_order": list,
             "class_names": list, "tasks": list, "dataset": str, "seed": int, "precision": str, "channels_last": bool,
             "eval_batch_size": int, "num_classes": int, "logit_bias": bool, "prototypes": bool,
             "weights_sha256": str}
    for k, tp in kinds.items():
        if not isinstance(d.get(k), tp):
            raise ModelFileError(f"{spec_file}: key '{k}' is missing or not a {tp.__name__}; "
                                 "the file was edited or not written by this version of cilearn")
    for k in ("input_size", "resize", "channels"):       # optional: absent in older files
        if not isinstance(d.get(k), (int, type(None))):
            raise ModelFileError(f"{spec_file}: key '{k}' is not an integer; "
                                 "the file was edited or not written by this version of cilearn")
    if not isinstance(d.get("interpolation", "bilinear"), str):
        raise ModelFileError(f"{spec_file}: key 'interpolation' is not a string; "
                             "the file was edited or not written by this version of cilearn")
    known = {f.name for f in dataclasses.fields(ModelSpec)}
    return ModelSpec(**{k: v for k, v in d.items() if k in known})


def _read_weights(weights: Path, spec: ModelSpec) -> dict[str, torch.Tensor]:
    try:
        data = weights.read_bytes()
    except OSError as e:
        raise ModelFileError(f"cannot read {weights}: {e.strerror or e}") from None
    if hashlib.sha256(data).hexdigest() != spec.weights_sha256:
        raise ModelFileError(f"{weights} is corrupt or not the file its model.json describes (SHA-256 mismatch)")
    try:
        return parse_safetensors(data, weights)
    except WeightsError as e:
        raise ModelFileError(str(e)) from None


def load_model(path: str | Path, device: str | torch.device = "auto", precision: str | None = None) -> "TrainedModel":
    """The model of a finished run: ``path`` is the run directory (or its ``model.json``).
    ``device``: auto (CUDA when available), cpu, cuda, cuda:N; ``precision``: fp32 or bf16
    (default: the run's)."""
    device = resolve_device(str(device))
    path = Path(path)
    spec = read_spec(path)
    tensors = _read_weights(_spec_files(path)[1], spec)
    if precision not in (None, "fp32", "bf16"):
        raise ModelFileError(f"--precision must be fp32 or bf16, got '{precision}'")
    state = {k[4:]: v for k, v in tensors.items() if k.startswith("net.")}
    try:
        net = build_from(spec.architecture)
        net.add_classes(spec.num_classes)
        if spec.logit_bias:
            net.enable_logit_bias()
        net.load_state_dict(state)
        protos = tensors["prototypes"] if spec.prototypes else None
        if protos is not None and (protos.dim() != 2 or len(protos) != spec.num_classes):
            raise ValueError(f"prototypes of shape {list(protos.shape)}, expected [{spec.num_classes}, D]")
    except (CilearnError, KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ModelFileError(f"{_spec_files(path)[1]} does not fit its model.json ({type(e).__name__}: "
                             f"{one_line(e)[:300]})") from None
    return TrainedModel(net, spec, device, precision or spec.precision, protos)


class TrainedModel:
    """A finished run's network, ready to use: ``predict``, ``logits``, ``evaluate``. Images are
    ``[N, C, H, W]`` (or one ``[C, H, W]``) of the run's shape: uint8 pixels as the data sets hold
    them, or floats in [0, 1] (as ``torchvision.transforms.ToTensor`` gives); the model normalises
    them with the run's mean/std."""

    def __init__(self, net: torch.nn.Module, spec: ModelSpec, device: torch.device, precision: str,
                 prototypes: torch.Tensor | None):
        self.spec, self.device = spec, device
        self.net = net.to(device).eval()
        if spec.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.autocast = torch.bfloat16 if precision == "bf16" else None
        self.prototypes = prototypes.to(device) if prototypes is not None else None
        self.augmenter = Augmenter("none", 0, spec.mean, spec.std, spec.channels_last, spec.input_size,
                                   resize=spec.resize, interpolation=spec.interpolation, channels=spec.channels)
        self._labels = torch.tensor(spec.class_order, dtype=torch.long, device=device)   # id -> label

    @property
    def class_names(self) -> list[str]:
        """By data set label."""
        return self.spec.class_names

    def _pixels(self, images) -> torch.Tensor:
        """uint8 (or float in [0, 255]) ``[N, C, H, W]`` on the device."""
        x = torch.as_tensor(images)
        if x.dim() == 3:
            x = x[None]
        want = tuple(self.spec.image_shape)
        if x.dim() != 4 or tuple(x.shape[1:]) != want:
            raise DataError(f"images of shape {list(x.shape)}: this model takes [N, {want[0]}, {want[1]}, {want[2]}] "
                            "(uint8, or float in [0, 1])")
        if x.is_floating_point():
            x = x * 255.0
        elif x.dtype != torch.uint8:
            raise DataError(f"images of dtype {x.dtype}: expected uint8 pixels or floats in [0, 1]")
        return x.to(self.device)

    def outputs(self, images) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits ``[N, K]``, embeddings ``[N, D]``), float32; logit column k is the data set's
        label ``class_order[k]``."""
        return predict(self.net, self._pixels(images), self.augmenter, self.spec.eval_batch_size, self.autocast)

    def logits(self, images) -> torch.Tensor:
        return self.outputs(images)[0]

    def predict(self, images, nme: bool = False) -> torch.Tensor:
        """Data set labels ``[N]`` (int64): the argmax of the logits, or with ``nme`` the nearest
        class mean (methods with exemplars only)."""
        logits, emb = self.outputs(images)
        if nme:
            if self.prototypes is None:
                raise ModelFileError("nme: this model has no class means (its method keeps no exemplars)")
            return self._labels[nme_predict(emb, self.prototypes)]
        return self._labels[logits.argmax(1)]

    def label_ids(self, labels) -> torch.Tensor:
        """Data set labels -> incremental ids (head rows)."""
        y = torch.as_tensor(labels, dtype=torch.long, device=self.device)
        lut = torch.full((max(self.spec.class_order) + 1,), -1, dtype=torch.long, device=self.device)
        lut[self._labels] = torch.arange(len(self._labels), device=self.device)
        if len(y) and (y.min() < 0 or y.max() >= len(lut) or (lut[y] < 0).any()):
            raise DataError(f"labels outside the model's classes (data set labels {sorted(self.spec.class_order)})")
        return lut[y]

    def evaluate(self, images, labels) -> PhaseEval:
        """The accuracies of ``cilearn.evaluate`` (top-1, task-aware, NME, top-5, per task and per
        class) on ``images`` with data set ``labels``, as the run's last phase computes them."""
        y = self.label_ids(labels)
        logits, emb = self.outputs(images)
        return evaluate_phase(logits, emb, y, [tuple(t) for t in self.spec.tasks], self.prototypes)


def read_images(paths: Sequence[str | Path], image_shape: Sequence[int]) -> torch.Tensor:
    """Image files as uint8 ``[N, C, H, W]`` for a model taking ``image_shape`` (square): decoded as
    image folders are (RGB, short side resized to H, centre crop); one channel: Pillow's luma."""
    from PIL import Image

    c, h, w = image_shape
    if h != w or c not in (1, 3):
        raise DataError(f"reading image files needs a square 1- or 3-channel model input, this one takes {c}x{h}x{w}")
    out = []
    for p in paths:
        rgb = decode_image(str(p), h)                                        # [3, H, W]
        if c == 1:
            rgb = np.asarray(Image.fromarray(rgb.transpose(1, 2, 0)).convert("L"))[None]
        out.append(torch.from_numpy(np.array(rgb, dtype=np.uint8)))
    return torch.stack(out) if out else torch.zeros(0, c, h, w, dtype=torch.uint8)
