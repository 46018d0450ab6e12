"""Exemplar selection rules (kind ``selection`` of ``cilearn.components``, ``--selection NAME``):
``select(features [N, D], m, gen) -> indices [min(m, N)]`` in priority order, so that truncating
the list is how a class's share shrinks. The pure functions are below; the components bind them."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..components import Component, register


def herding(features: torch.Tensor, m: int, gen: torch.Generator | None = None) -> torch.Tensor:
    """iCaRL's herding (Rebuffi et al. 2017, Alg. 4) on L2-normalised features: step k picks the
    sample (not yet chosen) whose addition brings the mean of the chosen ones closest to the
    class mean mu: ``argmin_i || mu - (s_{k-1} + f_i) / k ||``."""
    f = F.normalize(features.float(), dim=1)
    n = f.shape[0]
    m = min(m, n)
    mu = f.mean(0)
    running = torch.zeros_like(mu)
    taken = torch.zeros(n, dtype=torch.bool, device=f.device)
    order = []
    for k in range(1, m + 1):
        dist = ((mu[None] - (running[None] + f) / k) ** 2).sum(1)
        dist[taken] = float("inf")
        i = int(dist.argmin())
        order.append(i)
        taken[i] = True
        running += f[i]
    return torch.tensor(order, dtype=torch.long, device=features.device)


def random_selection(features: torch.Tensor, m: int, gen: torch.Generator | None = None) -> torch.Tensor:
    n = features.shape[0]
    perm = torch.randperm(n, generator=gen) if gen is not None else torch.randperm(n)
    return perm[: min(m, n)].to(features.device)


def closest_to_mean(features: torch.Tensor, m: int, gen: torch.Generator | None = None) -> torch.Tensor:
    """The m samples nearest to the class mean (normalised features), nearest first."""
    f = F.normalize(features.float(), dim=1)
    d = ((f - f.mean(0, keepdim=True)) ** 2).sum(1)
    return d.argsort()[: min(m, f.shape[0])]


class Selection(Component):
    """A selection rule: ``select(features, m, gen)``."""
    rule = staticmethod(herding)

    def select(self, features: torch.Tensor, m: int, gen: torch.Generator | None = None) -> torch.Tensor:
        return self.rule(features, m, gen)


@register("selection", "herding")
class Herding(Selection):
    """iCaRL's herding (``herding``), the default."""
    rule = staticmethod(herding)


@register("selection", "random")
class RandomSelection(Selection):
    """A random subset, from the run's phase generator (``random_selection``)."""
    rule = staticmethod(random_selection)


@register("selection", "closest")
class ClosestToMean(Selection):
    """The samples nearest the class mean (``closest_to_mean``)."""
    rule = staticmethod(closest_to_mean)
