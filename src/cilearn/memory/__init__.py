"""Exemplar memory: a budget, a selection rule (``cilearn.memory.selection``), an optimizer
(``cilearn.memory.mnemonics``: mnemonics, mnemonics-single, or none), a compressor
(``cilearn.memory.compressors``: full, cam-threshold, cim, or none) and the stored exemplars per
class (uint8 images; with a compressor, their codes and a decoded working copy). The selection
rule, the optimizer and the compressor are the run's components of those kinds.

With a compressor the budget is in full-image units (one unit = ``C * H * W`` pixel bytes) and a
class's share holds as many compressed exemplars as fit, in selection order (``compress``).

Budgets (named unambiguously, since PyCIL and Avalanche use "fixed memory" in opposite senses):
* ``total=M``: M exemplars in all, shared by the seen classes: ``M // seen`` per class, so each
  class's share shrinks as classes arrive (the 2000-exemplar protocol of iCaRL/LUCIR/PODNet).
* ``per_class=P``: P per class, the total grows (the 20-per-class protocol of Mnemonics).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .codec import Codes, compressed_features, decode, encode, fit_prefix
from .compressors import Compressor
from .mnemonics import ExemplarOptimizer
from .selection import Herding, Selection


@dataclass(frozen=True)
class Budget:
    total: int | None = None
    per_class: int | None = None

    def share(self, seen: int) -> int:
        """Exemplars per class when ``seen`` classes are stored (with a compressor: full-image
        units per class)."""
        if self.per_class is not None:
            return self.per_class
        if self.total is not None:
            return self.total // seen
        return 0

    def check(self, num_classes: int) -> None:
        if self.total is not None and self.total < num_classes:
            raise ConfigError(f"--memory {self.total} is smaller than the number of classes ({num_classes}): "
                              "expected at least one exemplar per class")


class Memory:
    """Exemplars per class (incremental id -> ``[n, C, H, W]``, uint8 or float32 pixels) in
    selection order. With a compressor, ``codes`` (class -> ``Codes``) is what is stored and
    counted; ``exemplars`` holds their decoded images, the working copy the training reads."""

    def __init__(self, budget: Budget, selection: Selection | None = None, optimizer: ExemplarOptimizer | None = None,
                 compressor: Compressor | None = None):
        self.budget = budget
        self.select = (selection or Herding(None, None)).select
        self.optimizer = optimizer
        self.compressor = compressor
        self.exemplars: dict[int, torch.Tensor] = {}
        self.codes: dict[int, Codes] = {}

    def __len__(self) -> int:
        return sum(len(v) for v in self.exemplars.values())

    def class_bytes(self, c: int) -> int:
        """Bytes stored for class ``c``: its codes with a compressor, else its images."""
        if self.compressor is not None:
            return self.codes[c].nbytes if c in self.codes else 0
        v = self.exemplars.get(c)
        return v.numel() * v.element_size() if v is not None else 0

    @property
    def nbytes(self) -> int:
        return sum(self.class_bytes(c) for c in self.exemplars)

    def unit_bytes(self) -> int | None:
        """Bytes of one full image (``C * H * W`` uint8), None while empty."""
        for v in self.exemplars.values():
            return v[0].numel() if len(v) else None
        return None

    def data(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """All exemplars and their labels, or None when empty."""
        if not self.exemplars:
            return None
        ids = sorted(self.exemplars)
        x = torch.cat([self.exemplars[c] for c in ids])
        y = torch.cat([torch.full((len(self.exemplars[c]),), c, dtype=torch.long, device=x.device) for c in ids])
        return x, y

    def shrink(self, per_class: int) -> None:
        """Each class cut to its first exemplars that fit ``per_class`` (exemplars; with a
        compressor, full-image units)."""
        for c in self.exemplars:
            n = per_class
            if self.compressor is not None:
                n = fit_prefix(self.codes[c].sizes(), per_class * self.codes[c].image_bytes)
                self.codes[c] = self.codes[c].head(n)
            self.exemplars[c] = self.exemplars[c][:n]

    def update(self, x: torch.Tensor, y: torch.Tensor, classes: range, features: torch.Tensor,
               seen: int, gen: torch.Generator | None = None, net: torch.nn.Module | None = None,
               normalize=None) -> dict[int, torch.Tensor]:
        """Shrink old classes to the new share, then select exemplars of ``classes`` from
        ``x`` (uint8), using ``features`` ``[N, D]`` of ``x`` for the selection rule; with a
        compressor, fit it (CIM) and compress them (``net``, ``normalize``: the model and its input
        normalisation). Returns the kept exemplars as they were before compression."""
        per = self.budget.share(seen)
        if self.compressor is not None:
            self.compressor.fit(net, normalize, x, y, classes, self.data(), gen)
        self.shrink(per)
        originals = {}
        for c in classes:
            idx = (y == c).nonzero().flatten()
            if len(idx) == 0:
                continue
            if self.compressor is None:
                order = self.select(features[idx], per, gen)
                self.exemplars[c] = originals[c] = x[idx[order]].clone()
                continue
            unit = x[0].numel()
            s, comp = self.compressor.s, self.compressor
            # a code holds at least the C * ceil(H/s) * ceil(W/s) >= C*H*W / s^2 cells: at most per * s^2 fit
            if comp.options.select_on == "compressed" and net is not None:   # official: herding on the compressed images' features
                xc = x[idx]
                boxes = comp.boxes(net, normalize, xc, c)
                feats = compressed_features(net, normalize, decode(encode(xc, boxes, s, comp.with_boxes, comp.mode)))
                order = self.select(feats, per * s * s, gen)
                cand = xc[order]
                codes = encode(cand, boxes[order], s, comp.with_boxes, comp.mode)
            else:                                      # the original images' features (cilearn's earlier choice)
                order = self.select(features[idx], per * s * s, gen)
                cand = x[idx[order]]
                codes = encode(cand, comp.boxes(net, normalize, cand, c), s, comp.with_boxes, comp.mode)
            n = fit_prefix(codes.sizes(), per * unit)
            whole = min(per, len(cand))
            if n <= whole:      # boxes keep no more than whole images would (near-whole boxes + coordinates):
                H, W = cand.shape[-2:]        # store whole images, the class's box implied (no coordinates)
                codes, n = encode(cand[:whole], torch.tensor([[0, 0, H, W]] * whole), s, False, self.compressor.mode), whole
            self.codes[c] = codes.head(n)
            self.exemplars[c] = decode(self.codes[c])
            originals[c] = cand[:n]
        return originals

    def optimize(self, net: torch.nn.Module, normalize, classes: range, x: torch.Tensor, y: torch.Tensor,
                 gen: torch.Generator) -> dict[int, torch.Tensor] | None:
        """Run the exemplar optimizer after ``update`` (``x`` uint8, ``y``: the phase's images of
        ``classes``); returns the exemplars as selected, before optimisation, or None when the
        optimizer is ``none``. With a compressor, the optimised images (uint8) are encoded again in
        their boxes."""
        if self.optimizer is None:
            return None
        before = self.optimizer(self, net, normalize, classes, x, y, gen)
        if self.compressor is not None:
            for c, codes in self.codes.items():
                self.codes[c] = encode(self.exemplars[c], codes.boxes, codes.s, codes.with_boxes, codes.mode)
                self.exemplars[c] = decode(self.codes[c])
        return before

    def state(self) -> dict:
        if self.compressor is not None:       # the codes are what is stored (the compressor's own state is a component's)
            return {"codes": {c: v.state() for c, v in self.codes.items()}}
        return {"exemplars": {c: v.cpu() for c, v in self.exemplars.items()}}

    def load_state(self, state: dict, device: torch.device) -> None:
        if "codes" in state:
            self.codes = {int(c): Codes.from_state(v, device) for c, v in state["codes"].items()}
            self.exemplars = {c: decode(v) for c, v in self.codes.items()}
        else:
            self.exemplars = {int(c): v.to(device) for c, v in state["exemplars"].items()}
