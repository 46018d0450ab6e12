"""Writing files so that a reader never sees half of one (core layer: no cilearn imports)."""
from __future__ import annotations

import os
from pathlib import Path


def atomic_write(path: Path, text: str | bytes) -> None:
    """``text`` (or bytes) into ``path`` through ``path.tmp``, fsynced, then renamed over ``path``:
    the file is either the old one or the whole new one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb" if isinstance(text, bytes) else "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
