from .base import METHODS, Method  # noqa: F401
from . import baselines, bic, der, foster, lucir, lwm, mnemonics, podnet, wa  # noqa: F401  (register the recipes)
from .. import head_parts, replay, terms  # noqa: F401  (register the head, replay and loss-term components)
from ..memory import compress  # noqa: F401  (registers the artifacts component)
