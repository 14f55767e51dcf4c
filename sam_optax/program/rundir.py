"""The run directory: its files, written safely, and its checkpoints.

::

    config.json       the resolved Config of the run
    label_noise.json  the flipped training indices (seeded, recorded)
    metrics.jsonl     one line per epoch (strict JSON: a non-finite number is null)
    checkpoints/      orbax checkpoints keyed by the number of steps done (the last two)
    summary.json      written when the run completes
    .lock             while a process works in the directory (deleted when it ends)

Every JSON file is written whole to a temporary file and renamed into place,
so a run killed at any moment leaves either the old or the new file, never a
torn one; it gets the permissions of any new file (the umask's). With several processes (``jax.distributed``) only process 0 writes
files; every process takes part in a checkpoint (orbax coordinates them).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import sys
from pathlib import Path
from typing import Any

import jax

from sam_optax.program.configs import Config
from sam_optax.program.configs import read_config
from sam_optax.program.errors import RunDirError


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def to_json(value: Any, indent: int | None = None) -> str:
    """Strict JSON (``allow_nan=False``): NaN and infinities become ``null``."""
    return json.dumps(_finite_or_none(value), indent=indent, allow_nan=False)


def write_atomic(path: Path, text: str) -> None:
    """Writes ``text`` to a temporary file beside ``path``, then renames it over ``path``.

    The file gets the permissions of any new file (``0o666`` less the umask),
    as ``open(path, 'w')`` would give it.
    """
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def agree_on_failure(failed: bool) -> bool:
    """Whether any process failed (all processes learn it; no-op with one)."""
    if jax.process_count() == 1:
        return failed
    import numpy as np
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.asarray(failed, np.int32))
    return bool(np.any(flags))


LOCK_FILE = ".lock"


def lock_directory(path: Path) -> Any:
    """An exclusive lock on ``path/.lock`` (filelock), or ``RunDirError`` if another process holds it.

    :meth:`RunDir.release` deletes the file while still holding the lock, then
    releases it: a process that opened the old file and takes its lock then
    holds the lock of a deleted file, which filelock (4.x) detects and retries
    on a new one.
    """
    from filelock import FileLock
    from filelock import Timeout

    lock = FileLock(str(path / LOCK_FILE))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise RunDirError(
            f"--out {path} is in use by another sam-optax process (it holds {path / LOCK_FILE}); "
            "wait for it to finish, or choose another --out."
        ) from None
    return lock


def check_out_path(path: Path) -> None:
    """Refuses an ``--out`` that cannot be a directory (a file, under a file, not writable).

    Before any work: the message names the path, what is in the way, and the fix.
    """
    if path.exists():
        if not path.is_dir():
            raise RunDirError(
                f"--out {path} is a file, not a directory; choose another --out (a new folder)."
            )
        if not os.access(path, os.W_OK | os.X_OK):
            raise RunDirError(f"--out {path}: the directory is not writable; choose another --out.")
        return
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise RunDirError(
            f"--out {path} cannot be created: {parent} is a file, not a directory; "
            "choose another --out."
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RunDirError(
            f"--out {path} cannot be created: {parent} is not writable; choose another --out."
        )


def make_out_directory(path: Path) -> None:
    """Creates ``--out`` (and its parents); a refusal of the system comes back naming the path.

    ``os.access`` answers yes to root on a read-only mount or ``/proc``, so
    :func:`check_out_path` cannot see every such place beforehand.
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RunDirError(
            f"--out {path} cannot be created ({error.strerror or error}); choose another --out "
            "(a folder you can write)."
        ) from None


def clear_for_overwrite(path: Path, marker: str) -> None:
    """``--overwrite``: deletes what ``path`` holds, when it is a directory of sam-optax.

    Only a directory holding ``marker`` (``config.json`` of a run,
    ``compare.json`` of a comparison) is emptied, and only while no other
    process holds the lock of one of its runs (a run's own lock is the
    caller's to take first); anything else is refused and nothing deleted.
    ``path/.lock`` itself is kept.
    """
    if not path.is_dir() or all(entry.name == LOCK_FILE for entry in path.iterdir()):
        return  # new (or holding only the lock the caller just took): nothing to clear
    if not (path / marker).is_file():
        raise RunDirError(
            f"--overwrite: {path} holds no {marker}, so it is no sam-optax "
            f"{'run' if marker == 'config.json' else 'comparison'} directory; nothing was "
            "deleted. Choose another --out."
        )
    for lock_file in path.glob(f"runs/*/{LOCK_FILE}"):
        lock_directory(lock_file.parent).release()  # raises while another process holds it
    for entry in path.iterdir():
        if entry.name == LOCK_FILE:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def is_writer() -> bool:
    """Whether this process writes the run's files (process 0)."""
    return jax.process_index() == 0


class RunDir:
    """The files of one run directory (see the module docstring)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config_file = self.path / "config.json"
        self.metrics_file = self.path / "metrics.jsonl"
        self.summary_file = self.path / "summary.json"
        self.noise_file = self.path / "label_noise.json"
        self.checkpoints = (self.path / "checkpoints").absolute()

    def prepare(self, config: Config, resume: bool, overwrite: bool = False) -> None:
        """Creates the directory, or checks it for ``resume``; never overwrites silently
        (``overwrite`` empties a run directory first: :func:`clear_for_overwrite`).

        Process 0 takes the directory's lock (``.lock``, held until
        :meth:`release`): a second process on the same ``--out`` is refused
        with a clear message. With several processes, the others wait for
        process 0 and learn whether it succeeded.
        """
        error = None
        try:
            if is_writer():
                self._prepare_as_writer(config, resume, overwrite)
            elif resume:
                self._check_resumable(config)
        except RunDirError as err:
            error = err
        if agree_on_failure(error is not None) and error is None:
            error = RunDirError(f"process 0 could not prepare --out {self.path} (see its message).")
        if error is not None:
            self.release()
            raise error

    def _prepare_as_writer(self, config: Config, resume: bool, overwrite: bool) -> None:
        check_out_path(self.path)
        if not (resume or overwrite) and self.path.exists() and any(self.path.iterdir()):
            raise RunDirError(
                f"--out {self.path} already exists and is not empty; pass --resume "
                "to continue that run (with its own settings), --overwrite to replace it "
                "(its files are deleted), or choose another --out."
            )
        if resume and not self.config_file.is_file():
            raise RunDirError(f"--resume: {self.path} holds no run to resume (no config.json).")
        make_out_directory(self.path)
        self._lock = lock_directory(self.path)
        if overwrite:
            clear_for_overwrite(self.path, self.config_file.name)
        if resume:
            self._check_resumable(config)
        else:
            self.write_json(self.config_file, config.to_dict())

    def release(self) -> None:
        """Releases the directory's lock (if this process holds it) and deletes ``.lock``."""
        lock = getattr(self, "_lock", None)
        if lock is not None:
            (self.path / LOCK_FILE).unlink(missing_ok=True)
            lock.release()
            self._lock = None

    def saved_config(self) -> Config:
        """The settings the run was started with (its ``config.json``), for ``--resume``."""
        if not self.config_file.is_file():
            raise RunDirError(f"--resume: {self.path} holds no run to resume (no config.json).")
        return read_config(
            self.config_file,
            "Repair it (nothing else in the directory was changed), or start a new run in "
            "another --out.",
        )

    def _check_resumable(self, config: Config) -> None:
        saved = self.saved_config().to_dict()
        current = config.to_dict()
        diff = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
        if diff:
            changes = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
            raise RunDirError(
                f"--resume: the settings differ from the run in {self.path} ({changes})."
            )

    def write_json(self, path: Path, value: Any) -> None:
        if is_writer():
            write_atomic(path, to_json(value, indent=2) + "\n")

    def read_metrics(self, up_to_epoch: int) -> list[dict[str, Any]]:
        """The metrics rows of epochs ``<= up_to_epoch`` (later ones were not checkpointed)."""
        if not self.metrics_file.is_file():
            return []
        rows = [json.loads(line) for line in self.metrics_file.read_text().splitlines() if line]
        return [r for r in rows if r["epoch"] <= up_to_epoch]

    def write_metrics(self, rows: list[dict[str, Any]]) -> None:
        """Rewrites ``metrics.jsonl`` whole (atomically) with ``rows``."""
        if is_writer():
            write_atomic(self.metrics_file, "".join(to_json(r) + "\n" for r in rows))


class Checkpoints:
    """Orbax checkpoints of the training state, keyed by the number of steps done.

    Orbax writes each checkpoint to a temporary folder and renames it when
    complete, so a run killed while writing leaves the previous ones intact.
    """

    def __init__(self, directory: Path, max_to_keep: int = 2):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = directory
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
        self.manager = ocp.CheckpointManager(directory, options=options)

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any) -> None:
        self.manager.save(step, args=self._ocp.args.StandardSave(state))

    def restore(self, step: int, like: Any) -> Any:
        template = jax.tree.map(self._ocp.utils.to_shape_dtype_struct, like)
        return self.manager.restore(step, args=self._ocp.args.StandardRestore(template))

    def restore_latest(self, like: Any) -> tuple[int, Any] | None:
        """The newest checkpoint that reads back whole: ``(step, state)``, or ``None``.

        A checkpoint that fails to read (truncated, corrupted) is reported by
        path on stderr, deleted, and the one before it tried.
        """
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                return step, self.restore(step, like)
            except Exception as err:  # orbax and tensorstore raise many kinds
                path = self.directory / str(step)
                print(
                    f"sam-optax: checkpoint {path} is unreadable ({type(err).__name__}: "
                    f"{str(err).splitlines()[0][:200]}); it is deleted and the previous one used.",
                    file=sys.stderr,
                )
                if is_writer():
                    self.manager.delete(step)
        return None

    def wait(self) -> None:
        """Waits until the checkpoint being written (asynchronously) is complete."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.wait()
        self.manager.close()


def restore_final(workdir: str | Path) -> dict[str, Any]:
    """The last checkpoint of a run (params, batch_stats, opt_state, ...) as host arrays.

    One that does not read back (truncated, corrupt) is reported on stderr and
    the one before it used; nothing is deleted (``train --resume`` does that).

    Restored onto this process's first device whatever topology wrote it (a
    multi-host run's checkpoint reads back on a laptop).
    """
    import orbax.checkpoint as ocp

    directory = RunDir(workdir).checkpoints
    manager = ocp.CheckpointManager(directory, item_handlers=ocp.StandardCheckpointHandler())
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    try:
        steps = sorted(manager.all_steps(), reverse=True)
        if not steps:
            raise RunDirError(f"{workdir} has no checkpoint.")
        for step in steps:  # the newest that reads back whole; nothing is deleted here
            try:
                template = jax.tree.map(
                    lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                    manager.item_metadata(step),
                    is_leaf=lambda m: hasattr(m, "shape"),
                )
                return jax.device_get(
                    manager.restore(step, args=ocp.args.StandardRestore(template))
                )
            except Exception as err:  # orbax and tensorstore raise many kinds
                print(
                    f"sam-optax: checkpoint {directory / str(step)} is unreadable "
                    f"({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}); "
                    "the previous one is used.",
                    file=sys.stderr,
                )
        raise RunDirError(
            f"{workdir}: none of its checkpoints ({', '.join(map(str, steps))}) reads back "
            "(the errors above; nothing was changed). If they are corrupt, the run must be "
            "trained again; if the errors name the environment (orbax's version, memory), "
            "fix that and analyze again."
        )
    finally:
        manager.close()
