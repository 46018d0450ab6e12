"""cilearn: class-incremental learning in PyTorch. ``cilearn.run(config) -> Results``;
``run_seeds``, ``compare_methods`` / ``compare_dirs`` and ``html_report`` for several runs."""
__version__ = "0.1.0"

from .threads import sleep_when_waiting  # noqa: E402

sleep_when_waiting()          # before torch loads OpenMP (cilearn.threads)

from .config import RunConfig  # noqa: E402
from .errors import CilearnError, ConfigError, DataError, ResultsError  # noqa: E402
from .api import compare_methods, resume, run, run_seeds  # noqa: E402
from .report import compare_dirs, html_report  # noqa: E402
from .results import load_run  # noqa: E402
from .runner import Results  # noqa: E402

__all__ = ["RunConfig", "Results", "run", "resume", "run_seeds", "compare_methods", "compare_dirs", "load_run",
           "html_report", "CilearnError", "ConfigError", "DataError", "ResultsError", "__version__"]
