"""The errors the command line reports as ``sam-optax: error: ...``.

Usage, data and run-directory errors exit with code 2, a diverged run with 3,
a run stopped by Ctrl-C with 130 (128 + SIGINT, the shell's convention).
"""


class UsageError(ValueError):
    """A flag or setting is invalid (the message names it and what is expected)."""


class DataError(Exception):
    """A dataset file is missing, truncated or corrupt (the message names it)."""


class RunDirError(Exception):
    """The run directory cannot be used as asked (exists, or is missing for --resume)."""


class TrainingDiverged(Exception):
    """The training loss became NaN or infinite; the last good checkpoint is kept."""


class Interrupted(Exception):
    """The run was asked to stop (Ctrl-C) and stopped between two steps.

    The message says at which step and where the last checkpoint is (intact:
    a checkpoint being written is finished first); ``resume`` is the command
    that continues the run, when the caller knows it.
    """

    def __init__(self, message: str, resume: str | None = None):
        super().__init__(message)
        self.resume = resume
