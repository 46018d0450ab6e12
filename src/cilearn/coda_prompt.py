"""CODA-Prompt (Smith et al., "CODA-Prompt: COntinual Decomposed Attention-based Prompting for
Rehearsal-Free Continual Learning", CVPR 2023): adapter component ``coda-prompt``. Facts and numbers
from the authors' code, GT-RIPL/CODA-Prompt at its newest commit (6417d4f: ``models/zoo.py``,
``models/vit.py``, ``learners/prompt.py``, ``trainer.py``, ``configs/cifar-100_prompt.yaml``,
``experiments/cifar-100.sh``), checked against LAMDA-PILOT (``models/coda_prompt.py``,
``backbone/prompt.py``, ``exps/coda_prompt.json``) and Mammoth (``models/coda_prompt.py``,
``models/coda_prompt_utils/model.py``); file:line references are to the authors' code.

* The pre-trained ViT is frozen; only the prompt components and the head train
  (``init_optimizer``, learners/prompt.py:47-58).
* In each of the first 5 blocks (``e_layers = [0..4]``, zoo.py:46) a pool of M = 100 components
  (``prompt_param[0]``, experiments/cifar-100.sh:29): prompts ``P_m`` ``[L, D]`` with L = 8, keys
  ``K_m`` ``[D]`` and attention vectors ``A_m`` ``[D]`` (zoo.py:21-39).
* The pool is cut into one slice of ``M // T`` components per phase (T the run's number of phases,
  zoo.py:144-146). Phase t trains slice t only: the earlier slices take part in the forward without
  gradient (zoo.py:149-157 detaches them; here they do not require one) and the later ones are not
  used yet (zoo.py:158-161).
* A new slice is initialised by Gram-Schmidt: random normal vectors, orthogonalised against every
  earlier component and each other, of unit norm (``gram_schmidt``, zoo.py:75-131, called when
  the model is built and at the start of every later phase, zoo.py:34-36, 51-71; trainer.py:187-194).
* The query ``q`` ``[B, D]`` is the frozen ViT's [CLS] output without prompts (``q = feat(x)[:, 0]``,
  zoo.py:393-395); the weight of component m is
  ``alpha_m = cos(q * A_m, K_m)`` and the block's prompt is ``sum_m alpha_m P_m`` ``[B, L, D]``
  (zoo.py:163-171), whose first L/2 tokens are prefix keys and last L/2 prefix values of the block's
  attention (zoo.py:173-176; vit.py:68-73): prefix tuning (``cilearn.prompts.prefix_tuned``).
* The embedding is the ViT's [CLS] output after the final norm (``out[:, 0]``, zoo.py:396-397; vit.py:208),
  read by a linear head (``self.last``, zoo.py:374, 402-403).
* The orthogonality penalty ``sum_blocks mean((K K^T - I)^2) + mean((A A^T - I)^2) + mean((P P^T -
  I)^2)`` over the components in use (P flattened to ``[M, L D]``, zoo.py:178-183, 197-198), the term
  ``ortho`` with weight ``ortho_mu``; 0 in the authors' newest configuration (experiments/
  cifar-100.sh:26-29: "with updated code, now can be 0"), which then computes none.

The recipe (``--method coda-prompt``, ``cilearn.methods.pretrained``) adds the masking of the old
classes' logits in training (learners/prompt.py:31-32): ``ce-local``. docs/methods/prompts.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from .adapters import embed_dim, frozen_vit
from .components import option, register
from .errors import ConfigError
from .l2p import L2P
from .models.backbones import Backbone
from .prompts import prefix_tuned


@dataclass(frozen=True)
class CodaPromptOptions:
    pool: int = option(100, alias="model.pool_size")      # M: prompt_param[0] 100 (experiments/cifar-100.sh:29)
    length: int = option(8, alias="model.prompt_length")  # L: prompt_param[1] 8, 4 key + 4 value tokens (zoo.py:174-176)
    layers: int = 5                  # prefix tuning in the first 5 blocks: e_layers [0..4] (zoo.py:46)
    ortho_weight: float = 0.0        # ortho_mu: prompt_param[2] 0.0 (experiments/cifar-100.sh:26-29; 0.1 before 605ac87)
    tasks: int | None = None         # T: the run's number of phases (resolved); a slice of pool // T per phase

    def __post_init__(self):
        if self.length < 2 or self.length % 2 or self.layers < 1 or self.pool < 1:
            raise ConfigError(f"components.coda-prompt: length must be even and >= 2, layers and pool >= 1, got "
                              f"{self.length}, {self.layers}, {self.pool}")
        if self.tasks is not None and not 1 <= self.tasks <= self.pool:
            raise ConfigError(f"components.coda-prompt.tasks must be in [1, pool {self.pool}] (a slice of pool // tasks "
                              f"components per phase), got {self.tasks}")
        if self.ortho_weight < 0:
            raise ConfigError(f"components.coda-prompt.ortho_weight must be >= 0, got {self.ortho_weight}")


def orthogonal_rows(earlier: torch.Tensor, n: int, gen: torch.Generator | None = None) -> torch.Tensor:
    """``[n, F]`` random unit vectors (standard normal draws from ``gen``, float64 on the CPU),
    orthogonal to every row of ``earlier`` ``[M, F]`` and to each other: each draw has its
    projection on the span of the rows before it removed (twice, for rounding). Where that span
    already fills the F dimensions, a draw is kept as it is (normalised): there is no room left."""
    basis: list[torch.Tensor] = []                     # orthonormal [F] vectors spanning the rows so far

    def residual(v: torch.Tensor) -> torch.Tensor:
        for _ in range(2):
            if basis:
                b = torch.stack(basis)                 # [r, F]
                v = v - b.T @ (b @ v)
        return v

    for row in earlier.detach().to("cpu", torch.float64).flatten(1):
        r = residual(row)
        if r.norm() > 1e-9 * max(float(row.norm()), 1e-300):
            basis.append(r / r.norm())
    width, out = math.prod(earlier.shape[1:]), []
    for _ in range(n):
        g = torch.randn(width, generator=gen, dtype=torch.float64)
        r = residual(g)
        if r.norm() > 1e-6 * g.norm():
            r = r / r.norm()
            basis.append(r)
        else:
            r = g / g.norm()
        out.append(r)
    return torch.stack(out)                            # [n, F]


def component_weights(q: torch.Tensor, keys: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """``[B, S, M]``: ``cos(q_b * A_sm, K_sm)`` for queries ``[B, D]`` and keys and attention vectors
    ``[S, M, D]`` (S blocks of M components), without the ``[B, S, M, D]`` product (norms clamped at
    1e-12 as ``F.normalize``'s)."""
    q = q.float()
    dot = torch.einsum("bd,smd->bsm", q, attention * keys)
    qa = torch.einsum("bd,smd->bsm", q * q, attention * attention).sqrt().clamp_min(1e-12)
    return dot / (qa * keys.norm(dim=2).clamp_min(1e-12))


def ortho_penalty(t: torch.Tensor) -> torch.Tensor:
    """``mean((T T^T - I)^2)`` over the rows of ``t`` ``[M, ...]`` (flattened to ``[M, F]``; zoo.py:197-198)."""
    t = t.flatten(1).float()
    return (t @ t.T - torch.eye(len(t), device=t.device)).pow(2).mean()


class CodaViT(Backbone):
    """A frozen ``timm:`` ViT (``net``, a ``TimmNet``) with CODA-Prompt's components in its first
    ``layers`` blocks (module docstring): per slice ``t`` of ``tasks``, ``keys[t]`` and
    ``attention[t]`` ``[S, m, D]`` and ``prompts[t]`` ``[S, m, L, D]`` (S blocks, m = pool // tasks).
    ``opened`` (a buffer) counts the slices in use; ``open(t)`` starts phase t."""

    def __init__(self, net: nn.Module, pool: int, length: int, layers: int, tasks: int, who: str = "coda-prompt"):
        super().__init__()
        vit = frozen_vit(net, who)
        dim = embed_dim(vit)
        self.net, self.length, self.tasks, self.out_dim = net, length, tasks, int(net.out_dim)
        self.blocks = tuple(range(min(layers, len(vit.blocks))))   # (all of a ViT with fewer blocks)
        prefix_tuned(vit, self.blocks, who)
        s, m = len(self.blocks), pool // tasks                       # (pool % tasks components unused, as zoo.py:144)
        self.keys = nn.ParameterList(nn.Parameter(torch.zeros(s, m, dim)) for _ in range(tasks))
        self.attention = nn.ParameterList(nn.Parameter(torch.zeros(s, m, dim)) for _ in range(tasks))
        self.prompts = nn.ParameterList(nn.Parameter(torch.zeros(s, m, length, dim)) for _ in range(tasks))
        self.register_buffer("opened", torch.zeros((), dtype=torch.long))
        self._query: torch.Tensor | None = None
        self.open(0)                                                 # the first slice, from the global RNG (zoo.py:34-36)

    def train(self, mode: bool = True):
        super().train(mode)
        self.net.eval()                     # the ViT is frozen: eval mode in training too
        return self

    @torch.no_grad()
    def open(self, t: int, gen: torch.Generator | None = None) -> None:
        """Phase ``t``: slice ``t`` initialised by Gram-Schmidt against slices ``< t``, block by block,
        unless already open (resumed); it alone requires a gradient."""
        if t >= self.tasks:
            raise ConfigError(f"--adapter coda-prompt: phase {t} has no slice of components (tasks {self.tasks})")
        if int(self.opened) <= t:
            for params in (self.keys, self.attention, self.prompts):
                for j in range(len(self.blocks)):
                    earlier = torch.cat([params[i][j] for i in range(t)]) if t else params[t][j][:0]
                    new = orthogonal_rows(earlier, params[t].shape[1], gen)              # [m, F]
                    params[t][j].copy_(new.view_as(params[t][j]))
            self.opened.fill_(t + 1)
        for params in (self.keys, self.attention, self.prompts):
            for i, p in enumerate(params):
                p.requires_grad_(i == t)

    def components(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The components in use: keys, attention ``[S, M, D]``, prompts ``[S, M, L, D]``."""
        n = int(self.opened)
        return tuple(torch.cat(list(params)[:n], dim=1) for params in (self.keys, self.attention, self.prompts))

    def ortho(self) -> torch.Tensor:
        """The orthogonality penalty of the components in use, summed over blocks and K, A, P."""
        return sum(ortho_penalty(t[j]) for t in self.components() for j in range(len(self.blocks)))

    def give_query(self, query: torch.Tensor) -> None:
        """The query ``[B, D]`` of the next forward's ``B`` images (computed elsewhere, e.g. cached)."""
        self._query = query

    @torch.no_grad()
    def query(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, D]``: the frozen ViT's pre-logits ([CLS]) feature of ``x``, no prompt."""
        return self.net(x)[1]

    def prompt(self, q: torch.Tensor) -> torch.Tensor:
        """``[B, S, L, D]``: each block's ``sum_m alpha_m P_m`` for queries ``q`` ``[B, D]``."""
        keys, attention, prompts = self.components()
        alpha = component_weights(q, keys, attention)                         # [B, S, M]
        return torch.einsum("bsm,smld->bsld", alpha, prompts.float())

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        q, self._query = self._query, None
        if q is None or len(q) != len(x):
            q = self.query(x)                                                 # [B, D]
        p = self.prompt(q)                                                    # [B, S, L, D]
        vit = self.net.model
        B, _, L, D = p.shape
        for j, b in enumerate(self.blocks):                                   # [B, L, D] -> [B, 2, L/2, D]: keys, values
            vit.blocks[b].attn._prefix = p[:, j].reshape(B, 2, L // 2, D)
        try:
            f = vit.forward_features(x)                                       # [B, N, D]
        finally:
            for b in self.blocks:
                vit.blocks[b].attn.__dict__.pop("_prefix", None)
        return [], vit.forward_head(f, pre_logits=True)                       # [B, D]: the [CLS] output


@register("adapter", "coda-prompt")
class CodaPrompt(L2P):
    """CODA-Prompt's components in a frozen ViT (module docstring): ``adapt`` builds the ``CodaViT``;
    each phase opens its slice (``phase_start``, Gram-Schmidt from the phase's own generator) and
    caches the training images' queries as L2P does; ``terms``: the orthogonality penalty."""
    Options = CodaPromptOptions

    @classmethod
    def resolve(cls, options, run):
        if options.get("tasks") is not None or run.num_classes is None:
            return options
        s = run.cfg.scenario
        first = s.base or s.increment
        return {**options, "tasks": 1 + (run.num_classes - first) // s.increment}

    def adapt(self, backbone: nn.Module) -> nn.Module:
        o = self.options
        if o.tasks is None:
            raise ConfigError("components.coda-prompt.tasks: the number of phases is not known; give it")
        return CodaViT(backbone, o.pool, o.length, o.layers, o.tasks, who=self.name)

    def phase_start(self, ctx):
        i = ctx.phase.index
        ctx.model.backbone.open(i, self.services.phase_generator(ctx.phase) if i else None)
        super().phase_start(ctx)

    def terms(self, step, out):
        w = self.options.ortho_weight
        return {"ortho": (w, step.ctx.model.backbone.ortho())} if w > 0 else {}
