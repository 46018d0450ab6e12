"""Mnemonics Training recipes (Liu et al., CVPR 2020): a base method whose exemplars are optimised
by the bilevel exemplar optimizer ``mnemonics`` (``cilearn.memory.mnemonics``). The component
composes with any method that keeps exemplars (``--memory.optimizer mnemonics``); these recipes are
the paper's two strongest combinations (Tables 1-2: iCaRL and LUCIR with mnemonics exemplars), on
the LUCIR code base's schedule as the paper (``schedules.MNEMONICS``)."""
from __future__ import annotations

from dataclasses import replace

from . import schedules
from .baselines import ICARL
from .lucir import LUCIR
from .recipe import register_recipe

MNEMONICS_PAPER = "Liu et al., *Mnemonics Training: Multi-Class Incremental Learning without Forgetting*, CVPR 2020"

ICARL_MNEMONICS = register_recipe(replace(
    ICARL, name="icarl-mnemonics", optimizer="mnemonics", training=schedules.MNEMONICS,
    summary="`icarl` with Mnemonics exemplars (`--memory.optimizer mnemonics`)", paper=MNEMONICS_PAPER))

LUCIR_MNEMONICS = register_recipe(replace(
    LUCIR, name="lucir-mnemonics", optimizer="mnemonics", training=schedules.MNEMONICS,
    summary="`lucir` with Mnemonics exemplars", paper="Liu et al., CVPR 2020"))
