"""EASE (Zhou et al., "Expandable Subspace Ensemble for Pre-Trained Model-Based Class-Incremental
Learning", CVPR 2024): adapter component ``ease`` and head component ``ease-prototype``. File:line
references are to LAMDA-PILOT (``models/ease.py``, ``backbone/vit_ease.py``,
``backbone/linears.py``, ``utils/inc_net.py``, ``exps/ease.json``).

* **Subspaces** (``ease``): the pre-trained ViT stays frozen; every phase adds a new set of
  AdaptFormer adapters (one per block, as ``adaptformer``: bottleneck 64, scale 0.1, dropout 0.1,
  up-projection zero), the previous sets frozen (vit_ease.py:278-302). The embedding is the
  concatenation of the ViT's class token under each set, ``[e_0(x), ..., e_T(x)]`` ``[B, (T+1) D]``
  (``forward_test``, :330-377). Only the newest set trains, on the phase's data, through a cosine
  classifier of the phase's new classes on its ``e_T`` (the adapter's ``proxy`` term,
  ``cilearn.adapters.Adapter``; ``EaseNet.proxy_fc`` and the loss on ``aux_targets``,
  inc_net.py:1000-1006, ease.py:325-335); while the network trains, the older sets' coordinates are
  zeros, not computed (``forward_train`` runs the newest set alone, vit_ease.py:304-328).
* **Prototypes** (``ease-prototype``): after the phase's training, each new class's row is the mean
  of its training images' embeddings (test view) in every subspace (``replace_fc``,
  ease.py:60-99). An old class (task i) has no image in the subspaces added after it; its
  prototype in subspace j > i is synthesised from the classes that have one there (tasks >= j),
  weighted by how similar they are to it in subspace i (``solve_sim_reset``, ease.py:176-226,
  ``recalc_sim: true``): ``P[old, j] = softmax_rows(cos(P[old, i], P[later, i])) @ P[later, j]``,
  recomputed for every (i, j) in every phase (``recompute: false``: only the newest subspace, as
  ``solve_similarity``, :151-174).
* **Scores** (``forward_reweight``, linears.py:138-186, ``use_reweight: true``): the logit of class
  c of task i is ``sigma * sum_j r_ij cos(x_j, P[c, j])``, the cosines taken subspace by subspace,
  ``r_ii = 1`` and ``r_ij = alpha / T`` for j != i (``alpha`` 0.1, T the current phase's index);
  ``reweight: false``: the cosine of the whole concatenations (``EaseCosineLinear.forward``).
  sigma is 1 and never trained (the proxy classifier is what trains).

Not implemented (off in the official configurations): the pre-trained model's own subspace
(``use_init_ptm``), the diagonal-only variant, exemplars (``use_old_data``) and ``moni_adam``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .adapters import Adapter, BottleneckOptions, ParallelAdapters, frozen_vit
from .components import option, register
from .errors import ConfigError
from .models.backbones import Backbone
from .simplecil import PrototypeHead, Prototypes


class Subspaces(Backbone):
    """EASE's backbone (module docstring): ``net`` (a ``timm:`` ViT backbone, frozen) run once per
    adapter set of ``adapters``. ``out_dim`` = D x the number of sets; ``grow`` adds a set in every
    phase after the first; a state with more sets loads into a fresh one (the sets are added
    first)."""

    def __init__(self, net: nn.Module, bottleneck: int, scale: float, dropout: float):
        super().__init__()
        self.net = net
        self.adapters = ParallelAdapters(frozen_vit(net, "ease"), bottleneck, scale, dropout)
        self.adapters.new_set()
        self.dim = int(net.out_dim)
        self.trained_dim = self.dim                 # the newest set's coordinates (the last ones) train

    @property
    def out_dim(self) -> int:  # type: ignore[override]
        return self.dim * len(self.adapters.sets)

    def _sync(self) -> None:
        """The newest set trains, the others not."""
        sets = self.adapters.sets
        for i, s in enumerate(sets):
            s.requires_grad_(i == len(sets) - 1)

    def grow(self, phase) -> int:
        """A new adapter set for ``phase`` (one per phase); the coordinates added to the embedding."""
        if len(self.adapters.sets) > phase.index:
            return 0
        self.adapters.new_set()
        self._sync()
        return self.dim

    def embedding(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """``[B, D]``: the class token of the ViT with adapter set ``i``."""
        self.adapters.active = i
        return self.net(x)[1]

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        n = len(self.adapters.sets)
        if self.training and any(p.requires_grad for p in self.adapters.sets[-1].parameters()):
            e = self.embedding(x, n - 1)                                       # [B, D]
            return [], torch.cat([e.new_zeros(len(e), self.dim * (n - 1)), e], dim=1)
        return [], torch.cat([self.embedding(x, i) for i in range(n)], dim=1)  # [B, n D]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        head = prefix + "adapters.sets."
        got = {int(k[len(head):].split(".")[0]) for k in state_dict if k.startswith(head)}
        while len(self.adapters.sets) < (max(got) + 1 if got else 0):
            self.adapters.new_set()
        self._sync()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


@register("adapter", "ease")
class ExpandableSubspaces(Adapter):
    """EASE's per-phase adapter sets (``Subspaces``, module docstring) and the proxy classifier of
    the newest one (``Adapter``'s ``proxy`` term)."""
    Options = BottleneckOptions

    def adapt(self, backbone):
        o = self.options
        return Subspaces(backbone, o.bottleneck, o.scale, o.dropout)


# ---------------------------------------------------------------- the head
class SubspaceHead(Prototypes):
    """A cosine classifier over ``S`` subspaces of width ``dim`` (the embedding ``[B, S dim]``),
    scored subspace by subspace with EASE's weights (module docstring). ``task`` ``[K]``: the phase
    that added each class (a buffer)."""

    def __init__(self, dim: int, alpha: float = 0.1, reweight: bool = True, sigma: float = 1.0):
        super().__init__(dim, sigma)
        self.dim, self.alpha, self.reweight = dim, alpha, reweight
        self.register_buffer("task", torch.zeros(0, dtype=torch.long))

    def add_classes(self, n: int) -> None:
        super().add_classes(n)
        t = int(self.task[-1]) + 1 if len(self.task) else 0
        self.task = torch.cat([self.task, torch.full((n,), t, dtype=torch.long, device=self.task.device)])

    def weights(self, subspaces: int) -> torch.Tensor:
        """``[K, S]``: 1 for a class's own subspace, ``alpha / (S - 1)`` for the others."""
        own = F.one_hot(self.task.clamp_max(subspaces - 1), subspaces).to(self.weight.dtype)
        return own + (1 - own) * (self.alpha / max(subspaces - 1, 1))

    def similarity(self, emb: torch.Tensor) -> torch.Tensor:
        if not self.reweight:
            return self.cosine(emb)
        s, k = self.in_dim // self.dim, len(self.weight)
        x = F.normalize(emb.view(len(emb), s, self.dim), dim=2)                  # [B, S, d]
        w = F.normalize(self.weight.view(k, s, self.dim), dim=2)                 # [K, S, d]
        cos = torch.einsum("bsd,ksd->bks", x, w)                                 # [B, K, S]
        return (cos * self.weights(s)).sum(2)                                    # [B, K]

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.sigma * self.similarity(emb)


@torch.no_grad()
def synthesize(weight: torch.Tensor, task: torch.Tensor, dim: int, recompute: bool = True) -> None:
    """EASE's semantic-guided prototypes, in place: for every old task i and subspace j > i (only the
    newest, ``recompute`` false), the rows of task i's classes in subspace j become
    ``softmax_rows(cos(P[old, i], P[later, i])) @ P[later, j]``, ``later`` the classes of tasks >= j
    (whose rows in j are their own prototypes). ``weight`` ``[K, S dim]``, ``task`` ``[K]``."""
    last = weight.shape[1] // dim - 1

    def block(j: int) -> slice:
        return slice(j * dim, (j + 1) * dim)

    for i in range(last):
        old = (task == i).nonzero().flatten()
        for j in (range(i + 1, last + 1) if recompute else [last]):
            later = (task >= j).nonzero().flatten()
            a_old = F.normalize(weight[old, block(i)].float(), dim=1)            # [n_i, d]
            a_later = F.normalize(weight[later, block(i)].float(), dim=1)        # [n_later, d]
            sim = (a_old @ a_later.T).softmax(dim=1)                             # [n_i, n_later]
            weight[old, block(j)] = (sim @ weight[later, block(j)].float()).to(weight.dtype)


@dataclass(frozen=True)
class EaseHeadOptions:
    alpha: float = 0.1               # the other subspaces' weight (exps/ease.json "alpha")
    reweight: bool = True            # use_reweight (exps/ease.json); false: the cosine of the whole embedding
    recompute: bool = True           # recalc_sim (exps/ease.json): every old (task, subspace) pair, every phase
    scale: float = option(1.0, alias="model.scale")     # sigma (1, never trained: linears.py:117-121)

    def __post_init__(self):
        if self.alpha < 0 or not self.scale > 0:
            raise ConfigError(f"components.ease-prototype: alpha must be >= 0 and scale > 0, got {self.alpha}, "
                              f"{self.scale}")


@register("head", "ease-prototype")
class EasePrototypes(PrototypeHead):
    """EASE's classifier (``SubspaceHead``): the new classes' prototypes in every subspace after the
    phase's training (``PrototypeHead``), then the old classes' synthesised ones (``synthesize``)."""
    Options = EaseHeadOptions

    def create(self, in_dim):
        o = self.options
        return SubspaceHead(in_dim, o.alpha, o.reweight, o.scale)

    def after_training(self, ctx):
        done = super().after_training(ctx)
        head = ctx.model.head
        synthesize(head.weight.data, head.task, head.dim, self.options.recompute)
        return done
