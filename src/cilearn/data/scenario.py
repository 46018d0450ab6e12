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

    def names(self, names: list[str], ids: range) -> list[str]:
        """The data set's class names (``names[label]``) of incremental ids ``ids``."""
        return [names[self.order[k]] for k in ids]

    def describe(self, names: list[str] | None = None, most: int = 10, phases: int = 12) -> str:
        """One line per phase: its classes' ids and data set labels, as ``name (label)`` when the
        names (``names[label]``) say more than the labels, each list cut after ``most``; with more
        than ``phases`` phases, the first ``phases - 2``, a line for those left out, and the last."""
        def line(p: Phase) -> str:
            labels = self.order[p.start:p.end]
            head = f"phase {p.index}: {p.num_new} class{'es' if p.num_new != 1 else ''} (ids {p.start}-{p.end - 1})"
            if names is None or [names[c] for c in labels] == [str(c) for c in labels]:
                return f"{head}, labels {short_list(labels, most)}"
            return f"{head}: {short_list([f'{names[c]} ({c})' for c in labels], most)}"

        shown = self.phases if len(self.phases) <= phases else self.phases[:phases - 2]
        rows = [line(p) for p in shown]
        if len(shown) < len(self.phases):
            rest = self.phases[len(shown):-1]
            rows += [f"... phases {rest[0].index}-{rest[-1].index}: {sum(p.num_new for p in rest)} classes",
                     line(self.phases[-1])]
        return "\n".join(rows)


def short_list(items: list, most: int) -> str:
    """``a, b, c``; more than ``most`` items: the first ``most``, then ``... (+N more)``."""
    text = ", ".join(str(i) for i in items[:most])
    return text + (f", ... (+{len(items) - most} more)" if len(items) > most else "")
