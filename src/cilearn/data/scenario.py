"""Class order and phases. Labels are remapped once to *incremental ids*: the k-th class of the
class order gets id k, so phase t owns the contiguous id range ``[start_t, end_t)`` and head
row k is class ``class_order[k]``."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def class_order(num_classes: int, seed: int) -> list[int]:
    """``numpy.random.RandomState(seed).permutation(num_classes)``: the convention of
    iCaRL/LUCIR/PODNet/PyCIL, so seed 1993 gives their class order."""
    return np.random.RandomState(seed).permutation(num_classes).tolist()


@dataclass(frozen=True)
class Phase:
    index: int
    start: int          # first incremental id learned in this phase
    end: int            # one past the last
    last: bool = False  # the scenario's last phase

    @property
    def classes(self) -> range:
        return range(self.start, self.end)

    @property
    def num_new(self) -> int:
        return self.end - self.start

    @property
    def num_old(self) -> int:
        return self.start

    @property
    def seen(self) -> int:
        return self.end


@dataclass
class Scenario:
    order: list[int]          # original label ids in learning order
    phases: list[Phase]

    @classmethod
    def make(cls, num_classes: int, base: int, increment: int, order: list[int]) -> "Scenario":
        first = base or increment
        bounds = [0, first] + list(range(first + increment, num_classes + 1, increment))
        pairs = list(zip(bounds[:-1], bounds[1:]))
        phases = [Phase(i, a, b, i == len(pairs) - 1) for i, (a, b) in enumerate(pairs)]
        return cls(list(order), phases)

    def relabel(self, y: torch.Tensor) -> torch.Tensor:
        """Original labels -> incremental ids."""
        lut = torch.empty(len(self.order), dtype=torch.long)
        lut[torch.tensor(self.order)] = torch.arange(len(self.order))
        return lut.to(y.device)[y]

    def describe(self) -> str:
        rows = [f"phase {p.index}: {p.num_new} classes (ids {p.start}-{p.end - 1}), "
                f"original labels {self.order[p.start:p.end]}" for p in self.phases]
        return "\n".join(rows)
