"""Weight imprinting (kind ``head-init`` of ``cilearn.components``): new classes' classifier rows
set from the current model's embeddings of their training images before a phase trains (Qi et
al. 2018), scaled to the old rows' mean norm. LUCIR imprints one row per class (its normalised
class mean); PODNet imprints the K proxies of its local-similarity classifier from a K-means of
the class's normalised embeddings."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .components import Component, register
from .errors import ConfigError


def imprint_weights(emb: torch.Tensor, y: torch.Tensor, classes: range, old_weight: torch.Tensor) -> torch.Tensor:
    """LUCIR's imprinting (Sec. 3.2): for each new class c, the L2-normalised mean of the
    L2-normalised embeddings of its training images, scaled to the mean L2 norm of the old
    classes' rows (1 when there are none: the first phase). ``emb`` ``[N, D]``, ``y`` ``[N]`` (all in
    ``classes``), ``old_weight`` ``[K_old, D]`` -> ``[len(classes), D]``."""
    f = F.normalize(emb.float(), dim=1)
    sums = torch.zeros(len(classes), f.shape[1], device=f.device).index_add_(0, y - classes.start, f)
    # normalising the sum normalises the mean (the count is a positive factor)
    return F.normalize(sums, dim=1) * _old_norm(old_weight)


def _old_norm(old_weight: torch.Tensor) -> torch.Tensor | float:
    """The mean L2 norm of the old rows ``[K_old, D]``; 1 without old rows."""
    return old_weight.float().norm(dim=1).mean() if len(old_weight) else 1.0


def kmeans(x: torch.Tensor, k: int, gen: torch.Generator, iters: int = 20) -> torch.Tensor:
    """Lloyd's k-means on the rows of ``x`` ``[N, D]`` -> ``[k, D]`` centres. Initialised with k
    distinct rows drawn by ``gen`` (with repetition only when N < k); an empty cluster keeps its
    previous centre. Deterministic given ``gen``."""
    n = x.shape[0]
    pick = torch.randperm(n, generator=gen)[:k] if n >= k else torch.randint(0, n, (k,), generator=gen)
    c = x[pick.to(x.device)].clone()
    for _ in range(iters):
        assign = torch.cdist(x, c).argmin(1)                                       # [N]
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)[:, None]
        c = torch.where(counts > 0, sums / counts.clamp_min(1), c)
    return c


def imprint_proxies(emb: torch.Tensor, y: torch.Tensor, classes: range, old_weight: torch.Tensor,
                    proxies: int, gen: torch.Generator) -> torch.Tensor:
    """PODNet's imprinting of the local-similarity classifier (official code: "multi-imprinting"):
    per new class, K-means (``proxies`` centres) of its L2-normalised embeddings; each centre
    L2-normalised and scaled to the old rows' mean norm. -> ``[len(classes) * proxies, D]``,
    class by class. With one proxy this is ``imprint_weights``."""
    f = F.normalize(emb.float(), dim=1)
    norm = _old_norm(old_weight)
    rows = [F.normalize(kmeans(f[y == c], proxies, gen), dim=1) for c in classes]
    return torch.cat(rows) * norm


@torch.no_grad()
def imprint(head: torch.nn.Module, emb: torch.Tensor, y: torch.Tensor, classes: range, gen: torch.Generator) -> None:
    """Imprints the rows of ``classes`` (the last ones of ``head.weight``) in place from the
    embeddings ``emb`` ``[N, D]`` of their images (labels ``y``); cosine heads (one row per
    class) and local-similarity heads (``head.proxies`` rows per class)."""
    k = getattr(head, "proxies", 1)
    w = head.weight
    old = w[: classes.start * k]
    new = imprint_weights(emb, y, classes, old) if k == 1 else imprint_proxies(emb, y, classes, old, k, gen)
    w[classes.start * k: classes.stop * k] = new.to(w.dtype)


@dataclass(frozen=True)
class ImprintOptions:
    first_phase: int = 1     # the first phase whose new rows are imprinted (0: the first phase too)

    def __post_init__(self):
        if self.first_phase < 0:
            raise ConfigError(f"components.imprint.first_phase must be >= 0, got {self.first_phase}")


@register("head-init", "imprint")
class Imprint(Component):
    """Weight imprinting of the new classes' rows (Qi et al. 2018; LUCIR Sec. 3.2, PODNet's
    multi-imprinting) from the model's embeddings of their training images, once the head has
    grown, before the phase trains: the old model's cached embeddings (unflipped view) when the
    augmentation has finite views, else one embedding pass. K-means draws come from the phase's
    own generator."""
    Options = ImprintOptions
    needs_old_outputs = True

    def phase_start(self, ctx):
        new = (ctx.y >= ctx.phase.start).nonzero().flatten()
        emb = ctx.old_outputs.cached_embeddings(new) if ctx.old_outputs is not None else None
        if emb is None:
            emb = self.services.embed(ctx.model, ctx.x[new])
        imprint(ctx.model.head, emb, ctx.y[new], ctx.phase.classes, self.services.phase_generator(ctx.phase))
