from .base import METHODS, Method  # noqa: F401
from . import baselines, bic, der, foster, lucir, lwm, mnemonics, podnet, wa  # noqa: F401  (register the recipes)
from .. import terms  # noqa: F401  (register the loss-term components)
