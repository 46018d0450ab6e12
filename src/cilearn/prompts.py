"""Prompts for a frozen vision transformer: the machinery that L2P, DualPrompt and CODA-Prompt
share, acting on a ``timm:`` ViT through hooks and an attention forward patched on the instance
(no copy of timm's ViT; the ViT's own tensors keep their names and never change).

* ``PromptPool``: ``size`` learnable keys ``[P, D]`` and prompts ``[P, *shape]``; a query ``[B, D]``
  is matched to the keys by cosine similarity and the ``top_k`` most similar prompts are chosen
  (``select``); ``batchwise``: every image of the batch takes the ``top_k`` prompts chosen most
  often in the batch (L2P's ``batchwise_prompt``). ``pull`` is L2P's surrogate loss' similarity:
  ``sum_{b, j} cos(q_b, key_{idx[b, j]}) / B`` (l2p-pytorch prompt.py:98-102, ``reduce_sim``).
* **prompt tuning** (``insert="prompt"``): the chosen prompts ``[B, k L, D]`` are inserted into the
  token sequence right after the class token (after ``_pos_embed``: a forward pre-hook on the first
  block), each with the class token's position embedding added. This is where the official L2P
  code puts them: ``[cls, prompts, patches]`` with the pretrained class-token position embedding
  expanded over the prompt positions (l2p-pytorch vision_transformer.py:470-478 and
  ``resize_pos_embed``:669-672).
* **prefix tuning** (``insert="prefix"``): in each chosen block the prompt ``[B, 2, L, D]`` is split
  into a key half and a value half, concatenated in front of that block's attention keys and values
  (the queries, hence the sequence length, unchanged; the first half keys, the second values, as
  DualPrompt's ``PreT_Attention``, JH-LEE-KR/dualprompt-pytorch attention.py:31-43). The
  attention's forward is replaced on the instance by ``prefixed_attention``, which uses the module's
  own ``qkv``, ``q_norm``, ``k_norm``, ``norm``, ``proj`` and falls back to timm's forward when no
  prefix is set.
* ``PromptedViT`` (a backbone): the query is the frozen ViT's own pre-logits feature without any
  prompt (``embedding_key="cls"``, l2p-pytorch engine.py:49-52), computed in its forward unless a
  component handed it over (``give_query``: looked up in a cache, ``cilearn.l2p``); the embedding is
  the mean of the prompt tokens' outputs after the final norm (``pooling="prompt"``, L2P's
  ``head_type="prompt"``, vision_transformer.py:496-498) or the ViT's own pooling (``"token"``).
* ``DualPromptViT``: a ``PromptedViT`` with prefix tuning and a second prompt set, DualPrompt's
  G-prompt, in other blocks; a training forward may take a given task's prompts (``cilearn.dualprompt``).

docs/methods/prompts.md.
"""
from __future__ import annotations

import types

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import distributed
from .adapters import embed_dim, frozen_vit
from .errors import ConfigError
from .models.backbones import Backbone

DOCS = "docs/methods/prompts.md"
INITS = ("uniform", "zero")


def init_(t: torch.Tensor, how: str) -> torch.Tensor:
    """``t`` in place: ``uniform`` U(-1, 1) (l2p-pytorch prompt.py:23-25, 32-34), ``zero``."""
    with torch.no_grad():
        return t.uniform_(-1.0, 1.0) if how == "uniform" else t.zero_()


class PromptPool(nn.Module):
    """``keys`` ``[P, D]`` and ``prompts`` ``[P, *shape]`` (prompt tuning ``[P, L, D]``; prefix
    tuning ``[P, blocks, 2 L, D]``, the key half's L tokens then the value half's: 4-D, as
    ``Module.to(memory_format=channels_last)`` refuses 5-D tensors), ``top_k`` chosen per image
    (module docstring)."""

    def __init__(self, size: int, shape: tuple[int, ...], dim: int, top_k: int, init: str = "uniform",
                 key_init: str = "uniform"):
        super().__init__()
        if not 1 <= top_k <= size:
            raise ConfigError(f"prompt pool: top_k must be in [1, pool size {size}], got {top_k}")
        self.size, self.top_k = size, top_k
        self.keys = nn.Parameter(init_(torch.empty(size, dim), key_init))
        self.prompts = nn.Parameter(init_(torch.empty(size, *shape), init))

    def similarity(self, query: torch.Tensor) -> torch.Tensor:
        """``[B, P]``: cosine of each query ``[B, D]`` to each key."""
        return F.normalize(query.float(), dim=1) @ F.normalize(self.keys.float(), dim=1).T

    def select(self, sim: torch.Tensor, batchwise: bool = False) -> torch.Tensor:
        """``[B, k]`` prompt ids: each row's ``top_k`` most similar keys (in decreasing similarity);
        ``batchwise``: the ``top_k`` ids chosen most often over the batch, for every row (ties to the
        smaller id; l2p-pytorch prompt.py:70-81). Under torchrun the counts are summed over the ranks
        (a collective): the global batch chooses, as in one process."""
        idx = sim.topk(self.top_k, dim=1).indices                               # [B, k]
        if not batchwise:
            return idx
        counts = distributed.all_reduce_sum_(torch.bincount(idx.flatten(), minlength=self.size))   # [P]
        score = counts * (self.size + 1) - torch.arange(self.size, device=counts.device)
        return score.topk(self.top_k).indices.expand(len(sim), -1)              # [B, k]

    def pull(self, query: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """``sum_{b, j} cos(query_b, key_{idx[b, j]}) / B`` (a scalar; gradient to the keys)."""
        q = F.normalize(query.float(), dim=1)                                   # [B, D]
        k = F.normalize(self.keys.float(), dim=1)[idx]                          # [B, k, D]
        return (k * q.unsqueeze(1)).sum() / len(q)


def _prepend(block: nn.Module, args: tuple) -> tuple | None:
    """Forward pre-hook of the first block: ``block._prompt = (at, tokens [B, T, D])`` inserted at
    position ``at`` of the sequence (after the class token); nothing when unset."""
    got = block.__dict__.get("_prompt")
    if got is None:
        return None
    at, tokens = got
    x = args[0]                                                                 # [B, N, D]
    return (torch.cat([x[:, :at], tokens.to(x.dtype), x[:, at:]], dim=1), *args[1:])


def prefixed_attention(self: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A timm ``Attention``'s forward with ``self._prefix`` ``[B, 2, p, D]`` (key and value halves)
    concatenated in front of its keys and values; timm's own forward when no prefix is set."""
    prefix = self.__dict__.get("_prefix")
    if prefix is None:
        return type(self).forward(self, x, *args, **kwargs)
    if args or any(v is not None and v is not False for v in kwargs.values()) or getattr(self, "gate", None) is not None:
        raise ConfigError(f"prefix tuning: an attention with a mask or a gate is not supported ({DOCS})")
    B, N, _ = x.shape
    H = self.num_heads
    hd = getattr(self, "head_dim", self.qkv.out_features // (3 * H))
    q, k, v = self.qkv(x).reshape(B, N, 3, H, hd).permute(2, 0, 3, 1, 4).unbind(0)    # [B, H, N, hd]
    q, k = self.q_norm(q), self.k_norm(k)
    pk, pv = prefix.to(x.dtype).reshape(B, 2, prefix.shape[2], H, hd).permute(1, 0, 3, 2, 4).unbind(0)  # [B, H, p, hd]
    k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)                 # [B, H, p + N, hd]
    drop = self.attn_drop.p if self.training else 0.0
    o = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)                 # [B, H, N, hd]
    o = o.transpose(1, 2).reshape(B, N, H * hd)
    norm = getattr(self, "norm", None)
    if norm is not None:
        o = norm(o)
    return self.proj_drop(self.proj(o))


class PromptedViT(Backbone):
    """A frozen ``timm:`` ViT (``net``, a ``TimmNet``) with a ``PromptPool`` (module docstring).
    ``insert``: ``"prompt"`` (prompt tuning before the first block) or ``"prefix"`` (prefix tuning in
    ``blocks``); ``pooling``: ``"prompt"`` (mean of the prompt tokens) or ``"token"`` (the ViT's own);
    ``batchwise``: batch-wise selection in training (per image at evaluation). After a training
    forward, ``selection`` holds ``(query [B, D], ids [B, k])`` for the pull term."""

    def __init__(self, net: nn.Module, size: int, length: int, top_k: int, insert: str = "prompt",
                 blocks: tuple[int, ...] = (0,), pooling: str = "prompt", batchwise: bool = True,
                 init: str = "uniform", key_init: str = "uniform", who: str = "prompts"):
        super().__init__()
        vit = frozen_vit(net, who)
        depth, dim = len(vit.blocks), embed_dim(vit)
        if insert not in ("prompt", "prefix") or pooling not in ("prompt", "token"):
            raise ConfigError(f"--adapter {who}: insert must be prompt or prefix and pooling prompt or token, got "
                              f"{insert!r}, {pooling!r}")
        if insert == "prefix" and (not blocks or not all(0 <= b < depth for b in blocks)):
            raise ConfigError(f"--adapter {who}: blocks must be indices of the ViT's {depth} blocks, got {list(blocks)}")
        if pooling == "prompt" and (insert != "prompt" or length < 1):
            raise ConfigError(f"--adapter {who}: pooling prompt (the mean of the prompt tokens) needs prompt tuning "
                              f"with length >= 1; use pooling token")
        self.net, self.insert, self.pooling, self.batchwise = net, insert, pooling, batchwise
        self.blocks = tuple(blocks) if insert == "prefix" else ()
        self.length, self.out_dim = length, int(net.out_dim)
        self.at = int(getattr(vit, "num_prefix_tokens", 1))                    # prompts go after the class token
        shape = (length, dim) if insert == "prompt" else (len(self.blocks), 2 * length, dim)
        self.pool = PromptPool(size, shape, dim, top_k, init, key_init)
        if insert == "prompt":
            vit.blocks[0].register_forward_pre_hook(_prepend)
        for b in self.blocks:
            prefix_tune(vit, b, who)
        self._query: torch.Tensor | None = None
        self.selection: tuple[torch.Tensor, torch.Tensor] | None = None

    def train(self, mode: bool = True):
        super().train(mode)
        self.net.eval()                     # the ViT is frozen: eval mode in training too
        return self

    def give_query(self, query: torch.Tensor) -> None:
        """The query ``[B, D]`` of the next forward's ``B`` images (computed elsewhere, e.g. cached)."""
        self._query = query

    @torch.no_grad()
    def query(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, D]``: the frozen ViT's pre-logits feature of ``x``, no prompt."""
        return self.net(x)[1]

    def choose(self, q: torch.Tensor) -> torch.Tensor:
        """``[B, k]`` prompt ids for the queries ``q`` ``[B, D]``: key matching."""
        return self.pool.select(self.pool.similarity(q), self.batchwise and self.training)

    def _position(self, vit: nn.Module) -> torch.Tensor | float:
        """The position embedding of the prompt tokens: the class token's ``[1, 1, D]`` where the ViT
        adds one to it (official L2P), else none."""
        pos = getattr(vit, "pos_embed", None)
        if pos is None or getattr(vit, "no_embed_class", False) or getattr(vit, "cls_token", None) is None:
            return 0.0
        return pos[:, :1]

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        q, self._query = self._query, None
        if q is None or len(q) != len(x):
            q = self.query(x)                                                   # [B, D]
        idx = self.choose(q)                                                    # [B, k]
        chosen = self.pool.prompts[idx]                                         # [B, k, *shape]
        vit = self.net.model
        if self.insert == "prompt":
            tokens = chosen.flatten(1, 2) + self._position(vit)                 # [B, k L, D]
            vit.blocks[0]._prompt = (self.at, tokens)
        else:
            for j, b in enumerate(self.blocks):                                 # [B, k, 2 L, D] -> [B, 2, k L, D]
                kv = chosen[:, :, j].unflatten(2, (2, self.length))             # [B, k, 2, L, D]
                vit.blocks[b].attn._prefix = kv.transpose(1, 2).flatten(2, 3)
        try:
            f = vit.forward_features(x)                                         # [B, N', D]
        finally:
            vit.blocks[0].__dict__.pop("_prompt", None)
            for b in self.blocks:
                vit.blocks[b].attn.__dict__.pop("_prefix", None)
        self.selection = (q, idx) if self.training else None
        if self.pooling == "prompt":
            n = idx.shape[1] * self.length
            return [], f[:, self.at:self.at + n].mean(1)                        # [B, D]
        return [], vit.forward_head(f, pre_logits=True)                         # [B, D]



def prefix_tuned(vit: nn.Module, blocks: tuple[int, ...], who: str) -> None:
    """Sets ``prefixed_attention`` as the attention's forward of each of ``vit``'s ``blocks`` (a
    ConfigError for an index out of range or an attention without a fused qkv projection); a
    component then puts ``_prefix`` ``[B, 2, p, D]`` on ``vit.blocks[b].attn`` for one forward."""
    depth = len(vit.blocks)
    if not blocks or not all(0 <= b < depth for b in blocks):
        raise ConfigError(f"--adapter {who}: blocks must be indices of the ViT's {depth} blocks, got {list(blocks)}")
    for b in blocks:
        prefix_tune(vit, b, who)


def prefix_tune(vit: nn.Module, b: int, who: str) -> None:
    """Block ``b``'s attention takes the prefix set on it (``prefixed_attention``, set on the instance)."""
    attn = vit.blocks[b].attn
    if not (hasattr(attn, "qkv") and hasattr(attn, "num_heads")):
        raise ConfigError(f"--adapter {who}: block {b}'s attention has no fused qkv projection ({DOCS})")
    attn.forward = types.MethodType(prefixed_attention, attn)


class DualPromptViT(PromptedViT):
    """DualPrompt's two prompt sets in a frozen ``timm:`` ViT, both by prefix tuning: the G-prompt
    ``g_prompt`` ``[G, 2, Lg, D]`` (one per block of ``g_blocks``) shared by every image and task, and
    the E-prompts, the pool ``[P, E, 2, L, D]`` over ``blocks`` with a key each. In training with
    ``task`` set, every image takes the task's E-prompts, ids ``[task k, (task + 1) k)``
    (``use_prompt_mask``, dualprompt-pytorch vision_transformer.py:530-538), key matching once the
    task's ids pass the pool's end; at evaluation the prompts whose keys are nearest the query. The
    embedding is the ViT's own pooling (its [CLS] feature: ``head_type="token"``, :581-583)."""

    def __init__(self, net: nn.Module, size: int, length: int, top_k: int, blocks: tuple[int, ...],
                 g_length: int, g_blocks: tuple[int, ...], batchwise: bool = True, init: str = "uniform",
                 key_init: str = "uniform", who: str = "dualprompt"):
        super().__init__(net, size, length, top_k, insert="prefix", blocks=blocks, pooling="token",
                         batchwise=batchwise, init=init, key_init=key_init, who=who)
        vit = self.net.model
        depth, dim = len(vit.blocks), embed_dim(vit)
        if not all(0 <= b < depth for b in g_blocks) or set(g_blocks) & set(blocks) or g_length < 0:
            raise ConfigError(f"--adapter {who}: g_blocks must be indices of the ViT's {depth} blocks, none of them "
                              f"an E-prompt block {list(blocks)}, and g_length >= 0; got {list(g_blocks)}, {g_length}")
        self.g_blocks = tuple(g_blocks)
        self.g_prompt = nn.Parameter(init_(torch.empty(len(self.g_blocks), 2, g_length, dim), init))   # [G, 2, Lg, D]
        for b in self.g_blocks:
            prefix_tune(vit, b, who)
        self.task: int | None = None        # the phase whose E-prompts training forwards take

    def choose(self, q: torch.Tensor) -> torch.Tensor:
        k = self.pool.top_k
        if self.training and self.task is not None and (self.task + 1) * k <= self.pool.size:
            return torch.arange(self.task * k, (self.task + 1) * k, device=q.device).expand(len(q), -1)   # [B, k]
        return super().choose(q)

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        blocks = self.net.model.blocks
        for j, b in enumerate(self.g_blocks):
            blocks[b].attn._prefix = self.g_prompt[j].expand(len(x), -1, -1, -1)   # [B, 2, Lg, D]
        try:
            return super().forward(x)
        finally:
            for b in self.g_blocks:
                blocks[b].attn.__dict__.pop("_prefix", None)
