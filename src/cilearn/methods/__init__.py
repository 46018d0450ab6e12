from .base import METHODS, Context, Method, SplitData  # noqa: F401
from . import baselines  # noqa: F401  (registers the baselines)
