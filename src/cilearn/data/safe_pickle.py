"""A restricted unpickler for the CIFAR python-pickle releases: data from others never runs code.

A pickle is a small program: its ``GLOBAL``/``STACK_GLOBAL`` opcodes name any importable callable
and ``REDUCE`` calls it, so ``pickle.load`` on a downloaded file runs whatever the file asks for.
The CIFAR-10/100 release files (Python 2 pickles, read with ``encoding="bytes"``) and their Python 3
re-pickles hold only dicts, lists, bytes/str and ints, which need no global at all, and numpy
arrays, whose reconstruction names a handful of numpy functions. ``load`` allows exactly those
(plus ``_codecs.encode``, which Python 3 writes for ``bytes`` at protocols < 3), each checked for
the arguments a real array needs: class ``numpy.ndarray`` only, and plain numeric dtypes (no
object, structured or void dtypes, whose payload could hold further objects). Any other global is
refused by ``find_class`` *before* it is imported or called: ``RefusedGlobal`` names it.
"""
from __future__ import annotations

import importlib
import io
import pickle
from typing import Any, BinaryIO, Callable

import numpy as np

# dtype codes of plain numbers: numpy pickles a dtype as ``numpy.dtype(code, False, True)``
SAFE_DTYPES = frozenset({"b1", "i1", "u1", "i2", "u2", "i4", "u4", "i8", "u8", "f2", "f4", "f8"})


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle names a global that a CIFAR release file never uses (``str(e)`` is its name)."""


def _numpy_attr(module: str, name: str) -> Callable:
    """``numpy._core.<module>.<name>`` (NumPy 2) or ``numpy.core.<module>.<name>`` (NumPy 1)."""
    for prefix in ("numpy._core.", "numpy.core."):
        try:
            return getattr(importlib.import_module(prefix + module), name)
        except (ImportError, AttributeError):
            continue
    raise RefusedGlobal(f"numpy.core.{module}.{name}")   # not in this NumPy: refuse rather than guess


def _dtype(code: Any, *args: Any) -> np.dtype:
    """``numpy.dtype`` for the plain numeric codes only (``'u1'``, ``'<i8'`` after BUILD, ...)."""
    text = code.decode("ascii", "replace") if isinstance(code, bytes) else code
    if not isinstance(text, str) or text.lstrip("<>|=") not in SAFE_DTYPES:
        raise RefusedGlobal(f"numpy.dtype({code!r})")
    return np.dtype(text, *args)


def _reconstruct(cls: Any, *args: Any) -> np.ndarray:
    """NumPy's array constructor of pickles, for ``numpy.ndarray`` itself only (no subclass)."""
    if cls is not np.ndarray:
        raise RefusedGlobal(f"numpy.core.multiarray._reconstruct({getattr(cls, '__name__', cls)!r})")
    return _numpy_attr("multiarray", "_reconstruct")(cls, *args)


def _frombuffer(buf: Any, dtype: Any, *args: Any) -> np.ndarray:
    """Protocol-5 arrays: ``numpy.core.numeric._frombuffer(bytes, dtype, shape, order)``."""
    if not isinstance(dtype, np.dtype) or dtype.str.lstrip("<>|=") not in SAFE_DTYPES:
        raise RefusedGlobal(f"numpy.core.numeric._frombuffer(dtype={dtype!r})")
    return _numpy_attr("numeric", "_frombuffer")(buf, dtype, *args)


def _scalar(dtype: Any, *args: Any) -> Any:
    """A numpy scalar of a plain numeric dtype (``numpy.core.multiarray.scalar``)."""
    if not isinstance(dtype, np.dtype) or dtype.str.lstrip("<>|=") not in SAFE_DTYPES:
        raise RefusedGlobal(f"numpy.core.multiarray.scalar(dtype={dtype!r})")
    return _numpy_attr("multiarray", "scalar")(dtype, *args)


def _encode(text: Any, encoding: Any = "latin1") -> bytes:
    """``_codecs.encode(str, 'latin1')``: how Python 3 pickles ``bytes`` at protocol 2."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise RefusedGlobal(f"_codecs.encode(..., {encoding!r})")
    return text.encode("latin1")


ALLOWED: dict[tuple[str, str], Callable] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _dtype,
    ("_codecs", "encode"): _encode,
    **{(f"numpy.{core}.multiarray", "_reconstruct"): _reconstruct for core in ("core", "_core")},
    **{(f"numpy.{core}.multiarray", "scalar"): _scalar for core in ("core", "_core")},
    **{(f"numpy.{core}.numeric", "_frombuffer"): _frombuffer for core in ("core", "_core")},
}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:   # called for every GLOBAL / STACK_GLOBAL
        fn = ALLOWED.get((module, name))
        if fn is None:
            raise RefusedGlobal(f"{module}.{name}")
        return fn


def load(f: BinaryIO | bytes) -> Any:
    """Unpickle a CIFAR release file (``encoding="bytes"``, as the Python 2 files need) allowing only
    the globals in ``ALLOWED``; raises ``RefusedGlobal`` for any other, before it runs."""
    if isinstance(f, (bytes, bytearray)):
        f = io.BytesIO(f)
    return _Unpickler(f, encoding="bytes").load()
