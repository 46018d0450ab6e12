"""A backbone's initial weights: ``--weights FILE|random|pretrained`` (config ``model.weights``).

* ``FILE``: a ``.safetensors`` file (parsed by the ``safetensors`` package) or a PyTorch state
  dict (``torch.save``; read with ``torch.load(weights_only=True)``: tensors and plain containers
  only, a pickle that names any other Python global is refused before it runs). Which of the two
  is decided by the file's first bytes, not its name. A finished cilearn run's
  ``model.safetensors`` (or a state dict of a cilearn network, keys ``backbone.*``, ``head.*``)
  gives its backbone's tensors, the ``backbone.`` prefix taken off: pre-train with cilearn, then
  start another run from those weights. Any other file holds the tensors of the backbone's own
  module (``BackboneFactory.weights_module``: the timm model itself for ``timm:NAME``), after the
  backbone's ``adapt_tensors`` (a timm checkpoint's classifier is dropped: the backbone has none).
* ``random``: the backbone's seeded random initialisation (the run's seed).
* ``pretrained``: the backbone's own pre-trained weights, read from the local cache where the
  backbone keeps them (``BackboneFactory.pretrained_file``; timm: the Hugging Face cache), never
  downloaded.
* not given: the backbone's ``default_weights`` (cilearn's own backbones: random; timm: pretrained).

A file's tensors must fit the backbone exactly: every key present, no extra key, the same shape
and kind (floating point or not) as the backbone's; anything else (a key missing or extra, a
wrong shape, a truncated or corrupt file, a file that is not a state dict, a pickle that would
run code) is a one-line ``WeightsError`` naming the file and the first offending key, raised by
``resolve_weights`` while the run is being prepared: nothing is written, nothing runs.

The file's SHA-256 is the run's ``model.weights_sha256`` (``config.yaml``; ``metrics.json`` has it
as ``weights_sha256``); a configuration that gives one (a replayed ``config.yaml``, a resume)
refuses a file with another digest. The loaded weights are what phase 0 starts from; under an
expandable network (DER, FOSTER) every new extractor starts from them too, as PyCIL builds each
new extractor with the same ``pretrained`` setting.
"""
from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn as nn

from ..errors import CilearnError, ConfigError, one_line

if TYPE_CHECKING:
    from ..config import RunConfig
    from .backbones import BackboneFactory

RANDOM, PRETRAINED = "random", "pretrained"
NET_PREFIX = "net."          # a cilearn run's model.safetensors (cilearn.model_io)
BACKBONE_PREFIX = "backbone."
# the top-level modules of a cilearn network (IncrementalNet): a state dict with only these is one
NET_PARTS = ("backbone", "head", "logit_bias")


class WeightsError(CilearnError):
    """A weights file is missing, unreadable, not a state dict, or does not fit the backbone; the
    message names the file and the first offending key."""


@dataclass
class WeightsFile:
    """A weights file as read: its tensors by name, its SHA-256, and whether they are a cilearn
    network's backbone's (``own``: they fit the cilearn backbone module itself) or a foreign
    module's (they fit ``BackboneFactory.weights_module``)."""
    path: Path
    sha256: str
    tensors: dict[str, torch.Tensor]
    own: bool


def parse_safetensors(data: bytes, label: Path | str) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors bytes ``data`` of the file ``label`` names: parsed, nothing
    executed."""
    from safetensors.torch import load

    try:
        return load(data)
    except Exception as e:  # noqa: BLE001  (safetensors' parser error: a damaged or foreign file)
        raise WeightsError(f"{label} is not a safetensors file: {one_line(e)}") from None


def _torch_state(data: bytes, label: str) -> object:
    """``torch.load(weights_only=True)`` of ``data``: tensors and plain containers only."""
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (refused global, truncated archive, not a torch file)
        text = one_line(e)
        refused = re.search(r"Unsupported global: (GLOBAL \S+)", text)     # the weights-only unpickler's refusal
        why = f"its pickle calls {refused.group(1)[len('GLOBAL '):]}" if refused else text[:300]
        raise WeightsError(f"{label} cannot be read as a PyTorch state dict with torch.load(weights_only=True), "
                           f"nothing in it was run: {why}") from None


def read_weights(path: str | Path, where: str = "--weights") -> WeightsFile:
    """The tensors of the weights file ``path`` (module docstring); ``where`` names the option in
    messages."""
    path = Path(path).expanduser()
    try:
        data = path.read_bytes()
    except OSError as e:
        raise WeightsError(f"{where} {path}: cannot read it ({e.strerror or e})") from None
    digest = hashlib.sha256(data).hexdigest()
    label = f"{where} {path}"
    if data[:4] == b"PK\x03\x04" or data[:1] == b"\x80":       # torch.save's zip archive, or a legacy pickle
        state = _torch_state(data, label)
    else:
        state = parse_safetensors(data, label)
    if not isinstance(state, dict) or not state:
        raise WeightsError(f"{label} is not a state dict: it holds "
                           f"{'an empty mapping' if isinstance(state, dict) else _a(state)}, "
                           "expected a mapping of names to tensors")
    for k, v in state.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise WeightsError(f"{label} is not a state dict: key {k!r} holds {_a(v)}, not a tensor"
                               + (" (a training checkpoint? save its model's state_dict() alone)"
                                  if isinstance(v, dict) else ""))
    tensors, own = _backbone_tensors(state)
    return WeightsFile(path, digest, tensors, own)


def _a(value: object) -> str:
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _backbone_tensors(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], bool]:
    """(tensors, own): a cilearn network's backbone tensors with their prefix taken off (a run's
    ``model.safetensors``: ``net.backbone.*``; a network's state dict: ``backbone.*``), else
    ``state`` as it is."""
    for prefix in (NET_PREFIX, ""):
        keys = [k[len(prefix):] for k in state if k.startswith(prefix)]
        parts = {k.split(".", 1)[0] for k in keys}
        if "backbone" in parts and parts <= set(NET_PARTS):
            return {k[len(prefix) + len(BACKBONE_PREFIX):]: v for k, v in state.items()
                    if k.startswith(prefix + BACKBONE_PREFIX)}, True
    return state, False


def check_fit(module: nn.Module, tensors: dict[str, torch.Tensor], where: str, what: str) -> None:
    """A ``WeightsError`` naming the first key (in the module's order; then the file's extra keys)
    whose tensor is missing, of another shape or kind, or not the module's."""
    want = module.state_dict()
    for k, t in want.items():
        if k not in tensors:
            raise WeightsError(f"{where}: key '{k}' of {what} is missing from the file "
                               f"({len(tensors)} tensors in the file, {len(want)} in {what})")
        got = tensors[k]
        if tuple(got.shape) != tuple(t.shape):
            raise WeightsError(f"{where}: key '{k}' has shape {list(got.shape)} in the file, {what} has "
                               f"{list(t.shape)}")
        if got.is_floating_point() != t.is_floating_point():
            raise WeightsError(f"{where}: key '{k}' holds {got.dtype} values in the file, {what} {t.dtype}")
    extra = next((k for k in tensors if k not in want), None)
    if extra is not None:
        raise WeightsError(f"{where}: key '{extra}' is not a tensor of {what} (an extra key; "
                           f"{len(tensors)} tensors in the file, {len(want)} in {what})")


def fitted(factory: "BackboneFactory", backbone: nn.Module, wf: WeightsFile,
           where: str | None = None) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The module of ``backbone`` (built by ``factory``) that ``wf``'s tensors are loaded into, and
    the tensors (a foreign file's adapted), checked to fit (``check_fit``; ``where`` names the file
    in its error, default ``--weights FILE``)."""
    if wf.own:
        target, tensors = backbone, wf.tensors
    else:
        target = factory.weights_module(backbone)
        tensors = factory.adapt_tensors(wf.tensors, target)
    check_fit(target, tensors, where or f"--weights {wf.path}", f"the backbone {factory.name}")
    return target, tensors


def load_weights(factory: "BackboneFactory", backbone: nn.Module, weights: str | Path | WeightsFile,
                 where: str | None = None) -> WeightsFile:
    """Loads the weights file ``weights`` (a path, or a ``WeightsFile`` already read) into
    ``backbone``, a module built by ``factory.create`` (the Python API of ``--weights FILE``);
    a ``WeightsError`` naming the first offending key leaves ``backbone`` as it was."""
    wf = weights if isinstance(weights, WeightsFile) else read_weights(weights)
    target, tensors = fitted(factory, backbone, wf, where)
    target.load_state_dict(tensors, strict=True)
    return wf


def weights_path(choice: str, factory: "BackboneFactory") -> Path | None:
    """The file ``--weights choice`` reads (None: random)."""
    if choice == RANDOM:
        return None
    if choice == PRETRAINED:
        return factory.pretrained_file()
    return Path(choice).expanduser()


def _where(choice: str, path: Path) -> str:
    return f"--weights {path}" if choice != PRETRAINED else f"the pretrained weights {path}"


def _check_digest(cfg: "RunConfig", wf: WeightsFile, where: str) -> None:
    want = cfg.model.weights_sha256
    if want is not None and want != wf.sha256:
        raise WeightsError(f"{where} has SHA-256 {wf.sha256}, the configuration asks for {want} "
                           "(model.weights_sha256, which a run's config.yaml records): give the file that run used, "
                           "or --model.weights-sha256 null to accept this one")


def _probe(factory: "BackboneFactory", in_channels: int) -> nn.Module:
    """The backbone module with no real weights (on the meta device where it builds there), to
    check a file against its keys and shapes; the global random state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        try:
            with torch.device("meta"):
                return factory.create(in_channels)
        except CilearnError:
            raise
        except Exception:  # noqa: BLE001  (a module whose construction needs real tensors: build it on the CPU)
            return factory.create(in_channels)


def resolve_weights(cfg: "RunConfig", factory: "BackboneFactory", in_channels: int) -> Path | None:
    """Fills ``cfg.model.weights`` (the backbone's default when not given) and
    ``cfg.model.weights_sha256`` (the file's), after checking the file against the backbone
    (module docstring); builds the backbone once without weights, so that an option it refuses
    fails here, before the run writes anything. Returns the file read (None: random)."""
    choice = cfg.model.weights or factory.default_weights
    cfg.model.weights = choice
    path = weights_path(choice, factory)
    module = _probe(factory, in_channels)
    if path is None:
        if cfg.model.weights_sha256 is not None:
            raise ConfigError("--model.weights-sha256 is given but the weights are random (--weights random): "
                              "give the weights file, or drop the digest")
        return None
    where = _where(choice, path)
    wf = read_weights(path, "--weights" if choice != PRETRAINED else "the pretrained weights")
    _check_digest(cfg, wf, where)
    cfg.model.weights_sha256 = wf.sha256
    try:
        fitted(factory, module, wf, where)
    except WeightsError as e:
        if choice != PRETRAINED:
            raise
        raise WeightsError(f"{e}; the cache holds this model's weights in another layout, which its library converts "
                           "when it loads them: load them with it once, save the model's state_dict() and give "
                           "--weights FILE (docs/methods/pretrained.md)") from None
    return path.resolve()


def initializer(cfg: "RunConfig", factory: "BackboneFactory") -> tuple[Callable[[nn.Module], None] | None, Path | None]:
    """(a function that loads the run's weights into a freshly built backbone, the file), for a
    ``cfg`` that ``resolve_weights`` resolved; (None, None) for random weights. The file is read
    again and its digest checked against the configuration's."""
    path = weights_path(cfg.model.weights or factory.default_weights, factory)
    if path is None:
        return None, None
    where = _where(cfg.model.weights, path)
    wf = read_weights(path, "--weights" if cfg.model.weights != PRETRAINED else "the pretrained weights")
    _check_digest(cfg, wf, where)

    return (lambda backbone: load_weights(factory, backbone, wf, where)), path.resolve()
