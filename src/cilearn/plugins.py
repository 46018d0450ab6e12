"""``--plugin FILE.py``: a user's Python file whose registrations (``@cilearn.components.register``,
recipes) become usable by name in the run, e.g. ``examples/ewc_plugin.py``'s loss term ``ewc``
with ``--distill ewc``.

A plugin is code and runs as such: a configuration naming one (``plugins:`` in YAML, and a run
directory's ``config.yaml`` on ``--resume``) is to be trusted like the file itself. Each file is
imported once per process (by its resolved path), under a module name of its own.
"""
from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from .errors import ConfigError

_LOADED: dict[str, ModuleType] = {}


def load_plugins(paths: list[str]) -> list[str]:
    """Import every file of ``paths`` not imported yet; returns their resolved paths (what the
    run's ``config.yaml`` records). A missing or failing file is a one-line ConfigError."""
    out = []
    for given in paths:
        path = Path(given).expanduser().resolve()
        out.append(str(path))
        if str(path) in _LOADED:
            continue
        if not path.is_file():
            raise ConfigError(f"--plugin {given}: no such file")
        if path.suffix != ".py":
            raise ConfigError(f"--plugin {given}: expected a Python file (.py)")
        name = f"cilearn_plugin_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as e:          # the user's code: any failure is reported in one line
            sys.modules.pop(name, None)
            raise ConfigError(f"--plugin {given}: importing it failed: {type(e).__name__}: {e}") from None
        _LOADED[str(path)] = module
    return out
