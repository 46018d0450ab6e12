"""Classifier heads. Every head grows with ``add_classes(n)`` and keeps the old classes' weights."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..components import Component, NoOptions, option, register
from ..errors import ConfigError


class Head(nn.Module):
    num_classes: int

    def add_classes(self, n: int) -> None:  # pragma: no cover
        raise NotImplementedError

    def similarity(self, emb: torch.Tensor) -> torch.Tensor:
        """``[B, num_classes]`` class scores before any learnt scale (cosine heads: in [-1, 1]);
        margin-based losses (LUCIR's ranking, PODNet's NCA) read them. Linear head: the logits."""
        return self(emb)

    def widen(self, n: int) -> None:
        """``n`` more input coordinates (a backbone whose embedding grows each phase, ``grow``)."""
        raise ConfigError(f"the head {type(self).__name__} cannot take an embedding that grows each phase; "
                          "use a cosine or prototype head")


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
        """New rows as the reference implementation of the baselines initialises its linear head
        (PyCIL convs/linears.py ``SimpleLinear``): weights U(-sqrt(3 / in_dim), sqrt(3 / in_dim))
        (Kaiming uniform, gain 1), biases 0; the old rows are kept."""
        w = torch.empty(n, self.in_dim, device=self.weight.device, dtype=self.weight.dtype)
        nn.init.kaiming_uniform_(w, nonlinearity="linear")
        b = torch.zeros(n, device=self.bias.device, dtype=self.bias.dtype)
        self.weight = nn.Parameter(torch.cat([self.weight.data, w]))
        self.bias = nn.Parameter(torch.cat([self.bias.data, b]))

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(emb, self.weight, self.bias)


class CosineHead(Head):
    """LUCIR's cosine-normalised classifier (Hou et al. 2019, Sec. 3.1):
    ``logits = sigma * <emb / |emb|, w_c / |w_c|>``, no bias; W: ``[num_classes, in_dim]``.
    sigma is one learnable scalar, initialised to 1 (as the official LUCIR code; the paper only
    says it is learnt; ``--model.scale``); it scales the logits of all classes, old and new alike."""

    def __init__(self, in_dim: int, sigma: float = 1.0):
        super().__init__()
        self.in_dim = in_dim
        self.weight = nn.Parameter(torch.empty(0, in_dim))
        self.sigma = nn.Parameter(torch.tensor(float(sigma)))

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def add_classes(self, n: int) -> None:
        """Appends ``n`` rows, uniform in +-1/sqrt(in_dim); old rows and sigma are kept."""
        bound = 1 / math.sqrt(self.in_dim)
        w = torch.empty(n, self.in_dim, device=self.weight.device, dtype=self.weight.dtype).uniform_(-bound, bound)
        self.weight = nn.Parameter(torch.cat([self.weight.data, w]))

    def widen(self, n: int) -> None:
        """``n`` zero input columns appended: the rows there see nothing in the new coordinates
        until they are set (a prototype head's new rows, EASE's synthesised prototypes)."""
        w = self.weight
        self.weight = nn.Parameter(torch.cat([w.data, w.new_zeros(len(w), n)], dim=1), requires_grad=w.requires_grad)
        self.in_dim += n

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """A state of a widened head (more columns, the same rows) loads into a fresh one."""
        got = state_dict.get(prefix + "weight")
        if got is not None and got.dim() == 2 and len(got) == len(self.weight) and got.shape[1] != self.in_dim:
            self.weight = nn.Parameter(self.weight.new_empty(got.shape), requires_grad=self.weight.requires_grad)
            self.in_dim = got.shape[1]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def cosine(self, emb: torch.Tensor) -> torch.Tensor:
        """``[B, num_classes]`` cosine similarities in [-1, 1] (before the scale)."""
        return nn.functional.linear(nn.functional.normalize(emb, dim=1), nn.functional.normalize(self.weight, dim=1))

    similarity = cosine

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.sigma * self.cosine(emb)


class LSCHead(Head):
    """PODNet's local-similarity classifier (Douillard et al. 2020, Sec. 3.2, Eq. 6): ``K``
    proxies per class (``--model.proxies``, 10 as the paper), each a row of W
    (``[num_classes * K, in_dim]``, class c's proxies at rows ``c*K : (c+1)*K``). The class score
    is the softmax-weighted mean of the cosines of its proxies,
    ``s_c = sum_k softmax_k(cos_{c,k}) cos_{c,k}``, so the closest proxy dominates while all of
    them get gradient. ``logits = sigma * s`` with sigma (the paper's eta) one learnable scalar,
    initialised to 1 (``--model.scale``); no bias."""

    def __init__(self, in_dim: int, proxies: int = 10, sigma: float = 1.0):
        super().__init__()
        self.in_dim, self.proxies = in_dim, proxies
        self.weight = nn.Parameter(torch.empty(0, in_dim))
        self.sigma = nn.Parameter(torch.tensor(float(sigma)))

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0] // self.proxies

    def add_classes(self, n: int) -> None:
        """Appends ``n * K`` proxy rows, uniform in +-1/sqrt(in_dim); old rows and sigma are kept."""
        bound = 1 / math.sqrt(self.in_dim)
        w = torch.empty(n * self.proxies, self.in_dim, device=self.weight.device,
                        dtype=self.weight.dtype).uniform_(-bound, bound)
        self.weight = nn.Parameter(torch.cat([self.weight.data, w]))

    def similarity(self, emb: torch.Tensor) -> torch.Tensor:
        cos = nn.functional.linear(nn.functional.normalize(emb, dim=1),
                                   nn.functional.normalize(self.weight, dim=1))        # [B, C*K]
        cos = cos.view(len(emb), -1, self.proxies)                                     # [B, C, K]
        return (cos.softmax(dim=2) * cos).sum(2)                                       # [B, C]

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.sigma * self.similarity(emb)


# ---------------------------------------------------------------- the head components (--model.head)
class HeadFactory(Component):
    """A head choice: ``create(in_dim)`` builds the module."""
    Options = NoOptions

    def create(self, in_dim: int) -> Head:  # pragma: no cover
        raise NotImplementedError


@register("head", "linear")
class LinearHeadFactory(HeadFactory):
    """``LinearHead``: a linear classifier with bias."""

    def create(self, in_dim):
        return LinearHead(in_dim)


@dataclass(frozen=True)
class CosineOptions:
    scale: float = option(1.0, alias="model.scale")   # initial sigma (the official LUCIR code: 1)

    def __post_init__(self):
        if not self.scale > 0:
            raise ConfigError(f"components.cosine.scale must be > 0, got {self.scale}")


@register("head", "cosine")
class CosineHeadFactory(HeadFactory):
    """``CosineHead``: LUCIR's cosine classifier with a learnable scale."""
    Options = CosineOptions

    def create(self, in_dim):
        return CosineHead(in_dim, sigma=self.options.scale)


@dataclass(frozen=True)
class LSCOptions:
    proxies: int = option(10, alias="model.proxies")   # proxies per class (PODNet Sec. 4.1: 10)
    scale: float = option(1.0, alias="model.scale")    # initial eta (the official PODNet code: 1)

    def __post_init__(self):
        if self.proxies < 1 or not self.scale > 0:
            raise ConfigError(f"components.lsc: proxies must be >= 1 and scale > 0, got {self.proxies}, {self.scale}")


@register("head", "lsc")
class LSCHeadFactory(HeadFactory):
    """``LSCHead``: PODNet's local-similarity classifier."""
    Options = LSCOptions

    def create(self, in_dim):
        return LSCHead(in_dim, proxies=self.options.proxies, sigma=self.options.scale)
