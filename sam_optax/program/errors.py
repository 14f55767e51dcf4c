"""The errors the command line reports as ``sam-optax: error: ...``.

Usage, data and run-directory errors exit with code 2, a diverged run with 3.
"""


class UsageError(ValueError):
    """A flag or setting is invalid (the message names it and what is expected)."""


class DataError(Exception):
    """A dataset file is missing, truncated or corrupt (the message names it)."""


class RunDirError(Exception):
    """The run directory cannot be used as asked (exists, or is missing for --resume)."""


class TrainingDiverged(Exception):
    """The training loss became NaN or infinite; the last good checkpoint is kept."""
