"""Embed once: the embeddings of a frozen backbone, computed once per image per run.

When a phase's backbone is frozen (``frozen``: ``IncrementalNet.freeze_backbone`` was called, so
it stays in eval mode while the net trains, and no parameter of it requires a gradient, adapters
attached to it included) and the view is the test view (``Augmenter.test``: no augmentation), an
image's embedding is a function of its bytes and the backbone's tensors only. ``EmbeddingCache``
then computes it once and every use in the run reads it: the engine's embeddings
(``RunServices.embed``: class means for NME, exemplar selection, prototypes, ridge statistics,
imprinting) and its evaluation (``RunServices.predict``: the head on the cached embeddings).

Keys:

* the **backbone key**: SHA-256 of the backbone's structure (its module tree as printed), its
  tensors (``distributed.digest`` of every parameter and buffer, names included), the view (the
  digest of the test view of a fixed probe image of the rows' shape: resize, crop and
  normalisation), the autocast dtype and the device type. Computed once per backbone per phase
  (``new_phase`` forgets the phase's keys): a frozen backbone does not change within a phase.
  Another key (the backbone changed: a phase that trained it, other weights) starts from an
  empty cache.
* the **image key**: BLAKE2b-128 of the image's uint8 bytes and shape. Equal bytes have equal
  embeddings, whichever split, subset or memory the image comes from (an exemplar selected from
  the training images hits the cache; a compressed or optimised one does not).

On disk (``--data.embedding-cache DIR``): one safetensors file per backbone key
(``DIR/<key>.safetensors``: ``keys`` uint8 ``[N, 16]``, ``embeddings`` float32 ``[N, D]``, the
key's description in the header's metadata), read when the key is first used and rewritten
(atomically, by rank 0) after every phase that added embeddings; a second run with the same
backbone, view, precision and images computes none. The file is parsed by safetensors, never
unpickled.

Under torchrun the cache is a collective like ``RunServices.embed``: every rank holds the same
data and asks for the same rows, so every rank finds the same rows missing; they are embedded in
parts (``distributed.gather_rows``) and every rank stores all of them.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import weakref
from pathlib import Path

import numpy as np
import torch

from . import distributed
from .data.rows import as_tensor
from .errors import ConfigError, one_line
from .evaluate import predict
from .models.net import IncrementalNet, eval_mode

FORMAT = "cilearn-embeddings-1"
KEY_BYTES = 16              # BLAKE2b digest size of an image key


def frozen(net: torch.nn.Module) -> bool:
    """Whether ``net``'s embedding is a fixed function of its input: an ``IncrementalNet`` (one
    backbone, its own forward) whose backbone is frozen (``freeze_backbone``) with no parameter
    requiring a gradient (an adapter or prompt trained inside it unfreezes it)."""
    return (isinstance(net, IncrementalNet) and type(net).forward is IncrementalNet.forward
            and not net.expandable and getattr(net, "backbone_frozen", False)
            and not any(p.requires_grad for p in net.backbone.parameters()))


def image_keys(x) -> list[bytes]:
    """The image key of each row of uint8 ``x`` ``[N, C, H, W]`` (a tensor or a ``HostRows`` view):
    BLAKE2b-128 of its bytes (the row shape is part of the backbone key), in batches of 1024 rows
    moved to the host."""
    out: list[bytes] = []
    for i in range(0, x.shape[0], 1024):
        rows = as_tensor(x[i:i + 1024]).cpu().contiguous().numpy().reshape(-1, int(np.prod(x.shape[1:])))
        out += [hashlib.blake2b(row.tobytes(), digest_size=KEY_BYTES).digest() for row in rows]
    return out


class EmbeddingCache:
    """The run's embeddings of frozen backbones (module docstring). ``augmenter``: the run's (its
    ``test`` view is what the backbone sees); ``batch_size``, ``autocast_dtype``: as the run's
    evaluation; ``device``: where the embeddings are kept (the run's); ``directory``: the on-disk
    cache, or None. ``computed`` counts the images this run embedded through the cache, ``reused``
    those it found there (in memory or on disk)."""

    def __init__(self, augmenter, batch_size: int, autocast_dtype: torch.dtype | None, device: torch.device,
                 directory: str | Path | None = None):
        self.augmenter, self.batch_size, self.autocast_dtype = augmenter, batch_size, autocast_dtype
        self.device = torch.device(device)
        self.directory = Path(directory) if directory else None
        self._keys: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # backbone -> {row shape: key}
        self._key: str | None = None                     # the backbone key whose embeddings are held
        self._about: dict[str, str] = {}                 # its description (the disk file's metadata)
        self._index: dict[bytes, int] = {}               # image key -> row of ``_store``
        self._store: torch.Tensor | None = None          # [capacity, D] float32 on the device
        self._count = 0
        self._unsaved = False
        self.computed = 0
        self.reused = 0

    # ---------------------------------------------------------------- keys
    def new_phase(self) -> None:
        """A new phase: the backbones' keys are computed again on their next use."""
        self._keys = weakref.WeakKeyDictionary()

    def usable(self, net: torch.nn.Module) -> bool:
        return frozen(net)

    def backbone_key(self, net: IncrementalNet, shape: tuple[int, ...], device: torch.device) -> tuple[str, dict]:
        """The key of ``net``'s backbone seeing rows of ``shape`` ``[C, H, W]`` on ``device``, and
        what it is made of (``{name: digest}``, the disk file's metadata)."""
        per = self._keys.setdefault(net.backbone, {})
        if shape not in per:
            probe = (torch.arange(int(np.prod(shape)), dtype=torch.int64) * 37 % 256).to(torch.uint8)
            view = self.augmenter.test(probe.view(1, *shape).to(device)).float()
            about = {"format": FORMAT, "backbone": hashlib.sha256(str(net.backbone).encode()).hexdigest()[:16],
                     "tensors": distributed.digest([t for _, t in sorted(net.backbone.state_dict().items())]),
                     "names": hashlib.sha256(",".join(sorted(net.backbone.state_dict())).encode()).hexdigest()[:16],
                     "view": distributed.digest([view]), "shape": "x".join(map(str, shape)),
                     "precision": str(self.autocast_dtype or "float32"), "device": device.type}
            per[shape] = (hashlib.sha256(json.dumps(about, sort_keys=True).encode()).hexdigest()[:32], about)
        return per[shape]

    # ---------------------------------------------------------------- lookups
    def embed(self, net: IncrementalNet, x) -> torch.Tensor:
        """Embeddings ``[N, D]`` float32 of uint8 images ``x`` ``[N, C, H, W]`` (test view, eval
        mode), each image embedded at most once per run (and per disk cache). ``net``: ``frozen``."""
        device = x.device
        key, about = self.backbone_key(net, tuple(x.shape[1:]), device)
        if key != self._key:
            self._switch(key, about)
        keys = image_keys(x)
        if not keys:
            return torch.zeros(0, self._store.shape[1] if self._store is not None else 0, device=self.device)
        missing: dict[bytes, int] = {}                    # image key -> first position in x
        for i, k in enumerate(keys):
            if k not in self._index and k not in missing:
                missing[k] = i
        if missing:
            pos = torch.tensor(list(missing.values()), dtype=torch.int64)
            rows = x[pos.to(device)] if isinstance(x, torch.Tensor) else x[pos]
            bs, amp = self.batch_size, self.autocast_dtype
            emb = distributed.gather_rows(lambda xs: predict(net, xs, self.augmenter, bs, amp)[1:], rows)[0]
            self._append(list(missing), emb)
            self.computed += len(missing)
        self.reused += len(keys) - len(missing)
        idx = torch.tensor([self._index[k] for k in keys], dtype=torch.int64, device=self._store.device)
        return self._store[idx]

    @torch.inference_mode(False)
    @torch.no_grad()
    def _append(self, keys: list[bytes], emb: torch.Tensor) -> None:
        """Stores ``emb`` ``[n, D]`` under ``keys`` (in a normal tensor, whether or not the caller
        is in inference mode: the store is written again later)."""
        d = emb.shape[1]
        if self._store is None:
            self._store = torch.zeros(0, d, device=self.device)
        need = self._count + len(keys)
        if need > len(self._store):                        # grow by doubling: amortised O(1) per row
            grown = torch.zeros(max(need, 2 * len(self._store), 1024), d, device=self.device)
            grown[: self._count] = self._store[: self._count]
            self._store = grown
        self._store[self._count: need] = emb.float().to(self.device)
        for i, k in enumerate(keys):
            self._index[k] = self._count + i
        self._count = need
        self._unsaved = True

    def _switch(self, key: str, about: dict[str, str]) -> None:
        """Holds the embeddings of backbone key ``key`` from now on: what this run stored under the
        previous key goes to disk, then the disk's entries of ``key`` are read."""
        self.flush()
        self._key, self._about = key, about
        self._store, self._count, self._index, self._unsaved = None, 0, {}, False
        if self.directory is not None and self._path().is_file():
            keys, emb = self._read(self._path())
            self._append([bytes(k) for k in keys.numpy()], emb)
            self._unsaved = False

    # ---------------------------------------------------------------- disk
    def _path(self) -> Path:
        return self.directory / f"{self._key}.safetensors"

    def _read(self, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys uint8 ``[N, 16]``, embeddings float32 ``[N, D]``) of a cache file, checked."""
        from safetensors.torch import load

        def bad(why: str) -> ConfigError:
            return ConfigError(f"--data.embedding-cache: {path} is not a cilearn embedding cache ({why}); delete it")
        try:
            t = load(path.read_bytes())
        except OSError as e:
            raise ConfigError(f"--data.embedding-cache: cannot read {path} ({e.strerror or e})") from None
        except Exception as e:  # noqa: BLE001  (safetensors' parser error: a damaged or foreign file)
            raise bad(one_line(e)[:200]) from None
        keys, emb = t.get("keys"), t.get("embeddings")
        if keys is None or emb is None or set(t) != {"keys", "embeddings"}:
            raise bad(f"tensors {sorted(t)}, expected keys and embeddings")
        if keys.dtype != torch.uint8 or keys.dim() != 2 or keys.shape[1] != KEY_BYTES:
            raise bad(f"keys of {keys.dtype} {list(keys.shape)}, expected uint8 [N, {KEY_BYTES}]")
        if emb.dtype != torch.float32 or emb.dim() != 2 or len(emb) != len(keys):
            raise bad(f"embeddings of {emb.dtype} {list(emb.shape)}, expected float32 [{len(keys)}, D]")
        return keys, emb

    def flush(self) -> None:
        """Writes the held embeddings to the disk cache (rank 0, atomically through a temporary
        file in the same directory) if this run added some; a no-op without a directory."""
        if self.directory is None or self._key is None or not self._unsaved:
            return
        self._unsaved = False
        if not distributed.is_main():
            return
        from safetensors.torch import save

        keys = torch.tensor(np.frombuffer(b"".join(self._ordered_keys()), dtype=np.uint8).reshape(-1, KEY_BYTES))
        data = save({"keys": keys, "embeddings": self._store[: self._count].cpu().contiguous()},
                    metadata=self._about)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=".safetensors")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._path())
        except OSError as e:
            raise ConfigError(f"--data.embedding-cache {self.directory}: cannot write ({e.strerror or e})") from None

    def _ordered_keys(self) -> list[bytes]:
        out = [b""] * self._count
        for k, i in self._index.items():
            out[i] = k
        return out

    # ---------------------------------------------------------------- the head on cached embeddings
    @torch.no_grad()
    def predict(self, net: IncrementalNet, x) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits [N, K], embeddings [N, D])`` float32 as ``evaluate.predict`` gives them, the
        embeddings from the cache and the logits from the net's head on them (``net.logits``)."""
        emb = self.embed(net, x)
        bs, amp = self.batch_size, self.autocast_dtype
        with eval_mode(net):
            parts = []
            for i in range(0, len(emb), bs):
                with torch.autocast(device_type=emb.device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
                    parts.append(net.logits(emb[i:i + bs]).float())
        logits = torch.cat(parts) if parts else emb.new_zeros(0, net.num_classes)
        return logits, emb
