"""cilearn: class-incremental learning in PyTorch. ``cilearn.run(config) -> Results``."""
__version__ = "0.1.0"

from .config import RunConfig  # noqa: E402
from .errors import CilearnError, ConfigError, DataError  # noqa: E402
from .runner import Results, resume, run  # noqa: E402

__all__ = ["RunConfig", "Results", "run", "resume", "CilearnError", "ConfigError", "DataError", "__version__"]
