"""The errors the command line reports as ``sam-optax: error: ...``.

Usage, data, run-directory and settings-file errors exit with code 2, a
diverged run with 3, a run stopped by Ctrl-C with 130 and one stopped by
SIGTERM with 143 (128 + the signal's number, the shell's convention).
"""

import signal


class UsageError(ValueError):
    """A flag or setting is invalid (the message names it and what is expected)."""


class DataError(Exception):
    """A dataset file is missing, truncated or corrupt (the message names it)."""


class ConfigFileError(Exception):
    """A saved settings file (``config.json``, ``compare.json``) cannot be used: the message
    names the file, the field and what was expected."""


class RunDirError(Exception):
    """The run directory cannot be used as asked (exists, or is missing for --resume)."""


class TrainingDiverged(Exception):
    """The training loss became NaN or infinite; the last good checkpoint is kept.

    ``retry``, when the caller knows it, is a command that starts the run
    again with a lower learning rate.
    """

    def __init__(self, message: str, retry: str | None = None):
        super().__init__(message)
        self.retry = retry


class Interrupted(Exception):
    """The run was asked to stop (Ctrl-C, SIGTERM) and stopped between two steps.

    The message says at which step and where its checkpoint is (written at
    the stop; a checkpoint being written is finished first); ``resume`` is
    the command that continues the run, when the caller knows it;
    ``signum`` the signal that stopped it (the exit code is 128 + it).
    """

    def __init__(self, message: str, resume: str | None = None, signum: int = signal.SIGINT):
        super().__init__(message)
        self.resume = resume
        self.signum = int(signum)
