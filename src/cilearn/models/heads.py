"""Classifier heads. Every head grows with ``add_classes(n)`` and keeps the old classes' weights."""
from __future__ import annotations

import inspect
import math

import torch
import torch.nn as nn

from ..registry import Registry

# A builder is ``fn(in_dim: int, **opts) -> Head`` (``lsc``: ``proxies``).
HEADS: Registry = Registry("head")


def head_options(name: str, **available) -> dict:
    """The options among ``available`` that head ``name``'s builder takes (``lsc``: proxies and
    sigma; ``cosine``: sigma; ``linear``: none), so callers need not know each head's options."""
    params = inspect.signature(HEADS.get(name)).parameters
    return {k: v for k, v in available.items() if k in params}


class Head(nn.Module):
    num_classes: int

    def add_classes(self, n: int) -> None:  # pragma: no cover
        raise NotImplementedError

    def similarity(self, emb: torch.Tensor) -> torch.Tensor:
        """``[B, num_classes]`` class scores before any learnt scale (cosine heads: in [-1, 1]);
        margin-based losses (LUCIR's ranking, PODNet's NCA) read them. Linear head: the logits."""
        return self(emb)


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


@HEADS.register("cosine")
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

    def cosine(self, emb: torch.Tensor) -> torch.Tensor:
        """``[B, num_classes]`` cosine similarities in [-1, 1] (before the scale)."""
        return nn.functional.linear(nn.functional.normalize(emb, dim=1), nn.functional.normalize(self.weight, dim=1))

    similarity = cosine

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.sigma * self.cosine(emb)


@HEADS.register("lsc")
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
