from .base import METHODS, Method  # noqa: F401
from . import baselines, bic, der, foster, lucir, lwm, mnemonics, podnet, wa  # noqa: F401  (register the recipes)
from .. import replay, terms  # noqa: F401  (register the replay and loss-term components)
