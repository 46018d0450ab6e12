"""RanPAC's classifier (McDonnell et al., "RanPAC: Random Projections and Pre-trained Models for
Continual Learning", NeurIPS 2023): a fixed random projection of the frozen embedding to M
dimensions with a ReLU, the Gram matrix and the class sums of the projected features accumulated
over the phases, and the ridge-regression classifier solved from them; head component ``ridge``
(``--model.head ridge``, any recipe). File and line references are to the authors' repository
(RanPAC/RanPAC, ``RanPAC.py`` and ``inc_net.py``) unless PILOT is named.

* **Before the first solve** the head is the cosine classifier the first session trains with the
  backbone (``inc_net.py`` ``CosineLinear``:9-48, sigma initialised to 1, rows uniform in
  +-1/sqrt(D)): ``train_weight`` ``[K, D]``.
* **After each phase's training** (``replace_fc``, RanPAC.py:91-126, called at the end of
  ``_train``:242): the new classes' training images, test view (the ``mode="test"`` loader,
  RanPAC.py:167), embedded by the (frozen) backbone, ``h = relu(f @ W_rand)`` (:119;
  ``W_rand`` ``[D, M]`` standard normal, drawn once, :254), ``G += h^T h``, ``Q += h^T Y``
  (:122-123, ``Y`` one-hot); lambda chosen on this phase's images (``choose_ridge``); then
  ``W_o = solve(G + lambda I, Q)^T`` (:125) becomes the head: ``logits = sigma * h W_o^T``
  (``CosineLinear.forward`` with ``use_RP``:34-46, no normalisation). ``dim`` 0: no projection, no
  ReLU (:97-100, 119-121).
* **Differences, on purpose**: G, Q and the solves are float64 (the official code's are float32
  on the CPU); the 80/20 split is a seeded permutation of the phase's images (the official code
  takes the first 80% of a shuffled ``DataLoader``'s order, :168, :140); the grid's losses come
  from one eigendecomposition instead of one solve per lambda (the same solutions); the criterion
  is the mean squared error over the phase's classes (the official ``F.mse_loss`` also averages
  over the other classes' columns, whose predictions and targets are both zero: the same argmin).
* **PILOT's variant** (``scores: cosine``; LAMDA-PILOT ``utils/inc_net.py`` ``SimpleVitNet.forward``
  :577-583 feeds ``h`` to a ``CosineLinear``): ``logits = sigma * cos(h, W_o)``.
* **Torchrun**: each rank sums ``G`` and ``Q`` over its part of the phase's images and the sums
  are all-reduced in float64 (the same statistics as one process, added in another order);
  lambda is chosen on every rank from all the images (gathered by the embedding), identically.

The checkpoint holds ``G`` (``M x M x 8`` bytes: 800 MB at M = 10000, 8 MB at M = 1000) and ``Q``
(``M x K x 8``); the model file holds ``W_rand`` (``D x M x 4``) and ``W_o`` (``K x M x 4``).
"""
from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import distributed
from .components import Component, option, register
from .errors import ConfigError
from .models.heads import Head
from .train import FitResult

RIDGES = tuple(10.0 ** k for k in range(-8, 9))   # lambda's candidates: RanPAC.py:139, 10.0**np.arange(-8, 9)
FIT_SHARE = 0.8                                   # the share of the phase's images lambda is fitted on (RanPAC.py:140)
CHUNK = 4096                                      # rows per matmul when summing G


class RidgeHead(Head):
    """RanPAC's head (module docstring). ``in_dim`` D, ``dim`` M (0: no projection); ``scores``:
    ``linear`` (RanPAC) or ``cosine`` (PILOT). Buffers: ``projection`` ``[D, M]`` (filled by the
    ``ridge`` component from the run's seed), ``solved`` (0 until the first solve). Parameters:
    ``train_weight`` ``[K, D]`` (the cosine classifier before the first solve), ``weight``
    ``[K, M]`` (W_o), ``sigma``. Only the rows in use require a gradient (a stage that trains the
    head after the first solve trains ``weight``)."""

    def __init__(self, in_dim: int, dim: int, scores: str = "linear", sigma: float = 1.0):
        super().__init__()
        self.in_dim, self.dim, self.scores = in_dim, dim, scores
        self.train_weight = nn.Parameter(torch.empty(0, in_dim))
        self.weight = nn.Parameter(torch.empty(0, dim or in_dim), requires_grad=False)
        self.sigma = nn.Parameter(torch.tensor(float(sigma)))
        self.register_buffer("projection", torch.zeros(in_dim, dim) if dim else None)
        self.register_buffer("solved", torch.zeros((), dtype=torch.uint8))

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def _sync_grad(self) -> None:
        on = bool(self.solved)
        self.train_weight.requires_grad_(not on)
        self.weight.requires_grad_(on)

    def add_classes(self, n: int) -> None:
        """``n`` rows more: cosine rows uniform in +-1/sqrt(D) (``CosineLinear.reset_parameters``,
        inc_net.py:24-26), W_o rows zero (``update_fc``, inc_net.py:203)."""
        bound = 1 / math.sqrt(self.in_dim)
        t = self.train_weight
        self.train_weight = nn.Parameter(torch.cat([t.data, t.new_empty(n, self.in_dim).uniform_(-bound, bound)]))
        self.weight = nn.Parameter(torch.cat([self.weight.data, self.weight.new_zeros(n, self.weight.shape[1])]))
        self._sync_grad()

    def features(self, emb: torch.Tensor) -> torch.Tensor:
        """``h = relu(emb @ W_rand)`` ``[B, M]`` (``emb`` itself without a projection)."""
        return F.relu(emb @ self.projection.to(emb.dtype)) if self.projection is not None else emb

    def similarity(self, emb: torch.Tensor) -> torch.Tensor:
        if not bool(self.solved):
            return F.linear(F.normalize(emb, dim=1), F.normalize(self.train_weight, dim=1))
        h = self.features(emb)
        if self.scores == "cosine":
            return F.linear(F.normalize(h, dim=1), F.normalize(self.weight, dim=1))
        return F.linear(h, self.weight)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.sigma * self.similarity(emb)

    @torch.no_grad()
    def set_solution(self, wo: torch.Tensor) -> None:
        """W_o ``[K, M]`` becomes the classifier."""
        self.weight.data = wo.to(self.weight.dtype).to(self.weight.device).contiguous()
        self.solved.fill_(1)
        self._sync_grad()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._sync_grad()


# ---------------------------------------------------------------- the statistics and the solve (float64)
def ridge_features(emb: torch.Tensor, projection: torch.Tensor | None) -> torch.Tensor:
    """``[N, M]`` float64 features of embeddings ``[N, D]``: ``relu(emb @ W_rand)``, or ``emb``."""
    e = emb.double()
    return F.relu(e @ projection.double()) if projection is not None else e


def phase_statistics(emb: torch.Tensor, y: torch.Tensor, projection: torch.Tensor | None,
                     num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(G [M, M], Q [M, num_classes])`` float64 of one phase's images: ``h^T h`` and ``h^T Y``
    (``y`` ``[N]`` in ``0..num_classes-1``, Y its one-hot). Under torchrun each rank sums its part of
    the rows (``distributed.shard_span``) and the sums are all-reduced."""
    span = distributed.shard_span(len(emb))
    e, labels = emb[span], y[span]
    m = projection.shape[1] if projection is not None else emb.shape[1]
    g = torch.zeros(m, m, dtype=torch.float64, device=emb.device)
    q = torch.zeros(m, num_classes, dtype=torch.float64, device=emb.device)
    for i in range(0, len(e), CHUNK):                  # (matmuls: the same sum order on every device)
        h = ridge_features(e[i:i + CHUNK], projection)
        g += h.T @ h
        q += h.T @ F.one_hot(labels[i:i + CHUNK], num_classes).double()
    distributed.all_reduce_sum_(g)
    distributed.all_reduce_sum_(q)
    return g, q


def solve(g: torch.Tensor, q: torch.Tensor, ridge: float) -> torch.Tensor:
    """``W_o = ((G + ridge I)^-1 Q)^T`` ``[K, M]`` float64 (RanPAC.py:125, ``torch.linalg.solve``). ``G +
    ridge I`` is symmetric positive definite (a Gram matrix plus ridge > 0), so a Cholesky factorisation
    solves it (half the work of the general LU solve; the same solution up to rounding); where
    rounding leaves it not numerically positive definite, the LU solve."""
    a = g + ridge * torch.eye(len(g), dtype=g.dtype, device=g.device)
    factor, info = torch.linalg.cholesky_ex(a)
    return (torch.cholesky_solve(q, factor) if int(info) == 0 else torch.linalg.solve(a, q)).T


def choose_ridge(h: torch.Tensor, y: torch.Tensor, perm: torch.Tensor, num_classes: int,
                 grid: tuple[float, ...] = RIDGES) -> tuple[float, list[float]]:
    """RanPAC's choice of lambda (``optimise_ridge_parameter``, RanPAC.py:138-150): the ridge
    solution of the first 80% of the phase's images (``perm``'s order; ``h`` ``[N, M]`` float64,
    labels ``y`` ``[N]``) for each lambda of ``grid``, its mean squared error against the one-hot
    labels on the other 20%, the first lambda with the smallest error. Returns (lambda, the
    errors). Each solution comes from one eigendecomposition: of ``H_f^T H_f`` ``[M, M]``, or of
    ``H_f H_f^T`` when fewer images than M are fitted (``(H^T H + l I)^-1 H^T = H^T (H H^T + l I)^-1``)."""
    n_fit = int(len(h) * FIT_SHARE)
    if n_fit == 0 or n_fit == len(h):
        raise ConfigError(f"components.ridge: the phase has {len(h)} training images, too few to choose lambda on an "
                          f"{FIT_SHARE:.0%} / {1 - FIT_SHARE:.0%} split; give components.ridge.ridge")
    fit, val = perm[:n_fit].to(h.device), perm[n_fit:].to(h.device)
    onehot = F.one_hot(y, num_classes).double()
    hf, hv, yf, yv = h[fit], h[val], onehot[fit], onehot[val]
    if n_fit < h.shape[1]:
        s, u = torch.linalg.eigh(hf @ hf.T)
        a, b = (hv @ hf.T) @ u, u.T @ yf                     # [n_val, n_fit], [n_fit, K]
    else:
        s, v = torch.linalg.eigh(hf.T @ hf)
        a, b = hv @ v, v.T @ (hf.T @ yf)                     # [n_val, M], [M, K]
    s = s.clamp_min(0)                                       # (a Gram matrix: rounding below 0 only)
    losses = [float(((a / (s + lam)) @ b - yv).pow(2).mean()) for lam in grid]
    return grid[min(range(len(grid)), key=losses.__getitem__)], losses


# ---------------------------------------------------------------- the component
@dataclass(frozen=True)
class RidgeOptions:
    # M, the projection's size: 10000 in every RanPAC configuration with a projection
    # (args/*_publish.csv, column M); 0: no projection, the Gram matrix of the embedding itself
    dim: int = option(10000, alias="model.ridge_dim")
    # lambda; None: chosen in every phase from 1e-8..1e8 on an 80/20 split of its images (RanPAC.py:124, 138-150)
    ridge: float | None = None
    scores: str = "linear"       # linear: RanPAC's h W_o^T (inc_net.py:39); cosine: PILOT's cos(h, W_o)
    scale: float = option(1.0, alias="model.scale")     # sigma's initial value (inc_net.py:27-28)

    def __post_init__(self):
        if self.dim < 0:
            raise ConfigError(f"components.ridge.dim must be >= 0 (0: no projection), got {self.dim}")
        if self.ridge is not None and not self.ridge > 0:
            raise ConfigError(f"components.ridge.ridge must be > 0 (or null: chosen each phase), got {self.ridge}")
        if self.scores not in ("linear", "cosine"):
            raise ConfigError(f"components.ridge.scores must be linear (RanPAC) or cosine (PILOT), got '{self.scores}'")
        if not self.scale > 0:
            raise ConfigError(f"components.ridge.scale must be > 0, got {self.scale}")


def projection_generator(seed: int) -> torch.Generator:
    """The generator of a run's random projection: seeded by the run's seed alone (the same W_rand
    whatever the backbone or the other components draw)."""
    return torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(f"ridge {seed}".encode()).digest()[:8], "little")
                                         % 2**63)


@register("head", "ridge")
class Ridge(Component):
    """RanPAC's ridge-regression head (module docstring): ``RidgeHead``; after each phase's
    training, the phase's statistics added to G and Q and the classifier solved. State: G, Q."""
    Options = RidgeOptions
    cheap = {"dim": 64}          # quick runs (cilearn.methods.options.cheap_extra_stages): a small projection

    def __init__(self, options, services):
        super().__init__(options, services)
        self.g: torch.Tensor | None = None      # [M, M] float64
        self.q: torch.Tensor | None = None      # [M, K_seen] float64
        self.ridge: float | None = None         # this phase's lambda

    def create(self, in_dim: int) -> RidgeHead:
        o = self.options
        return RidgeHead(in_dim, o.dim, o.scores, o.scale)

    def attach(self, model) -> None:
        """W_rand ``[D, M]``, standard normal (RanPAC.py:254), from the run's seed."""
        head = model.head
        if head.projection is not None:
            w = torch.randn(head.projection.shape, generator=projection_generator(self.services.seed))
            head.projection.copy_(w)

    def after_training(self, ctx) -> FitResult:
        start = time.perf_counter()
        head, phase = ctx.model.head, ctx.phase
        new = (ctx.y >= phase.start).nonzero().flatten()
        emb = self.services.embed(ctx.model, ctx.x[new])                       # [N, D], test view
        y = ctx.y[new] - phase.start
        g, q = phase_statistics(emb, y, head.projection, phase.num_new)
        if self.options.ridge is not None:
            self.ridge = self.options.ridge
        else:
            perm = torch.randperm(len(emb), generator=self.services.phase_generator(phase))
            self.ridge, _ = choose_ridge(ridge_features(emb, head.projection), y, perm, phase.num_new)
        if self.g is None:
            self.g, self.q = g, q.new_zeros(len(q), phase.start)
        else:
            self.g = self.g.to(g.device) + g
        self.q = torch.cat([self.q.to(q.device), q], 1)                        # [M, seen]
        head.set_solution(solve(self.g, self.q, self.ridge))
        return FitResult(time.perf_counter() - start, len(new), {})

    def state_dict(self):
        return {} if self.g is None else {"g": self.g.cpu(), "q": self.q.cpu()}

    def load_state_dict(self, state):
        self.g, self.q = state.get("g"), state.get("q")

    def diagnostics(self):
        return {} if self.ridge is None else {"ridge_lambda": self.ridge}
