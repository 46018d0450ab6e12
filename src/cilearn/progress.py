"""What a run shows of its training stages while they run: a live bar (tqdm) on a terminal, one
line per finished stage elsewhere, so that ``cilearn run > run.log`` (or a batch scheduler's
output file) holds the phase table and the stage lines, and no carriage-return refreshes.

``train.progress`` (``--progress MODE``) says when bars are drawn:

* ``auto`` (default): when standard error, where tqdm draws them, is a terminal;
* ``always``: also when it is not (forced, e.g. a terminal the process cannot detect);
* ``never`` (``--no-progress``): never.

A ``config.yaml`` written before the modes existed holds ``progress: true`` (read as ``auto``)
or ``false`` (``never``); a bool given through the Python API is read the same way.

A stage's line (``stage_line``: stage, epochs or steps, seconds, the last epoch's loss) goes to
``log.txt`` always, and to the console whenever its bar is not seen there: no bar drawn, or
standard output is not a terminal (``lines_on_console``). Core layer: no cilearn imports but
errors.
"""
from __future__ import annotations

import math
import sys
from typing import Any, TextIO

from .errors import ConfigError

MODES = ("auto", "always", "never")


def mode(value: str | bool) -> str:
    """The mode of a ``train.progress`` value (a mode, or the bool of older configurations)."""
    if value is True:
        return "auto"
    if value is False:
        return "never"
    if value not in MODES:
        raise ConfigError(f"--train.progress must be one of {', '.join(MODES)} (or true/false: auto/never), "
                          f"got {value!r}")
    return value


def _is_terminal(stream: TextIO | None) -> bool:
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):     # a replaced or closed stream
        return False


def bars(value: str | bool) -> bool:
    """Whether progress bars are drawn under ``train.progress`` = ``value``."""
    m = mode(value)
    return m == "always" or (m == "auto" and _is_terminal(sys.stderr))


def lines_on_console(value: str | bool) -> bool:
    """Whether the stage lines are printed (unless ``--quiet``): unless bars are drawn and standard
    output is a terminal too (then the bar shows the stage, and the table stays compact)."""
    return not (bars(value) and _is_terminal(sys.stdout))


def bar(total: int, desc: str, unit: str, initial: int = 0) -> Any:
    """A transient tqdm bar on standard error (gone when closed: the stage line stays)."""
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=False, dynamic_ncols=True)


def stage_line(desc: str, count: int, unit: str, seconds: float, loss: float) -> str:
    """``  phase 1 balanced-ft: 30 epochs in 2.1 s, last epoch's loss 0.4321`` (``unit``: epoch,
    step; no loss when none was computed in this process, e.g. a stage resumed after its last step)."""
    done = f"  {desc}: {count} {unit}{'' if count == 1 else 's'} in {seconds:.1f} s"
    return done + (f", last {unit}'s loss {loss:.4f}" if math.isfinite(loss) else "")
