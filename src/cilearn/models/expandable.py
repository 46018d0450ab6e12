"""The expandable representation of DER (Yan et al. 2021) and FOSTER (Wang et al. 2022): one
feature extractor per phase, the old ones frozen, their embeddings concatenated.

* ``ExpandableBackbone``: a ``Backbone`` holding a list of extractors built by one registered
  builder (``--backbone``). ``forward(x) -> (maps, embedding)`` as every backbone: the embedding
  is the concatenation ``[f_1(x), ..., f_t(x)]`` (``[B, t * d]``) and each stage's map is the
  channel concatenation of the extractors' maps of that stage, so ``embedding`` is still the
  spatial mean of the last map and a CAM / Grad-CAM of the head is consistent with the logits.
  The first ``num_frozen`` extractors have no gradient and stay in eval mode (BatchNorm running
  statistics frozen) even when the net is put in train mode.
* ``ExpandableNet``: the incremental net around it. ``expand()`` freezes every extractor, adds a
  new trainable one and widens the head's input by ``d`` (new columns initialised as
  ``nn.Linear``, old columns kept: the old classes' logits on the old features are those of the
  previous model plus the new branch's contribution). ``compress(extractor, head)`` replaces all
  extractors by one (FOSTER's compression). ``forward(x, old_embedding)`` takes the frozen
  extractors' embedding from a cache (the previous model's, ``services.OldOutputs``) and runs only the
  trainable extractor. ``load_state_dict`` first reshapes the net to the state it is given
  (number of extractors, which are frozen, head size), so checkpoints of any phase load into a
  freshly built net.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn

from .backbones import Backbone
from .net import IncrementalNet, NetOutput


class ExpandableBackbone(Backbone):
    def __init__(self, builder: Callable[[], Backbone]):
        super().__init__()
        self.builder = builder
        self.extractors = nn.ModuleList([builder()])
        # leading extractors without gradient, in eval mode; a buffer so that checkpoints keep it
        self.register_buffer("num_frozen", torch.zeros((), dtype=torch.long))

    @property
    def dims(self) -> list[int]:
        return [e.out_dim for e in self.extractors]

    @property
    def out_dim(self) -> int:  # type: ignore[override]
        return sum(self.dims)

    def set_frozen(self, n: int) -> None:
        """The first ``n`` extractors: no gradient, eval mode; the others trainable."""
        self.num_frozen.fill_(n)
        for i, e in enumerate(self.extractors):
            for p in e.parameters():
                p.requires_grad_(i >= n)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        for e in self.extractors[: int(self.num_frozen)]:
            e.eval()
        return self

    def forward(self, x: torch.Tensor, old_embedding: torch.Tensor | None = None):
        """``old_embedding`` ``[B, sum of the frozen dims]``: the frozen extractors' embedding,
        computed elsewhere (cached); then only the others run and the maps are theirs only."""
        extractors = list(self.extractors)
        if old_embedding is not None:
            extractors = extractors[int(self.num_frozen):]
        outs = [e(x) for e in extractors]
        embs = [o[1] for o in outs]
        if old_embedding is not None:
            embs = [old_embedding.to(embs[0].dtype)] + embs
        maps = [torch.cat(stage, dim=1) if len(stage) > 1 else stage[0] for stage in zip(*(o[0] for o in outs))]
        return maps, torch.cat(embs, dim=1) if len(embs) > 1 else embs[0]


def widen_head(head: nn.Module, n: int) -> None:
    """Appends ``n`` input columns to a head whose ``weight`` is ``[rows, in_dim]`` (linear,
    cosine, LSC), uniform in +-1/sqrt(new in_dim) (``nn.Linear``'s default range); old columns,
    rows and the bias are kept."""
    w = head.weight
    new_dim = w.shape[1] + n
    cols = torch.empty(w.shape[0], n, device=w.device, dtype=w.dtype).uniform_(-1 / math.sqrt(new_dim),
                                                                               1 / math.sqrt(new_dim))
    head.weight = nn.Parameter(torch.cat([w.data, cols], dim=1))
    head.in_dim = new_dim


def count_parameters(module: nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)


class ExpandableNet(IncrementalNet):
    backbone: ExpandableBackbone
    expandable = True

    def forward(self, x: torch.Tensor, old_embedding: torch.Tensor | None = None) -> NetOutput:
        maps, emb = self.backbone(x, old_embedding)
        return NetOutput(self.logits(emb), emb, maps)

    def grow(self, phase) -> None:
        """Head rows for the phase's new classes and, after the first phase, a new extractor (the
        rows first, then the extractor: the order of their initial values' draws)."""
        self.add_classes(phase.num_new)
        if phase.index > 0:
            self.expand()

    @property
    def reuses_old_embedding(self) -> bool:
        """Frozen extractors: their embedding is the old model's (taken from its cached outputs)."""
        return int(self.backbone.num_frozen) > 0

    @property
    def new_dim(self) -> int:
        """Embedding size of the newest extractor (its coordinates are the last of the embedding)."""
        return self.backbone.dims[-1]

    def _place(self, module: nn.Module) -> nn.Module:
        """On the net's device and memory format (channels-last when the net's convs are)."""
        ref = next(p for p in self.backbone.parameters() if p.dim() == 4)
        module = module.to(ref.device)
        if ref.is_contiguous(memory_format=torch.channels_last) and not ref.is_contiguous():
            module = module.to(memory_format=torch.channels_last)
        return module

    def expand(self) -> nn.Module:
        """Freezes every extractor, adds a new trainable one, widens the head; returns the new
        extractor."""
        bb = self.backbone
        new = self._place(bb.builder())
        bb.extractors.append(new)
        bb.set_frozen(len(bb.extractors) - 1)
        widen_head(self.head, new.out_dim)
        return new

    def compress(self, extractor: nn.Module, head: nn.Module) -> None:
        """One trainable extractor and its head in place of all (FOSTER's student)."""
        self.backbone.extractors = nn.ModuleList([extractor])
        self.backbone.set_frozen(0)
        self.head = head

    def load_state_dict(self, state, strict: bool = True, assign: bool = False):
        """Reshapes the net to ``state`` (number of extractors, frozen ones, head parameters'
        shapes), then loads it."""
        bb = self.backbone
        idx = {int(k.split(".")[2]) for k in state if k.startswith("backbone.extractors.")}
        n = max(idx) + 1 if idx else len(bb.extractors)
        while len(bb.extractors) < n:
            bb.extractors.append(self._place(bb.builder()))
        if len(bb.extractors) > n:
            bb.extractors = nn.ModuleList(list(bb.extractors)[:n])
        for name, p in list(self.head.named_parameters(recurse=False)):
            got = state.get(f"head.{name}")
            if got is not None and got.shape != p.shape:
                setattr(self.head, name, nn.Parameter(torch.empty(got.shape, device=p.device, dtype=p.dtype)))
        if hasattr(self.head, "in_dim") and "head.weight" in state:
            self.head.in_dim = state["head.weight"].shape[1]
        res = super().load_state_dict(state, strict=strict, assign=assign)
        bb.set_frozen(int(bb.num_frozen))
        return res
