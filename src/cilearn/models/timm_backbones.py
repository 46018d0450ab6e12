"""``--backbone timm:NAME``: any model timm knows (``timm.list_models()``, a pretrained tag
included, e.g. ``timm:vit_base_patch16_224.augreg_in21k``) as a cilearn backbone.

The model is built by ``timm.create_model(NAME, pretrained=False, num_classes=0)``: no classifier;
the embedding is the model's pooled pre-logits features (``forward_head(..., pre_logits=True)``,
``[B, head_hidden_size]``, which is ``num_features`` for most models); the feature maps are the
output of ``forward_features`` where it is a ``[B, C, H, W]`` map (convolutional models), none
for token models (ViTs: the components that read feature maps, Grad-CAM attention, POD-spatial,
CIM's compressor, need a convolutional backbone).

Weights (``cilearn.models.weights``): without ``--weights``, the model's own pre-trained weights,
read from the local Hugging Face cache (or timm's older torch-hub cache) where a
``timm.create_model(NAME, pretrained=True)`` on a machine with network put them; never downloaded
at run time (a missing file is a one-line error saying how to get it). ``--weights FILE``: a file
of the timm model's own ``state_dict`` (its classifier, which the backbone has not, is dropped),
or a cilearn run's ``model.safetensors``. ``--weights random``: timm's initialisation, seeded.

Input (``cilearn.data.augment``): ``input_spec`` is the model's pretrained config: its channels,
input side (``img_size`` when given), interpolation and mean/std, the defaults of ``--input-size``,
``--data.interpolation`` and ``--normalize model``. The model takes 3-channel images; a 1-channel
data set's images are repeated to 3 channels in the input view.

timm is an optional dependency (``pip install 'cilearn[ptm]'``), imported only when a ``timm:``
backbone is used; it imports torchvision, which must match the installed torch
(docs/methods/pretrained.md). No copy of timm's code is in cilearn.
"""
from __future__ import annotations

import os
import urllib.parse
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn as nn

from ..components import REGISTRIES, option
from ..data.augment import INTERPOLATIONS, InputSpec
from ..errors import ConfigError, one_line
from .backbones import Backbone, BackboneFactory
from .weights import WeightsError

PREFIX = "timm:"
DOCS = "docs/methods/pretrained.md"


def import_timm(name: str) -> Any:
    """The ``timm`` module, or a ConfigError naming ``--backbone timm:NAME`` and what is missing."""
    try:
        import timm
    except Exception as e:  # noqa: BLE001  (not installed, or its torchvision does not match torch)
        raise ConfigError(f"--backbone {PREFIX}{name}: timm cannot be imported ({type(e).__name__}: {one_line(e)[:200]}); "
                          f"install the ptm extra (pip install 'cilearn[ptm]') with a torchvision that matches your "
                          f"torch ({DOCS})") from None
    return timm


class TimmNet(Backbone):
    """A timm model without classifier as a cilearn backbone: ``(maps, embedding)``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.out_dim = int(getattr(model, "head_hidden_size", None) or model.num_features)

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        f = self.model.forward_features(x)                        # [B, C, H, W] or tokens [B, N, D]
        emb = self.model.forward_head(f, pre_logits=True)         # [B, out_dim]
        maps = [f] if f.dim() == 4 and f.shape[1] == self.model.num_features else []
        return maps, emb


@dataclass(frozen=True)
class TimmOptions:
    """Keyword arguments of ``timm.create_model`` (None: the model's own; a model that does not
    take one refuses it with a one-line error). They build a smaller model than the named one
    (tests, smoke runs: ``--model.img-size 32 --model.patch-size 8 --model.depth 2``), whose
    tensors then no longer fit the named model's pre-trained weights."""
    # the model's input side (px), for models built for one (ViTs); None: the model's own (its pretrained config)
    img_size: int | None = option(None, alias="model.img_size")
    patch_size: int | None = option(None, alias="model.patch_size")   # ViTs: the patch side (px)
    depth: int | None = option(None, alias="model.depth")             # ViTs: the number of blocks
    embed_dim: int | None = option(None, alias="model.embed_dim")     # ViTs: the token width
    num_heads: int | None = option(None, alias="model.num_heads")     # ViTs: attention heads per block

    def __post_init__(self):
        for k, v in self.kwargs().items():
            if v < 1:
                raise ConfigError(f"--model.{k.replace('_', '-')} must be a positive integer, got {v}")

    def kwargs(self) -> dict[str, int]:
        """The options given, as ``create_model``'s keyword arguments (timm's defaults stand for the others)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


class TimmBackbone(BackboneFactory):
    """``timm:NAME`` (module docstring). One class per model name, built by the backbone
    registry's ``timm:`` family (``_component``)."""
    Options = TimmOptions
    default_weights: ClassVar[str] = "pretrained"
    model_name: ClassVar[str] = ""

    def _timm(self) -> Any:
        return import_timm(self.model_name)

    def _cfg(self) -> Any:
        """timm's pretrained config of the model (a ConfigError for a name timm does not know)."""
        timm = self._timm()
        try:
            known = timm.is_model(self.model_name)
            cfg = timm.models.get_pretrained_cfg(self.model_name) if known else None
        except RuntimeError as e:                           # a known architecture with an unknown tag
            raise ConfigError(f"--backbone {self.name}: {one_line(e)}") from None
        if cfg is None:
            arch = self.model_name.split(".")[0]
            near = timm.list_models(f"*{arch[:12]}*")[:5]
            raise ConfigError(f"--backbone {self.name}: timm has no model '{self.model_name}'"
                              + (f"; similar names: {', '.join(near)}" if near else "")
                              + " (timm.list_models() lists them)")
        return cfg

    def create(self, in_channels: int) -> TimmNet:
        self._cfg()
        kwargs = self.options.kwargs()
        try:
            model = self._timm().create_model(self.model_name, pretrained=False, num_classes=0, **kwargs)
        except (TypeError, ValueError, AssertionError, RuntimeError) as e:
            given = ", ".join(f"{k}={v}" for k, v in kwargs.items())
            raise ConfigError(f"--backbone {self.name}: timm cannot build it{' with ' + given if given else ''} "
                              f"({type(e).__name__}: {one_line(e)[:200]})") from None
        return TimmNet(model)

    def input_spec(self) -> InputSpec:
        cfg = self._cfg()
        channels, _, side = cfg.input_size
        interpolation = cfg.interpolation if cfg.interpolation in INTERPOLATIONS else "bilinear"
        return InputSpec(channels=int(channels), size=int(self.options.img_size or side), interpolation=interpolation,
                         mean=tuple(float(v) for v in cfg.mean), std=tuple(float(v) for v in cfg.std),
                         fixed=bool(cfg.fixed_input_size))

    def pretrained_file(self) -> Path:
        """The model's pre-trained weights in the local Hugging Face cache (the revision its
        ``hf_hub_id`` names, else ``main``), else in torch hub's checkpoint directory (timm's
        older URL weights). Local look-ups only."""
        cfg = self._cfg()
        looked = []
        if cfg.hf_hub_id:
            from huggingface_hub import constants, try_to_load_from_cache
            repo, _, revision = cfg.hf_hub_id.partition("@")
            for filename in ([cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]):
                got = try_to_load_from_cache(repo, filename, revision=revision or None)
                if isinstance(got, str):
                    return Path(got)
            looked.append(f"{repo} in the Hugging Face cache {constants.HF_HUB_CACHE}")
        if cfg.url:
            p = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urllib.parse.urlparse(cfg.url).path)
            if p.is_file():
                return p
            looked.append(str(p))
        if not looked:
            raise WeightsError(f"--backbone {self.name}: timm has no pre-trained weights for '{self.model_name}'; "
                               "give --weights FILE or --weights random")
        raise WeightsError(f"--backbone {self.name}: its pre-trained weights are not on this machine (looked for "
                           f"{'; '.join(looked)}) and cilearn never downloads: on a machine with network save them "
                           f"to a file and give --weights FILE ({DOCS}, 'Weights on an offline machine'), "
                           "or use --weights random")

    def weights_module(self, backbone: nn.Module) -> nn.Module:
        return backbone.model

    def adapt_tensors(self, tensors: dict[str, torch.Tensor], module: nn.Module) -> dict[str, torch.Tensor]:
        """Without the classifier's tensors (the pretrained config's ``classifier`` modules), which
        a model built with ``num_classes=0`` has not."""
        heads = self._cfg().classifier or ()
        heads = (heads,) if isinstance(heads, str) else tuple(heads)
        own = module.state_dict().keys()
        return {k: v for k, v in tensors.items()
                if k in own or not any(k == h or k.startswith(h + ".") for h in heads)}


def _component(model: str) -> type:
    """The backbone component ``timm:<model>``."""
    return type(f"TimmBackbone[{model}]", (TimmBackbone,),
                {"kind": "backbone", "name": PREFIX + model, "model_name": model, "__doc__": TimmBackbone.__doc__})


REGISTRIES["backbone"].register_family(PREFIX, _component)
