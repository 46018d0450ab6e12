"""Classifier heads. Every head grows with ``add_classes(n)`` and keeps the old classes' weights."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..registry import Registry

# A builder is ``fn(in_dim: int) -> Head``.
HEADS: Registry = Registry("head")


class Head(nn.Module):
    num_classes: int

    def add_classes(self, n: int) -> None:  # pragma: no cover
        raise NotImplementedError


@HEADS.register("linear")
class LinearHead(Head):
    """``logits = emb @ W^T + b``; W: ``[num_classes, in_dim]``."""

    def __init__(self, in_dim: int):
        super().__init__()
        self.in_dim = in_dim
        self.weight = nn.Parameter(torch.empty(0, in_dim))
        self.bias = nn.Parameter(torch.empty(0))

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def add_classes(self, n: int) -> None:
        w = torch.empty(n, self.in_dim, device=self.weight.device, dtype=self.weight.dtype)
        bound = 1 / math.sqrt(self.in_dim)  # nn.Linear's default init
        nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        b = torch.empty(n, device=self.bias.device, dtype=self.bias.dtype).uniform_(-bound, bound)
        self.weight = nn.Parameter(torch.cat([self.weight.data, w]))
        self.bias = nn.Parameter(torch.cat([self.bias.data, b]))

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(emb, self.weight, self.bias)
