"""Adapters (kind ``adapter``, ``--adapter NAME``): parameter-efficient modules added to a
pre-trained vision transformer, and what of the backbone trains. An adapter is part of the
network's architecture: the network builder calls its ``adapt(backbone)`` after the backbone's
weights are loaded and before the head is made (the head sees the adapted ``out_dim``), and
``model.json`` names it, so a saved model rebuilds with it. What trains is what requires a gradient:
``adapt`` freezes the backbone's own parameters (no gradient) and adds its modules, which train
with the head in the phases whose backbone is not frozen (``freeze-backbone``); the frozen ones
never change. No module is replaced: the adapters' modules are children of the timm model
(``model.<name>...`` in the state dict) and act through forward hooks on its blocks, so the
backbone's own tensors keep their names.

Components (facts and numbers from the APER paper, Zhou et al., IJCV 2024, and its code in
LAMDA-PILOT, ``backbone/vit_adapter.py``, ``backbone/vit_ssf.py``, ``backbone/vpt.py``,
``utils/inc_net.py``; file:line references are to that repository):

* ``adaptformer``: AdaptFormer's parallel adapter in every block, ``x + attn + mlp(norm2(x_mid)) +
  s * up(dropout(relu(down(x_mid))))`` with ``x_mid`` the block's state after its attention
  (vit_adapter.py:165-183, ``ffn_option="parallel"``, no layer norm): ``down`` D -> 64 Kaiming-
  uniform (a = sqrt 5), ``up`` 64 -> D zero, biases zero (:64-68, ``init_option="lora"``), so at
  initialisation the features are the backbone's; ``s`` 0.1 (inc_net.py:76), dropout 0.1
  (vit_adapter.py:159).
* ``ssf``: a scale and a shift per channel after the patch embedding, each block's two layer
  norms, the attention's qkv and output projections, the MLP's two linear layers, and the final
  norm (vit_ssf.py:152-154, 190-192, 246-255, 350-369, 460-461, 534-535); initialised
  ``scale ~ N(1, 0.02)``, ``shift ~ N(0, 0.02)`` (:378-385), so not exactly the identity.
* ``vpt``: learnable prompt tokens appended after the class and patch tokens; deep: a new set
  before every block, dropped after it; shallow: one set before the first block, dropped after the
  last (vpt.py:100-133); 5 tokens (exps/aper_vpt_*.json), initialised to zero (vpt.py:49-52).
* ``finetune``: nothing added, nothing frozen: the backbone itself trains.

Each has ``pretrained_branch`` (APER's dual branch, inc_net.py:695-717): the embedding becomes
``[pretrained(x), adapted(x)]``, the first a frozen copy of the backbone as loaded (before any
adapter), the second the adapted backbone (``Branches``). The adapted branch then trains with a
classifier of its own, the adapter's ``proxy`` term: a cosine classifier of the phase's new classes
on the adapted coordinates (PILOT trains ``SimpleVitNet``'s ``CosineLinear`` on the adapted
backbone alone, aper_adapter.py:28, 132-134, and builds the dual-branch network after that
training), so the run's head needs no classification loss (APER's recipes have none). While the
network trains, the frozen branch's coordinates are zeros, not computed (nothing reads them then).

A ``timm:`` vision transformer is required by ``adaptformer``, ``ssf`` and ``vpt`` (blocks with
``norm1``, ``attn`` (``qkv``, ``proj``), ``norm2``, ``mlp`` (``fc1``, ``fc2``)); ``finetune`` works
on any backbone. docs/methods/aper-ease.md.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from .components import Component, option, register
from .errors import ConfigError
from .models.backbones import Backbone
from .models.heads import CosineHead
from .models.net import freeze

DOCS = "docs/methods/aper-ease.md"


def vit_of(backbone: nn.Module, who: str) -> nn.Module:
    """The vision transformer inside a ``timm:`` backbone (``TimmNet.model``), checked to have the
    blocks the adapters hook (a ConfigError naming ``--adapter who`` otherwise)."""
    vit = getattr(backbone, "model", None)
    blocks = getattr(vit, "blocks", None)
    parts = ("norm1", "attn", "norm2", "mlp")
    if blocks is None or not len(blocks) or not all(hasattr(b, p) for b in blocks for p in parts):
        raise ConfigError(f"--adapter {who}: the backbone ({type(backbone).__name__}) is not a vision transformer with "
                          f"blocks of {', '.join(parts)}; use one, e.g. --backbone timm:vit_base_patch16_224 ({DOCS})")
    return vit


def embed_dim(vit: nn.Module) -> int:
    """The token width D of a vision transformer."""
    return int(getattr(vit, "embed_dim", None) or vit.blocks[0].norm1.normalized_shape[0])


# ---------------------------------------------------------------- AdaptFormer
class Bottleneck(nn.Module):
    """AdaptFormer's adapter ``[B, N, D] -> [B, N, D]``: ``scale * up(dropout(relu(down(x))))``,
    ``down`` D -> r Kaiming-uniform (a = sqrt 5, ``nn.Linear``'s own), ``up`` r -> D zero, biases
    zero: zero output at initialisation (vit_adapter.py:56-68)."""

    def __init__(self, dim: int, bottleneck: int, scale: float, dropout: float):
        super().__init__()
        self.scale, self.dropout = scale, dropout
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.dropout(F.relu(self.down(x)), p=self.dropout, training=self.training)
        return self.up(h) * self.scale


class ParallelAdapters(nn.Module):
    """Sets of AdaptFormer adapters, one ``Bottleneck`` per block of ``vit`` in each set, of which
    the ``active`` one (None: none) acts: block ``i``'s output gets ``set[i](x_mid)`` added, ``x_mid``
    being the input of its ``norm2`` (the state after the attention's residual). Hooks: a forward
    pre-hook on each ``norm2`` keeps ``x_mid``, a forward hook on each block adds the adapter's
    output. ``adaptformer`` has one set; EASE one per phase (``cilearn.ease``)."""

    def __init__(self, vit: nn.Module, bottleneck: int, scale: float, dropout: float):
        super().__init__()
        self.dim, self.depth = embed_dim(vit), len(vit.blocks)
        self.bottleneck, self.scale, self.dropout = bottleneck, scale, dropout
        self.sets = nn.ModuleList()
        self.active: int | None = 0
        self._mid: dict[int, torch.Tensor] = {}
        for i, block in enumerate(vit.blocks):
            block.norm2.register_forward_pre_hook(partial(self._keep, i))
            block.register_forward_hook(partial(self._add, i))

    def new_set(self) -> nn.ModuleList:
        """Appends a freshly initialised set (on the device of the existing ones); returns it."""
        one = nn.ModuleList(Bottleneck(self.dim, self.bottleneck, self.scale, self.dropout) for _ in range(self.depth))
        ref = next(iter(self.sets.parameters()), None)
        self.sets.append(one.to(ref.device) if ref is not None else one)
        return one

    def _keep(self, i: int, module: nn.Module, args: tuple) -> None:
        if self.active is not None:
            self._mid[i] = args[0]

    def _add(self, i: int, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
        mid = self._mid.pop(i, None)
        if mid is None or self.active is None:
            return None
        return out + self.sets[self.active][i](mid).to(out.dtype)


# ---------------------------------------------------------------- SSF
class ScaleShift(nn.Module):
    """SSF's ``x * scale + shift`` over the last dimension of a module's output (a forward hook),
    ``scale ~ N(1, std)``, ``shift ~ N(0, std)`` (vit_ssf.py:378-395)."""

    def __init__(self, dim: int, std: float):
        super().__init__()
        self.scale = nn.Parameter(torch.empty(dim).normal_(1.0, std) if std > 0 else torch.ones(dim))
        self.shift = nn.Parameter(torch.empty(dim).normal_(0.0, std) if std > 0 else torch.zeros(dim))

    def hook(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        return out * self.scale + self.shift


def ssf_points(vit: nn.Module) -> list[tuple[nn.Module, int]]:
    """(module, output width) of every point SSF scales and shifts, in the order of vit_ssf.py: the
    patch embedding, then per block norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2, then the
    final norm."""
    d = embed_dim(vit)
    points = [(vit.patch_embed, d)]
    for b in vit.blocks:
        points += [(b.norm1, d), (b.attn.qkv, b.attn.qkv.out_features), (b.attn.proj, d), (b.norm2, d),
                   (b.mlp.fc1, b.mlp.fc1.out_features), (b.mlp.fc2, d)]
    return points + [(vit.norm, d)]


class SSF(nn.Module):
    """All of a vision transformer's scale-shift pairs (``ssf_points``), hooked on their modules."""

    def __init__(self, vit: nn.Module, std: float):
        super().__init__()
        points = ssf_points(vit)
        self.pairs = nn.ModuleList(ScaleShift(width, std) for _, width in points)
        for (module, _), pair in zip(points, self.pairs):
            module.register_forward_hook(pair.hook)


# ---------------------------------------------------------------- VPT
class Prompts(nn.Module):
    """VPT's prompt tokens ``[L, n, D]`` (deep: L = depth, one set per block; shallow: L = 1),
    zero at initialisation (vpt.py:49-52), appended after the class and patch tokens: deep, before
    each block and dropped after it; shallow, before the first block and dropped after the last
    (vpt.py:109-130)."""

    def __init__(self, vit: nn.Module, tokens: int, deep: bool):
        super().__init__()
        blocks = vit.blocks
        self.n = tokens
        self.tokens = nn.Parameter(torch.zeros(len(blocks) if deep else 1, tokens, embed_dim(vit)))
        for i, block in enumerate(blocks if deep else [blocks[0]]):
            block.register_forward_pre_hook(partial(self._append, i))
        for block in (blocks if deep else [blocks[-1]]):
            block.register_forward_hook(self._drop)

    def _append(self, i: int, module: nn.Module, args: tuple) -> tuple:
        x = args[0]                                                         # [B, N, D]
        p = self.tokens[i].to(x.dtype).expand(len(x), -1, -1)               # [B, n, D]
        return (torch.cat([x, p], dim=1), *args[1:])

    def _drop(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        return out[:, : out.shape[1] - self.n]


# ---------------------------------------------------------------- APER's dual branch
class Branches(Backbone):
    """APER's dual-branch backbone: the embedding is ``[frozen(x), trained(x)]`` ``[B, D_f + D_t]``
    (inc_net.py:682-692, 695-717), ``frozen`` a copy of the backbone as loaded (no gradient, eval
    mode), ``trained`` the adapted one. In training mode the frozen branch's coordinates are zeros,
    not computed: what trains reads only the trained branch (``trained_dim``, the last
    coordinates). The maps are the trained branch's."""

    def __init__(self, frozen: nn.Module, trained: nn.Module):
        super().__init__()
        self.frozen, self.trained = freeze(frozen), trained
        self.frozen_dim, self.trained_dim = int(frozen.out_dim), int(trained.out_dim)
        self.out_dim = self.frozen_dim + self.trained_dim

    def train(self, mode: bool = True):
        super().train(mode)
        self.frozen.eval()
        return self

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        maps, emb = self.trained(x)                                          # [B, D_t]
        if self.training:
            pre = emb.new_zeros(len(emb), self.frozen_dim)
        else:
            pre = self.frozen(x)[1].to(emb.dtype)                            # [B, D_f]
        return maps, torch.cat([pre, emb], dim=1)


# ---------------------------------------------------------------- the components
class Adapter(Component):
    """An ``adapter`` component: ``adapt(backbone)`` (the network builder's call) and, when the
    backbone it builds has frozen branches beside the one that trains (``trained_dim``: the last
    coordinates of the embedding), the ``proxy`` term: a cosine classifier of the phase's new
    classes on those coordinates (``CosineHead``: rows uniform in +-1/sqrt(d), scale 1, as PILOT's
    ``CosineLinear``, linears.py:51-55), trained with the adapter in the phases where the backbone
    trains (cross-entropy over the new classes; rows of old classes, from exemplars, are left out)
    and dropped after the phase."""
    per_phase = ("proxy", "_resumed")
    needs_vit: ClassVar[bool] = True        # adds modules to a vision transformer's blocks

    def __init__(self, options, services):
        super().__init__(options, services)
        self.proxy: CosineHead | None = None
        self._resumed: dict | None = None       # the proxy's state of a run resumed inside the phase

    def adapt(self, backbone: nn.Module) -> nn.Module:
        raise NotImplementedError  # pragma: no cover

    def train_parameters(self, ctx):
        """The proxy classifier, made when the main stage starts (the constraints have frozen what
        they freeze by then) if the backbone has a branch that trains."""
        d = getattr(ctx.model.backbone, "trained_dim", None)
        if d is None or not any(p.requires_grad for p in ctx.model.backbone.parameters()):
            return []
        with torch.random.fork_rng(devices=[], enabled=self._resumed is not None):   # (resumed: the checkpoint's
            self.proxy = CosineHead(d)                                               # RNG already follows its draws)
            self.proxy.add_classes(ctx.phase.num_new)
        if self._resumed is not None:
            self.proxy.load_state_dict(self._resumed)
        self.proxy.to(self.services.device)
        return list(self.proxy.parameters())

    def terms(self, step, out):
        if self.proxy is None:
            return {}
        start, y = step.ctx.phase.start, step.batch.y
        new = y >= start
        emb = out.embedding[new, -self.proxy.in_dim:]                        # [B_new, d]
        logits = self.proxy(emb).float()
        value = F.cross_entropy(logits, y[new] - start) if len(emb) else logits.sum() * 0.0
        return {"proxy": (1.0, value)}

    def state_dict(self):
        return {} if self.proxy is None else {"proxy": {k: v.cpu() for k, v in self.proxy.state_dict().items()}}

    def load_state_dict(self, state):
        self._resumed = state.get("proxy")                      # resumed inside a phase


@dataclass(frozen=True)
class BranchOptions:
    # APER's dual branch: the embedding [pre-trained backbone, adapted backbone] (inc_net.py:695-717)
    pretrained_branch: bool = False


class PETL(Adapter):
    """An adapter that changes the backbone in place (``modify``), with APER's dual branch as an
    option (``pretrained_branch``)."""

    def modify(self, backbone: nn.Module) -> nn.Module:
        raise NotImplementedError  # pragma: no cover

    def adapt(self, backbone: nn.Module) -> nn.Module:
        pretrained = copy.deepcopy(backbone) if self.options.pretrained_branch else None
        adapted = self.modify(backbone)
        return Branches(pretrained, adapted) if pretrained is not None else adapted


def frozen_vit(backbone: nn.Module, who: str) -> nn.Module:
    """The backbone's vision transformer with no parameter requiring a gradient."""
    vit = vit_of(backbone, who)
    for p in vit.parameters():
        p.requires_grad_(False)
    return vit


@dataclass(frozen=True)
class BottleneckOptions:
    bottleneck: int = option(64, alias="model.bottleneck")   # r: ffn_num 64 (exps/aper_aperpter.json, ease.json)
    scale: float = 0.1               # s: ffn_adapter_scalar "0.1" (inc_net.py:76)
    dropout: float = 0.1             # on the bottleneck, in training (vit_adapter.py:159)

    def __post_init__(self):
        if self.bottleneck < 1 or not 0 <= self.dropout < 1:
            raise ConfigError(f"adapter options: bottleneck must be >= 1 and dropout in [0, 1), got "
                              f"{self.bottleneck}, {self.dropout}")


@dataclass(frozen=True)
class AdaptFormerOptions(BottleneckOptions, BranchOptions):
    pass


@register("adapter", "adaptformer")
class AdaptFormer(PETL):
    """AdaptFormer (Chen et al., NeurIPS 2022) as PILOT's APER and RanPAC use it (module docstring):
    one parallel bottleneck adapter per block; the backbone's own parameters frozen."""
    Options = AdaptFormerOptions

    def modify(self, backbone):
        vit = frozen_vit(backbone, self.name)
        o = self.options
        adapters = ParallelAdapters(vit, o.bottleneck, o.scale, o.dropout)
        adapters.new_set()
        vit.add_module("adaptformer", adapters)
        return backbone


@dataclass(frozen=True)
class SSFOptions(BranchOptions):
    init_std: float = 0.02           # scale ~ N(1, std), shift ~ N(0, std) (vit_ssf.py:382-383); 0: the identity

    def __post_init__(self):
        if self.init_std < 0:
            raise ConfigError(f"components.ssf.init_std must be >= 0, got {self.init_std}")


@register("adapter", "ssf")
class ScaleAndShift(PETL):
    """SSF (Lian et al., NeurIPS 2022): a scale and a shift per channel at every point of
    ``ssf_points``; the backbone's own parameters frozen (aper_ssf.py:95-99)."""
    Options = SSFOptions

    def modify(self, backbone):
        vit = frozen_vit(backbone, self.name)
        vit.add_module("ssf", SSF(vit, self.options.init_std))
        return backbone


@dataclass(frozen=True)
class VPTOptions(BranchOptions):
    tokens: int = option(5, alias="model.prompt_tokens")   # prompt_token_num 5 (exps/aper_vpt_*.json; 30 on ImageNet-R)
    deep: bool = True                # VPT-Deep (prompts at every block); false: VPT-Shallow

    def __post_init__(self):
        if self.tokens < 1:
            raise ConfigError(f"components.vpt.tokens must be >= 1, got {self.tokens}")


@register("adapter", "vpt")
class VisualPromptTuning(PETL):
    """VPT (Jia et al., ECCV 2022), deep or shallow (module docstring); the backbone's own
    parameters frozen (vpt.py:57-61)."""
    Options = VPTOptions

    def modify(self, backbone):
        vit = frozen_vit(backbone, self.name)
        vit.add_module("vpt", Prompts(vit, self.options.tokens, self.options.deep))
        return backbone


@register("adapter", "finetune")
class FullFinetune(PETL):
    """Full fine-tuning (APER's "Finetune" variant, aper_finetune.py:90-96): nothing added, every
    parameter of the backbone trains; with ``pretrained_branch``, beside a frozen copy of it."""
    Options = BranchOptions
    needs_vit = False

    def modify(self, backbone):
        return backbone
