"""WA: Maintaining Discrimination and Fairness in Class Incremental Learning (Zhao et al., CVPR 2020)."""
from __future__ import annotations

from . import schedules
from .base import METHODS
from .baselines import ICaRL


@METHODS.register("wa")
class WA(ICaRL):
    """Knowledge distillation + weight aligning. Training as iCaRL's CE + KD on data + exemplars
    (herding), with the weighting the paper takes from BiC: ``(1 - lambda) CE + lambda KD(T = 2)``
    on the old logits, ``lambda = |old| / |seen|`` (Sec. 3; checked against the paper's text as
    quoted in public notes; T = 2 is PyCIL's value, the paper's could not be checked here;
    ``--loss.temperature``). ``--loss.kd-weight L`` replaces it by
    ``CE + L KD``). After the training of each phase > 0, weight aligning
    (the ``weight-align`` component, ``cilearn.calibration``) rescales the new classes' head rows to the old
    rows' mean norm; weight clipping keeps the head weights non-negative after every optimizer
    step, in all phases (Sec. 3.3; ``--train.weight-clip false`` turns it off,
    ``--train.weight-align false`` turns aligning off). Reports CNN and NME."""
    calibration = ("weight-align",)
    head_components = ("weight-clip",)
    adaptive_kd_weight = True      # --loss.kd-weight unset (null in config.yaml): lambda = |old| / |seen|
    training = schedules.WA
