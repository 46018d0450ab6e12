"""Backbones. Every backbone maps images to ``(feature_maps, embedding)``:

* ``feature_maps``: list with the output of each stage, ``[B, C_s, H_s, W_s]`` (post-ReLU,
  except the last stage's with ``last_relu=False``); the last one is what Grad-CAM / CAM read,
  all of them what POD-spatial reads.
* ``embedding``: ``[B, out_dim]``, global average pool of the last stage.

Every backbone is a component of kind ``backbone`` (``--backbone NAME``) whose ``create(in_channels)``
builds the module (with its random initialisation; ``cilearn.models.weights`` loads a weights file
into it); its option ``last_relu`` (``--model.last-relu``). A pre-trained backbone family
(``timm:NAME``, ``cilearn.models.timm_backbones``) also says where its own weights are
(``pretrained_file``) and which input they expect (``input_spec``). ``last_relu=False`` drops the ReLU after
the last block (the residual sum goes out as is), as the official LUCIR and PODNet ResNets do:
the embedding can then have negative coordinates, which a cosine classifier needs to spread
classes over the whole sphere rather than one orthant (LUCIR Sec. 3.2, "we remove the ReLU of
the last layer"). The plain ``convnet`` ignores the flag (see ``ConvNet``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..components import Component, NoOptions, option, register
from ..data.augment import InputSpec
from ..errors import ConfigError


class Backbone(nn.Module):
    out_dim: int

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:  # pragma: no cover
        raise NotImplementedError


class BasicBlock(nn.Module):
    """3x3-3x3 residual block. ``shortcut="A"``: parameter-free (strided subsample + zero channel
    padding, He et al. 2016 Sec. 4.2, CIFAR ResNets); ``"B"``: 1x1 conv + BN projection."""

    def __init__(self, cin: int, cout: int, stride: int, shortcut: str = "B", relu_out: bool = True):
        super().__init__()
        self.relu_out = relu_out
        # activations as modules (no parameters: the state_dict is unchanged), so that a mask model
        # can run the block with other activations (CIM's phi, cilearn.memory.cim.CIMModel)
        self.act1 = nn.ReLU()
        self.act2 = nn.ReLU() if relu_out else nn.Identity()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.stride, self.pad_channels = stride, cout - cin
        self.proj = None
        if (stride != 1 or cin != cout) and shortcut == "B":
            self.proj = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.option_a = (stride != 1 or cin != cout) and shortcut == "A"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.proj is not None:
            x = self.proj(x)
        elif self.option_a:
            x = F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, 0, self.pad_channels))
        out = out + x
        return self.act2(out)


class ResNet(Backbone):
    def __init__(self, in_channels: int, widths: list[int], blocks: list[int], stem: str, shortcut: str,
                 last_relu: bool = True):
        super().__init__()
        if stem == "imagenet":  # 7x7/2 conv + 3x3/2 max-pool (224 px inputs)
            self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 7, 2, 3, bias=False),
                                      nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True),
                                      nn.MaxPool2d(3, 2, 1))
        else:  # "small": 3x3/1 conv, no pooling (32 px inputs)
            self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
                                      nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        stages, cin = [], widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            last = i == len(widths) - 1
            layers = [BasicBlock(cin if k == 0 else w, w, (1 if i == 0 else 2) if k == 0 else 1, shortcut,
                                 relu_out=last_relu or not (last and k == n - 1))
                      for k in range(n)]
            stages.append(nn.Sequential(*layers))
            cin = w
        self.stages = nn.ModuleList(stages)
        self.out_dim = widths[-1]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.stem(x)
        maps = []
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        return maps, x.mean((2, 3))


@dataclass(frozen=True)
class BackboneOptions:
    # the ReLU after the last block; LUCIR and PODNet remove it (LUCIR Sec. 3.2; their recipes set false)
    last_relu: bool = option(True, alias="model.last_relu")


class BackboneFactory(Component):
    """A backbone choice: ``create(in_channels)`` builds the module (a new one each call: an
    expandable net adds one extractor per phase). ``default_weights``: what the run starts from
    without ``--weights`` (``cilearn.models.weights``)."""
    Options = BackboneOptions
    default_weights: ClassVar[str] = "random"

    def create(self, in_channels: int) -> Backbone:  # pragma: no cover
        raise NotImplementedError

    def input_spec(self) -> InputSpec | None:
        """The input the backbone's pre-trained weights expect (None: the data set's own view)."""
        return None

    def pretrained_file(self) -> Path:
        """The local file of the backbone's own pre-trained weights (``--weights pretrained``)."""
        raise ConfigError(f"--weights pretrained: the backbone {self.name} has no pre-trained weights of its own; "
                          "give --weights FILE or --weights random")

    def weights_module(self, backbone: nn.Module) -> nn.Module:
        """The module whose ``state_dict`` a weights file that is not a cilearn network's holds."""
        return backbone

    def adapt_tensors(self, tensors: dict[str, torch.Tensor], module: nn.Module) -> dict[str, torch.Tensor]:
        """A foreign weights file's tensors as they fit ``module`` (``weights_module``)."""
        return tensors


@register("backbone", "resnet32")
class ResNet32(BackboneFactory):
    """CIFAR ResNet-32 (He et al. 2016 Sec. 4.2): 3 stages x 5 blocks, widths 16/32/64, option-A
    shortcuts, 64-d embedding; the backbone of iCaRL/LUCIR/PODNet/PyCIL on CIFAR-100."""

    def create(self, in_channels):
        return ResNet(in_channels, [16, 32, 64], [5, 5, 5], stem="small", shortcut="A",
                      last_relu=self.options.last_relu)


@register("backbone", "resnet18")
class ResNet18(BackboneFactory):
    """ImageNet ResNet-18 (7x7/2 stem + max-pool), 512-d embedding."""

    def create(self, in_channels):
        return ResNet(in_channels, [64, 128, 256, 512], [2, 2, 2, 2], stem="imagenet", shortcut="B",
                      last_relu=self.options.last_relu)


@register("backbone", "resnet18-32")
class ResNet18Small(BackboneFactory):
    """ResNet-18 with a 3x3/1 stem and no max-pool, for 32 px inputs (as in PyCIL/DER on CIFAR)."""

    def create(self, in_channels):
        return ResNet(in_channels, [64, 128, 256, 512], [2, 2, 2, 2], stem="small", shortcut="B",
                      last_relu=self.options.last_relu)


class ConvNet(Backbone):
    """Small 3-stage convnet for 8x8 (digits) to 28x28 inputs: 32-64-128 channels, 128-d."""

    def __init__(self, in_channels: int):
        super().__init__()

        def stage(cin, cout, pool):
            layers = [nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            return nn.Sequential(*(layers + ([nn.MaxPool2d(2)] if pool else [])))

        self.stages = nn.ModuleList([stage(in_channels, 32, False), stage(32, 64, True), stage(64, 128, False)])
        self.out_dim = 128

    def forward(self, x):
        maps = []
        for s in self.stages:
            x = s(x)
            maps.append(x)
        return maps, x.mean((2, 3))


@register("backbone", "convnet")
class ConvNetFactory(BackboneFactory):
    """The small convnet (``ConvNet``). It has no ``last_relu`` option: without a residual path,
    dropping the last ReLU would make the whole last stage (conv, BN, mean pool) affine, i.e.
    remove a layer (measured on digits: LUCIR's phase-0 accuracy drops from >90% to 88% at 6
    epochs), so the recipes' ``last_relu: false`` does not apply to it."""
    Options = NoOptions

    def create(self, in_channels):
        return ConvNet(in_channels)


def auto_backbone(image_size: int) -> str:
    """Default backbone by input size: convnet <= 16 px, resnet32 <= 32 px, else resnet18."""
    return "convnet" if image_size <= 16 else ("resnet32" if image_size <= 32 else "resnet18")
