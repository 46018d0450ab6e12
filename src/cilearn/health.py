"""Warnings that say when a run is not learning, checked after each phase (docs/running.md,
"Warnings"). The run continues; the runner prints each warning under the phase's row, writes it to
``log.txt`` and lists it in ``metrics.json`` (``warnings``: phase, kind, the numbers and a message).

* ``chance``: the phase's accuracy (CNN head, all seen classes) is at most ``chance_factor`` times
  the accuracy of predicting the most frequent seen class for every test image (100 / seen on a
  balanced test set), i.e. the head is no better than a constant guess (with two classes or more
  in the test images);
* ``loss-growth``: a training stage of the phase ended with a mean loss (its last epoch) at least
  ``loss_growth`` times the mean loss of its first epoch, or (the phase's main stage) of the first
  epoch of phase 0, the untrained model's: a loss that exploded in a phase's first steps;
* ``skipped``: a per-phase value ``<name>_skipped`` > 0 in the phase's row (a component's
  ``diagnostics``, or a statistics section such as ``compressor``): steps a component skipped
  (out of ``<name>_steps`` where it reports them), so it did not do all of its work.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch


@dataclass(frozen=True)
class Checks:
    chance_factor: float = 1.1       # accuracy <= 1.1 x the constant guess's: chance level
    loss_growth: float = 100.0       # last epoch's mean loss >= 100 x the first's: two orders of magnitude


def phase_warnings(acc: float, predicted: torch.Tensor, labels: torch.Tensor, rows: list[dict[str, Any]],
                   checks: Checks = Checks()) -> list[dict]:
    """The warnings of the phase whose metrics row is ``rows[-1]`` (``rows``: the run's rows so far).
    ``acc``: its accuracy in percent; ``predicted`` / ``labels``: the predicted and true incremental
    ids of the seen classes' test images ``[N]``. A row's ``stage_losses`` holds each training
    stage's ``[first epoch's mean loss, last epoch's]`` (stages named ``phase N ...``, the main one
    ``phase N``)."""
    row, out = rows[-1], []
    phase = row["phase"]
    counts = torch.bincount(labels)
    guess = 100.0 * float(counts.max()) / len(labels) if len(labels) else 100.0
    if int((counts > 0).sum()) > 1 and acc <= checks.chance_factor * guess:   # (one class seen: nothing to guess)
        top = 100.0 * float(torch.bincount(predicted).max()) / len(labels)
        out.append({"phase": phase, "kind": "chance", "acc": acc, "chance": guess, "top_predicted_share": top,
                    "message": f"phase {phase}: accuracy {acc:.2f} is at chance level (predicting the most frequent "
                               f"class gives {guess:.2f}; {top:.1f}% of the test images are predicted as one class)"})
    run_first = (rows[0].get("stage_losses") or {}).get("phase 0", [None])[0]    # the untrained model's loss
    for stage, (first, last) in (row.get("stage_losses") or {}).items():
        refs = [("its first epoch", first)]
        if stage == f"phase {phase}" and phase > 0 and run_first is not None:
            refs.append(("the first epoch of phase 0", run_first))
        for what, ref in refs:
            if ref > 0 and last >= checks.loss_growth * ref:
                out.append({"phase": phase, "kind": "loss-growth", "stage": stage, "last": last, "reference": ref,
                            "compared_with": what,
                            "message": f"phase {phase}: the training loss of '{stage}' ended at {last:.4g} "
                                       f"(last epoch), {last / ref:.0f}x that of {what} ({ref:.4g})"})
                break
    for name, skipped, steps in _skips(row):
        of = f" of {steps:g}" if steps is not None else ""
        out.append({"phase": phase, "kind": "skipped", "name": name, "skipped": skipped, "steps": steps,
                    "message": f"phase {phase}: {name} skipped {skipped:g}{of} steps ({name}_skipped in metrics.json)"})
    return out


def _skips(row: dict[str, Any]) -> Iterator[tuple[str, float, float | None]]:
    """``(name, skipped, steps | None)`` for each positive ``<name>_skipped`` in ``row`` and in its
    dict-valued entries (e.g. a compressor's statistics)."""
    for d in [row] + [v for v in row.values() if isinstance(v, dict)]:
        for key, value in d.items():
            if key.endswith("_skipped") and isinstance(value, (int, float)) and value > 0:
                name = key[:-len("_skipped")]
                steps = d.get(f"{name}_steps")
                yield name, value, steps if isinstance(steps, (int, float)) else None
