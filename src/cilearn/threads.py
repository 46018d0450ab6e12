"""The CPU threads a run computes with (``--threads``, ``train.threads``).

PyTorch's CPU kernels run on OpenMP threads, by default one per core, and OpenMP's threads, by
default, spin while they wait for the next parallel region. Beside another busy process on a small
machine (2 cores here) that default is slow: one thread shares its core, the others spin at every
barrier waiting for it (a default run took 17 s beside one busy process, 9 s with one thread; the
measurement and the choice are in benchmarks/RESULTS.md, "CPU threads under load"). cilearn
therefore

* makes OpenMP's threads sleep instead of spinning while they wait (``OMP_WAIT_POLICY=PASSIVE``),
  set when cilearn is imported, unless the environment already sets it (PyTorch reads it when it
  loads; a program that imports torch before cilearn sets it itself);
* runs with ``threads`` threads: ``auto`` is ``$CILEARN_THREADS`` when set (a test suite pins it),
  else ``$OMP_NUM_THREADS`` when set (torchrun sets 1 per process), else PyTorch's own default
  (one per physical core this process may use), as the process found it; the number that ran is in
  ``config.yaml`` and ``metrics.json``. The thread count changes the order of float
  reductions, hence the last bits of the numbers: replaying or resuming a run uses the recorded count.
"""
from __future__ import annotations

import os

from .errors import ConfigError

WAIT_POLICY = "PASSIVE"
THREADS_ENV = "CILEARN_THREADS"


def sleep_when_waiting() -> None:
    """OpenMP's threads sleep, not spin, between parallel regions (unless the environment says otherwise)."""
    os.environ.setdefault("OMP_WAIT_POLICY", WAIT_POLICY)


_DEFAULT: list[int] = []


def default_threads() -> int:
    """PyTorch's thread count as this process found it (before any run set its own)."""
    if not _DEFAULT:
        import torch               # (deferred: cilearn sets the wait policy before torch loads)
        _DEFAULT.append(torch.get_num_threads())
    return _DEFAULT[0]


def resolve_threads(value: int | str) -> int:
    """The threads of a run: ``value`` (a positive number) or, for ``auto``, ``$CILEARN_THREADS``
    or ``$OMP_NUM_THREADS`` when set, else ``default_threads()``."""
    if value == "auto":
        env = next((e for e in (THREADS_ENV, "OMP_NUM_THREADS") if os.environ.get(e, "").strip()), None)
        if env is None:
            return default_threads()
        value = os.environ[env].strip()
        where = f"environment variable {env}"
    else:
        where = "--threads"
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if isinstance(value, bool) or n < 1:
        raise ConfigError(f"{where} must be a positive number of threads or auto, got {value!r}")
    return n
