"""The incremental network: a backbone and a growing head."""
from __future__ import annotations

import contextlib
import copy
from typing import Iterator, NamedTuple

import torch
import torch.nn as nn



class NetOutput(NamedTuple):
    logits: torch.Tensor            # [B, num_classes]
    embedding: torch.Tensor         # [B, D]
    maps: list[torch.Tensor]        # per stage [B, C_s, H_s, W_s]


def freeze(module: nn.Module) -> nn.Module:
    """``module`` in eval mode with no parameter requiring a gradient (in place); returns it."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode for the block, its previous mode restored after."""
    was = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was)


class IncrementalNet(nn.Module):
    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    def add_classes(self, n: int) -> None:
        self.head.add_classes(n)

    def forward(self, x: torch.Tensor) -> NetOutput:
        maps, emb = self.backbone(x)
        return NetOutput(self.head(emb), emb, maps)

    def frozen_copy(self) -> "IncrementalNet":
        """A deep copy in eval mode with no gradients: the teacher of the next phase."""
        return freeze(copy.deepcopy(self))
