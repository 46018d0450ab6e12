"""Networks: backbones, heads, the incremental net and its expandable variant, and ``create_net``,
the one factory of networks (it alone knows both net classes, so neither imports the other).
Backbones and heads are components (kinds ``backbone`` and ``head``) whose ``create`` builds the
module; a backbone's initial weights are ``cilearn.models.weights``'."""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

from ..components import REGISTRIES, Component, build
from ..errors import ConfigError
from . import backbones, heads, timm_backbones  # noqa: F401  (register the backbone and head components)
from .expandable import ExpandableBackbone, ExpandableNet
from .net import IncrementalNet


def create_net(backbone: Component, head: Component, in_channels: int, expandable: bool = False,
               init: Callable[[nn.Module], None] | None = None, adapter: Component | None = None) -> IncrementalNet:
    """The run's network from its backbone and head components. ``expandable``: an ``ExpandableNet``
    of ``backbone`` extractors (one per phase: DER, FOSTER), starting with one. ``init``: applied to
    every backbone (extractor) built, e.g. loading the run's weights (``weights.initializer``).
    ``adapter``: its ``adapt`` applied to the backbone (after ``init``) before the head is made
    (``cilearn.adapters``)."""
    def build_backbone() -> nn.Module:
        bb = backbone.create(in_channels)
        if init is not None:
            init(bb)
        return bb

    if expandable:
        if adapter is not None:
            raise ConfigError(f"--adapter {adapter.name}: an expandable network (one extractor per phase) takes no adapter")
        eb = ExpandableBackbone(build_backbone)
        return ExpandableNet(eb, head.create(eb.out_dim))
    bb = build_backbone()
    if adapter is not None:
        bb = adapter.adapt(bb)
    return IncrementalNet(bb, head.create(bb.out_dim))


def part(kind: str, name: str, **options) -> Component:
    """A backbone or head component by name with ``options`` (its declared defaults otherwise)."""
    return build(REGISTRIES[kind].get(name), options, None)


def build_net(backbone: str, head: str, in_channels: int, expandable: bool = False, backbone_options=None,
              **head_options) -> IncrementalNet:
    """``create_net`` by names (tests, benchmarks), with the components' options."""
    return create_net(part("backbone", backbone, **(backbone_options or {})), part("head", head, **head_options),
                      in_channels, expandable)
