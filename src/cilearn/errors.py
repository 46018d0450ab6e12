"""Errors a user can fix. The CLI prints them as one line and exits with code 2."""


class CilearnError(Exception):
    """Base class: bad input the user can fix (never a bug in cilearn)."""


class ConfigError(CilearnError):
    """An option or config value is invalid; the message names the option."""


class ResultsError(CilearnError):
    """A run directory given to ``compare`` / ``report`` is missing, unfinished or corrupt; the
    message names the file."""


class DataError(CilearnError):
    """A data set file or folder is missing, corrupt or in the wrong layout; the message names it."""


def one_line(e: BaseException) -> str:
    """An exception's message folded onto one line (for the one-line errors of the CLI)."""
    return " ".join((str(e) or type(e).__name__).split())
