"""Mnemonics Training recipes (Liu et al., CVPR 2020): a base method whose exemplars are
optimised by the bilevel exemplar optimizer ``mnemonics`` (``cilearn.memory.mnemonics``). The
component composes with any method that keeps exemplars (``--memory.optimizer mnemonics``);
these recipes are the paper's two strongest combinations (Tables 1-2: iCaRL and LUCIR with
mnemonics exemplars)."""
from __future__ import annotations

from . import schedules
from .base import METHODS
from .baselines import ICaRL
from .lucir import LUCIR


@METHODS.register("icarl-mnemonics")
class ICaRLMnemonics(ICaRL):
    """``icarl`` (CE + KD, herding, NME) with mnemonics exemplars, on the LUCIR code base's schedule
    as the paper (``schedules.MNEMONICS``)."""
    memory_optimizer = "mnemonics"
    training = schedules.MNEMONICS


@METHODS.register("lucir-mnemonics")
class LUCIRMnemonics(LUCIR):
    """``lucir`` (cosine head, less-forget, margin ranking, class-balanced fine-tuning) with
    mnemonics exemplars."""
    memory_optimizer = "mnemonics"
    training = schedules.MNEMONICS
