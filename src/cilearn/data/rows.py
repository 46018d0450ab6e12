"""Where the training images live: on the training device (the default, small data sets) or on
the host (``--data.resident host``: a memory-mapped image-folder cache, or RAM), a batch at a
time moved to the device.

``HostRows`` stands in for a uint8 image tensor ``[N, C, H, W]`` that stays on the host. It is
lazy: indexing it (a boolean mask, an index tensor, a slice) and ``torch.cat`` of it with device
tensors (exemplars) only compose a list of row numbers; nothing is read. Its rows reach the
device when ``fetch`` is called with host row numbers (the training loop, once per step) or when
it is used as a tensor (a ``torch`` function, or a Tensor method such as ``.float()``,
``.clone()``, ``.flip()``), which materialises exactly the rows of the view. Evaluation, embedding
and augmentation take views of at most a batch, so at most a batch of rows is on the device.
"""
from __future__ import annotations

import os
from typing import Any

import torch

RESIDENT_MODES = ("auto", "device", "host")
AUTO_FRACTION = 0.5   # auto: device-resident when the images take at most this share of the free memory


class HostRows:
    """Rows ``index`` of the virtual concatenation of ``sources`` (uint8 ``[n_i, C, H, W]``
    tensors: host tensors, typically memory-mapped, or tensors already on ``device``), delivered
    on ``device``. ``index``: int64 CPU tensor of virtual row numbers (default: all of them)."""

    def __init__(self, sources: torch.Tensor | list[torch.Tensor], device: torch.device | str,
                 index: torch.Tensor | None = None):
        self.sources = [sources] if isinstance(sources, torch.Tensor) else list(sources)
        first = self.sources[0]
        if any(s.shape[1:] != first.shape[1:] or s.dtype != first.dtype for s in self.sources):
            raise ValueError("HostRows: sources must share row shape and dtype")
        sizes = torch.tensor([len(s) for s in self.sources], dtype=torch.int64)
        self._starts = torch.cumsum(sizes, 0) - sizes                   # first virtual row of each source
        self.index = torch.arange(int(sizes.sum())) if index is None else index.to("cpu", torch.int64)
        self.device = torch.device(device)

    # ------------------------------------------------------------------ tensor-like attributes
    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.index), *self.sources[0].shape[1:]))

    @property
    def dtype(self) -> torch.dtype:
        return self.sources[0].dtype

    def __len__(self) -> int:
        return len(self.index)

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def __repr__(self) -> str:
        return (f"HostRows({tuple(self.shape)}, {self.dtype}, {len(self.sources)} source(s), "
                f"device={self.device})")

    # ------------------------------------------------------------------ lazy views
    def _view(self, index: torch.Tensor) -> "HostRows":
        out = HostRows.__new__(HostRows)
        out.sources, out._starts, out.device, out.index = self.sources, self._starts, self.device, index
        return out

    def __getitem__(self, key: Any):
        if isinstance(key, slice):
            return self._view(self.index[key])
        if isinstance(key, (list, range)) or (hasattr(key, "__array__") and not isinstance(key, torch.Tensor)):
            key = torch.as_tensor(key)
        if isinstance(key, torch.Tensor) and key.dim() == 1 and (key.dtype == torch.bool or not key.is_floating_point()):
            return self._view(self.index[key.cpu()])
        return self.materialize()[key]   # an int, a tuple (x[:, 0]), ...: as a tensor

    def fetch(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows ``rows`` (int64 positions in this view, on the CPU) as a uint8 tensor on
        ``device``. Host sources are gathered with one ``index_select`` each (only those rows are
        read from a memory-mapped file) and copied to the device."""
        virtual = self.index[rows]
        if len(self.sources) == 1:
            return self._take(0, virtual)
        which = torch.searchsorted(self._starts, virtual, right=True) - 1   # source of each row
        out = torch.empty((len(virtual), *self.sources[0].shape[1:]), dtype=self.dtype, device=self.device)
        for s in range(len(self.sources)):
            sel = (which == s).nonzero().squeeze(1)
            if len(sel):
                out[sel.to(self.device)] = self._take(s, virtual[sel] - self._starts[s])
        return out

    def _take(self, s: int, rows: torch.Tensor) -> torch.Tensor:
        src = self.sources[s]
        return src.index_select(0, rows.to(src.device)).to(self.device)

    def materialize(self) -> torch.Tensor:
        """All rows of this view on ``device``."""
        return self.fetch(torch.arange(len(self.index)))

    # ------------------------------------------------------------------ as a tensor
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.cat and kwargs.get("dim", args[1] if len(args) > 1 else 0) == 0:
            return _lazy_cat(args[0])
        return func(*_materialized(args), **_materialized(kwargs))

    def __getattr__(self, name: str):
        if name.startswith("__") or name in ("sources", "index", "device", "_starts"):
            raise AttributeError(name)          # copy/pickle probes must not read the data
        return getattr(self.materialize(), name)


def _materialized(obj):
    if isinstance(obj, HostRows):
        return obj.materialize()
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialized(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _materialized(v) for k, v in obj.items()}
    return obj


def _lazy_cat(parts) -> HostRows:
    """``torch.cat`` along rows of HostRows views and tensors, as one lazy HostRows view."""
    device = next(p.device for p in parts if isinstance(p, HostRows))
    sources: list[torch.Tensor] = []
    position: dict[int, int] = {}            # id(source) -> its place in ``sources``
    offsets: list[int] = []
    indices = []

    def add(src: torch.Tensor) -> int:
        if id(src) not in position:
            position[id(src)] = len(sources)
            offsets.append(sum(len(s) for s in sources))
            sources.append(src)
        return offsets[position[id(src)]]

    for p in parts:
        if isinstance(p, HostRows):
            starts = [add(s) for s in p.sources]
            which = torch.searchsorted(p._starts, p.index, right=True) - 1
            shift = torch.tensor(starts, dtype=torch.int64) - p._starts
            indices.append(p.index + shift[which])
        else:
            indices.append(torch.arange(len(p)) + add(p))
    return HostRows(sources, device, torch.cat(indices) if indices else torch.zeros(0, dtype=torch.int64))


def as_tensor(x) -> torch.Tensor:
    """``x`` itself if it is a tensor, else (a HostRows view) its rows on the device."""
    return x if isinstance(x, torch.Tensor) else x.materialize()


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def choose_resident(mode: str, nbytes: int, device: torch.device) -> str:
    """``device`` or ``host`` for ``--data.resident mode`` and images of ``nbytes`` bytes (train +
    test). ``auto``: ``device`` when the images take at most ``AUTO_FRACTION`` of the device's
    free memory (CUDA: ``torch.cuda.mem_get_info``; CPU: the kernel's MemAvailable), else ``host``."""
    if mode != "auto":
        return mode
    return "device" if nbytes <= AUTO_FRACTION * _free_bytes(device) else "host"
