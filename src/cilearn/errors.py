"""Errors a user can fix. The CLI prints them as one line and exits with code 2."""


class CilearnError(Exception):
    """Base class: bad input the user can fix (never a bug in cilearn)."""


class ConfigError(CilearnError):
    """An option or config value is invalid; the message names the option."""


class DataError(CilearnError):
    """A data set file or folder is missing, corrupt or in the wrong layout; the message names it."""
