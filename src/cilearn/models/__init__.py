"""Networks: backbones, heads, the incremental net and its expandable variant, and ``build_net``,
the one factory of networks (it alone knows both net classes, so neither imports the other)."""
from __future__ import annotations

from .backbones import BACKBONES
from .expandable import ExpandableBackbone, ExpandableNet
from .heads import HEADS
from .net import IncrementalNet


def build_net(backbone: str, head: str, in_channels: int, last_relu: bool = True, expandable: bool = False,
              **head_opts) -> IncrementalNet:
    """``head_opts``: options of the head's builder (``lsc``: ``proxies``). ``expandable``: an
    ``ExpandableNet`` of ``backbone`` extractors (DER, FOSTER), starting with one."""
    if expandable:
        eb = ExpandableBackbone(lambda: BACKBONES.get(backbone)(in_channels, last_relu=last_relu))
        return ExpandableNet(eb, HEADS.get(head)(eb.out_dim, **head_opts))
    bb = BACKBONES.get(backbone)(in_channels, last_relu=last_relu)
    return IncrementalNet(bb, HEADS.get(head)(bb.out_dim, **head_opts))
