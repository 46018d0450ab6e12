"""Exemplar memory: a budget, a selection rule, an optimizer (``cilearn.memory.mnemonics``:
none, mnemonics, mnemonics-single) and the stored exemplars per class (uint8; float32 pixels in
[0, 255] once an optimizer has changed them).

Budgets (named unambiguously, since PyCIL and Avalanche use "fixed memory" in opposite senses):
* ``total=M``: M exemplars in all, shared by the seen classes: ``M // seen`` per class, so each
  class's share shrinks as classes arrive (the 2000-exemplar protocol of iCaRL/LUCIR/PODNet).
* ``per_class=P``: P per class, the total grows (the 20-per-class protocol of Mnemonics).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .mnemonics import ExemplarOptimizer
from .selection import SELECTIONS


@dataclass(frozen=True)
class Budget:
    total: int | None = None
    per_class: int | None = None

    def share(self, seen: int) -> int:
        """Exemplars per class when ``seen`` classes are stored."""
        if self.per_class is not None:
            return self.per_class
        if self.total is not None:
            return self.total // seen
        return 0

    def check(self, num_classes: int) -> None:
        if self.total is not None and self.total < num_classes:
            raise ConfigError(f"--memory {self.total} is smaller than the number of classes ({num_classes}): "
                              "expected at least one exemplar per class")


class Memory:
    """Exemplars per class (incremental id -> ``[n, C, H, W]``, uint8 or float32 pixels) in
    selection order."""

    def __init__(self, budget: Budget, selection: str = "herding", optimizer: ExemplarOptimizer | None = None):
        self.budget = budget
        self.select = SELECTIONS.get(selection)
        self.optimizer = optimizer or ExemplarOptimizer()
        self.exemplars: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return sum(len(v) for v in self.exemplars.values())

    @property
    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.exemplars.values())

    def data(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """All exemplars and their labels, or None when empty."""
        if not self.exemplars:
            return None
        ids = sorted(self.exemplars)
        x = torch.cat([self.exemplars[c] for c in ids])
        y = torch.cat([torch.full((len(self.exemplars[c]),), c, dtype=torch.long, device=x.device) for c in ids])
        return x, y

    def shrink(self, per_class: int) -> None:
        for c in self.exemplars:
            self.exemplars[c] = self.exemplars[c][:per_class]

    def update(self, x: torch.Tensor, y: torch.Tensor, classes: range, features: torch.Tensor,
               seen: int, gen: torch.Generator | None = None) -> None:
        """Shrink old classes to the new share, then select exemplars of ``classes`` from
        ``x`` (uint8), using ``features`` ``[N, D]`` of ``x`` for the selection rule."""
        per = self.budget.share(seen)
        self.shrink(per)
        for c in classes:
            idx = (y == c).nonzero().flatten()
            if len(idx) == 0:
                continue
            order = self.select(features[idx], per, gen)
            self.exemplars[c] = x[idx[order]].clone()

    def optimize(self, net: torch.nn.Module, normalize, classes: range, x: torch.Tensor, y: torch.Tensor,
                 gen: torch.Generator) -> dict[int, torch.Tensor] | None:
        """Run the exemplar optimizer after ``update`` (``x`` uint8, ``y``: the phase's images of
        ``classes``); returns the exemplars as selected, before optimisation, or None when the
        optimizer is ``none``."""
        return self.optimizer(self, net, normalize, classes, x, y, gen)

    def state(self) -> dict:
        return {"exemplars": {c: v.cpu() for c, v in self.exemplars.items()}}

    def load_state(self, state: dict, device: torch.device) -> None:
        self.exemplars = {int(c): v.to(device) for c, v in state["exemplars"].items()}
