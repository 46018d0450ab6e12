"""BiC: Large Scale Incremental Learning (Wu, Chen, Wang, Ye, Liu, Guo & Fu, CVPR 2019)."""
from __future__ import annotations

from . import schedules
from .base import METHODS
from .wa import WA


@METHODS.register("bic")
class BiC(WA):
    """Exemplars (herding) and the paper's first stage, ``(1 - lambda) CE + lambda KD(T = 2)`` on the
    old logits with ``lambda = |old| / |seen|`` (Sec. 4.1; the same weighting WA takes from it), on
    the phase's data and exemplars minus a held-out validation split; then the bias correction
    (``--calibration bic``, ``cilearn.calibration.BiC``: an affine layer on the new classes' logits
    trained on the split, the model frozen), whose corrected logits the evaluation and the next
    phase's teacher use. No weight clipping or aligning (WA's). Reports CNN and NME."""
    calibration = ("bic",)
    head_components = ()
    training = schedules.BIC
