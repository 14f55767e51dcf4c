"""The errors the command line reports as ``sam-optax: error: ...`` (exit code 2)."""


class UsageError(ValueError):
    """A flag or setting is invalid (the message names it and what is expected)."""


class DataError(Exception):
    """A dataset file is missing, truncated or corrupt (the message names it)."""


class RunDirError(Exception):
    """The run directory cannot be used as asked (exists, or is missing for --resume)."""
