"""One training run: ``train_and_evaluate(config, workdir, options)``.

SGD (momentum, optional Nesterov), cosine learning rate, weight decay
(decoupled, or as the paper's code has it, an L2 term in the loss), optional
clipping of the averaged gradient, label smoothing, on-device augmentation,
data parallel over all local devices with per-device perturbations
(``sam_optax.parallel.shard_map_step``), one evaluation per epoch, metrics
appended as JSON lines, orbax checkpoints at each epoch's end and every
``checkpoint_every`` steps, and ``resume`` that ends with the same
parameters as an uninterrupted run (data order and step keys are functions of
the seed, the epoch and the step, never of the process). The training state
is passed from step to step; nothing is mutated in place. A loss that becomes
NaN or infinite stops the run (:class:`TrainingDiverged`) before anything
after the last good checkpoint is saved; a stop asked for (Ctrl-C or SIGTERM
on the command line) stops it between two steps with a checkpoint of that
step (:class:`Interrupted`), so that ``resume`` goes on from exactly there.
With several processes (``jax.distributed``) the processes stop at the same
step: jax's preemption service takes SIGTERM and
:func:`jax.experimental.multihost_utils.reached_preemption_sync_point`,
asked before every step, names the step. The files are described in
:mod:`sam_optax.program.rundir`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sam_optax.program import configs
from sam_optax.program import models
from sam_optax.program.errors import Interrupted
from sam_optax.program.errors import TrainingDiverged
from sam_optax.program.rundir import Checkpoints
from sam_optax.program.rundir import RunDir
from sam_optax.program.rundir import is_writer
from sam_optax.program.trainer import Trainer
from sam_optax.program.trainer import build_trainer

METRICS = ("loss", "accuracy")


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How a run is carried out: nothing its result depends on (that is the Config).

    Attributes:
      resume: continue the run in ``workdir`` from its last checkpoint.
      progress: show a progress bar (the command line shows one on a terminal only).
      checkpoint_every: also checkpoint every this many steps within an epoch.
      description: the progress bar's label (and the prefix of the epoch lines).
      stop: once set (the command line sets it on Ctrl-C and SIGTERM), the run
        checkpoints the step it is at and raises
        :class:`~sam_optax.program.errors.Interrupted` before its next step
        (its ``signum`` attribute, when it has one, says which signal; with
        several processes the stop comes from jax's preemption service).
      overwrite: empty ``workdir`` first if it holds a run (``--overwrite``).
      epoch_lines: print one line per epoch on stdout (the command line does
        when no progress bar shows on a terminal).
    """

    resume: bool = False
    progress: bool = False
    checkpoint_every: int | None = None
    description: str | None = None
    stop: threading.Event | None = None
    overwrite: bool = False
    epoch_lines: bool = False


def epoch_order(seed: int, epoch: int, n: int, batch_size: int) -> np.ndarray:
    """The batches of an epoch: a permutation seeded by (seed, epoch), last partial batch dropped."""
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    steps = n // batch_size
    return perm[: steps * batch_size].reshape(steps, batch_size)


# --------------------------------------------------------------------------
# Per-epoch bookkeeping.
# --------------------------------------------------------------------------


DIAGNOSTICS = ("sharpness", "perturbed_loss", "grad_norm", "cosine", "sam_step")


class Meter:
    """An epoch's per-step scalars, summed on the host in step order.

    Steps hand in device arrays (no host sync); :meth:`flush` brings the
    pending ones over at checkpoints and at the epoch's end, adds them in
    order (so a resumed epoch sums exactly as an uninterrupted one) and
    returns the index of the first step whose loss is not finite. A NaN
    diagnostic means "not measured at that step" and is left out of its mean.
    """

    KEYS = (*METRICS, *DIAGNOSTICS)

    def __init__(self, sums: dict[str, float] | None = None, counts: dict[str, int] | None = None):
        self.sums = dict(sums) if sums else dict.fromkeys(self.KEYS, 0.0)
        self.counts = dict(counts) if counts else dict.fromkeys(self.KEYS, 0)
        self.pending: list[dict[str, jax.Array]] = []

    def add(self, scalars: dict[str, jax.Array]) -> None:
        self.pending.append(scalars)

    def flush(self) -> int | None:
        bad, done = None, self.counts["loss"]
        for i, row in enumerate(jax.device_get(self.pending)):
            if bad is None and not math.isfinite(float(row["loss"])):
                bad = done + i
            for k in self.KEYS:
                value = float(row[k])
                if math.isfinite(value) or k in METRICS:
                    self.sums[k] += value
                    self.counts[k] += 1
        self.pending = []
        return bad

    def means(self) -> dict[str, float]:
        return {k: self.sums[k] / self.counts[k] if self.counts[k] else math.nan for k in self.KEYS}

    def state(self) -> dict[str, Any]:
        return {
            "sums": {k: np.asarray(v, np.float64) for k, v in self.sums.items()},
            "counts": {k: np.asarray(v, np.int64) for k, v in self.counts.items()},
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Meter:
        return cls(
            {k: float(v) for k, v in state["sums"].items()},
            {k: int(v) for k, v in state["counts"].items()},
        )


def step_scalars(aux_metrics: dict[str, jax.Array], opt_state: Any) -> dict[str, jax.Array]:
    """The per-step scalars: the clean pass's metrics and the method's diagnostics.

    The diagnostics are copied out of the state (one small dispatch): the next
    step donates the state, and XLA may reuse their buffers for its own.
    """
    diagnostics = {k: optax.tree.get(opt_state, k) for k in DIAGNOSTICS}
    return {**aux_metrics, **_copied(diagnostics)}


_copied = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))


# --------------------------------------------------------------------------
# The run.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Run:
    """What a run works with: the compiled setup, its directory, its checkpoints, its options."""

    trainer: Trainer
    rundir: RunDir
    checkpoints: Checkpoints
    options: RunOptions


class _Stopped(Exception):
    """Raised between two steps when a stop was asked for: ``steps`` were done, ``signum``
    is the signal that asked (``None``: another process's, through jax's preemption
    service), ``checkpointed`` whether a checkpoint of that step exists."""

    def __init__(self, steps: int, signum: int | None, checkpointed: bool):
        super().__init__(steps)
        self.steps, self.signum, self.checkpointed = steps, signum, checkpointed


def _stop_signal(options: RunOptions, global_step: int) -> int | None:
    """The signal that asks the run to stop before ``global_step`` (``None``: go on; 0: a
    stop that another process received).

    One process: ``options.stop``. Under ``jax.distributed``, every process
    must stop at the same step (a checkpoint is collective), so only jax's
    preemption service decides: it takes SIGTERM (the command line forwards
    Ctrl-C to it) and names the same step to every process.
    """
    local = options.stop is not None and options.stop.is_set()
    signum = getattr(options.stop, "signum", signal.SIGINT) if local else 0
    if not jax.distributed.is_initialized():
        return signum if local else None
    if not jax.config.jax_enable_preemption_service:
        return None  # no service to agree on a step: no stop (docs/guide/program.md)
    from jax.experimental import multihost_utils

    return signum if multihost_utils.reached_preemption_sync_point(global_step) else None


def _checkpoint_stop(
    run: _Run, state: dict[str, Any], meter: Meter, epoch: int, steps: int, wall: float
) -> bool:
    """Checkpoints the state after ``steps`` steps, unless it is already (or no step was done);
    a non-finite loss since the last checkpoint raises :class:`TrainingDiverged` instead."""
    if steps == 0:
        return False
    if steps != run.checkpoints.latest():
        _guard_finite(run, meter, epoch)
        run.checkpoints.save(steps, _checkpoint_state(state, meter, wall))
    return True


def _setup(config: configs.Config, workdir: str | Path, options: RunOptions) -> _Run:
    trainer = build_trainer(config)
    rundir = RunDir(workdir)
    rundir.prepare(config, options.resume, options.overwrite)
    if trainer.flipped is not None and not rundir.noise_file.is_file():
        noise = {"rate": config.label_noise, "flipped": trainer.flipped.tolist()}
        rundir.write_json(rundir.noise_file, noise)
    return _Run(trainer, rundir, Checkpoints(rundir.checkpoints), options)


def _checkpoint_state(state: dict[str, Any], meter: Meter, wall: float) -> dict[str, Any]:
    return {**state, "meter": meter.state(), "wall_seconds": np.asarray(wall, np.float64)}


def _restore(run: _Run) -> tuple[int, dict[str, Any], Meter, float]:
    """The latest checkpoint: ``(steps done, state, meter, wall seconds)`` (or the start)."""
    initial = run.trainer.initial_state
    found = run.checkpoints.restore_latest(_checkpoint_state(initial, Meter(), 0.0))
    if found is None:
        return 0, initial, Meter(), 0.0
    latest, restored = found
    state = {k: restored[k] for k in initial}
    return latest, state, Meter.from_state(restored["meter"]), float(restored["wall_seconds"])


def _guard_finite(run: _Run, meter: Meter, epoch: int) -> None:
    """Raises :class:`TrainingDiverged` when a loss since the last flush is not finite."""
    bad = meter.flush()
    if bad is None:
        return
    steps = run.trainer.steps_per_epoch
    global_step = (epoch - 1) * steps + bad
    latest = run.checkpoints.latest()
    kept = (
        f"the last good checkpoint ({latest} steps) is kept in {run.rundir.checkpoints}"
        if latest is not None
        else "no checkpoint had been written yet"
    )
    raise TrainingDiverged(
        f"the training loss became non-finite at epoch {epoch}, step {bad + 1} of "
        f"{steps} (global step {global_step + 1}, learning rate "
        f"{float(run.trainer.schedule(global_step)):.3g}); the run stopped and {kept}. "
        "Lower --lr (or set --clip-norm) and start a new run."
    )


def _train_steps(
    run: _Run,
    state: dict[str, Any],
    epoch: int,
    start: int,
    meter: Meter,
    clock: Callable[[], float],
    bar: Any,
) -> dict[str, Any]:
    """Runs the steps ``start..`` of ``epoch`` from ``state``; returns the state after them."""
    trainer, options = run.trainer, run.options
    base_key = jax.random.key(trainer.config.seed + 1)
    order = epoch_order(
        trainer.config.seed, epoch, len(trainer.dataset.x_train), trainer.config.batch_size
    )
    previous = _previous_batches(trainer, epoch, order)
    for i in range(start, trainer.steps_per_epoch):
        global_step = (epoch - 1) * trainer.steps_per_epoch + i
        signum = _stop_signal(options, global_step)
        if signum is not None:
            saved = _checkpoint_stop(run, state, meter, epoch, global_step, clock())
            raise _Stopped(global_step, signum or None, saved)
        params, opt_state, _, (batch_stats, scalars) = trainer.step(
            state["params"],
            state["opt_state"],
            trainer.batch(order[i]),
            state["batch_stats"],
            rng=jax.random.fold_in(base_key, global_step),
            **({} if previous is None else {"previous_batch": trainer.batch(previous(i))}),
        )
        state = {"params": params, "batch_stats": batch_stats, "opt_state": opt_state}
        meter.add(step_scalars(scalars, opt_state))
        if bar is not None:
            bar.update(1)
            if i % 10 == 0:
                bar.set_postfix(epoch=epoch, loss=f"{float(scalars['loss']):.3f}")
        done = global_step + 1
        every = options.checkpoint_every
        if every and done % every == 0 and i + 1 < trainer.steps_per_epoch:
            _guard_finite(run, meter, epoch)
            run.checkpoints.save(done, _checkpoint_state(state, meter, clock()))
    return state


def _previous_batches(trainer: Any, epoch: int, order: Any) -> Callable[[int], Any] | None:
    """``i -> the indices of the batch before step i`` for a method that takes it (SAMPa).

    The data order is a function of the seed and the epoch, so a resumed run
    finds the same batch: step i - 1's, the previous epoch's last for the
    first step of an epoch, and the step's own batch at the very first step.
    """
    config = trainer.config
    if config.rho == 0 or not configs.METHODS[config.method].previous_batch:
        return None
    size, n = config.batch_size, len(trainer.dataset.x_train)
    last = epoch_order(config.seed, epoch - 1, n, size)[-1] if epoch > 1 else order[0]

    def previous(i: int) -> Any:
        return order[i - 1] if i > 0 else last

    return previous


def _end_epoch(
    run: _Run, state: dict[str, Any], epoch: int, meter: Meter, epoch_seconds: float, wall: float
) -> dict[str, Any]:
    """Evaluates and returns the epoch's metrics row (the meter already flushed)."""
    trainer = run.trainer
    test_loss, test_accuracy = trainer.evaluate(
        state["params"], state["batch_stats"], trainer.dataset.x_test, trainer.dataset.y_test
    )
    train = meter.means()
    steps = epoch * trainer.steps_per_epoch
    return {
        "epoch": epoch,
        "step": steps,
        "lr": float(trainer.schedule(steps - 1)),
        "train_loss": train["loss"],
        "train_accuracy": train["accuracy"],
        "test_loss": test_loss,
        "test_accuracy": test_accuracy,
        "epoch_seconds": epoch_seconds,
        "wall_seconds": wall,
        **{k: train[k] for k in DIAGNOSTICS if k != "sam_step"},
        "sam_fraction": train["sam_step"],
        "gradients_per_step": gradients_per_step(trainer.config, train["sam_step"]),
    }


def gradients_per_step(config: configs.Config, sam_fraction: float) -> float:
    """Gradient evaluations per step: 1 + the fraction of SAM steps, for the methods whose
    SAM steps take a second gradient (1 for SGD and MSAM)."""
    if config.optimizer == "sgd" or not configs.METHODS[config.method].second_gradient:
        return 1.0
    return 1.0 + sam_fraction


def train_and_evaluate(
    config: configs.Config, workdir: str | Path, options: RunOptions | None = None
) -> dict[str, Any]:
    """Trains, evaluates each epoch, checkpoints, and returns the run's summary."""
    run = _setup(config, workdir, options or RunOptions())
    try:
        return _train(run)
    except _Stopped as stopped:
        run.checkpoints.wait()
        message = _stopped_message(run, stopped)
        raise Interrupted(message, signum=stopped.signum or signal.SIGTERM) from None
    finally:
        run.checkpoints.close()
        run.rundir.release()


SIGNAL_NAMES = {signal.SIGINT: "Ctrl-C (SIGINT)", signal.SIGTERM: "SIGTERM"}
if hasattr(signal, "SIGPIPE"):  # not on Windows
    SIGNAL_NAMES[signal.SIGPIPE] = "a closed stdout (its reader, e.g. `| head`, ended)"


def _stopped_message(run: _Run, stopped: _Stopped) -> str:
    config, per_epoch = run.trainer.config, run.trainer.steps_per_epoch
    steps = stopped.steps
    kept = (
        f"its checkpoint (step {steps}) is in {run.rundir.checkpoints}"
        if stopped.checkpointed
        else "no step had been done, nothing to checkpoint"
    )
    if stopped.signum is None:
        by = "a preemption notice (SIGTERM or Ctrl-C to a process of the run, through jax)"
    else:
        by = SIGNAL_NAMES.get(stopped.signum, signal.Signals(stopped.signum).name)
    return (
        f"stopped by {by} at step {steps} of {per_epoch * config.epochs} "
        f"(epoch {steps // per_epoch + 1} of {config.epochs}); {kept}."
    )


def _position(run: _Run, done: int) -> str:
    per_epoch, epochs = run.trainer.steps_per_epoch, run.trainer.config.epochs
    if done >= per_epoch * epochs:
        return f"step {done} of {done}: the run had finished"
    epoch, step = divmod(done, per_epoch)
    return f"step {done} of {per_epoch * epochs} (epoch {epoch + 1}, step {step} of {per_epoch})"


def _train(run: _Run) -> dict[str, Any]:
    trainer, options = run.trainer, run.options
    if options.resume:
        done, state, meter, wall_before = _restore(run)
        if is_writer():
            print(f"resuming {run.rundir.path} at {_position(run, done)}", flush=True)
    else:
        done, state, meter, wall_before = 0, trainer.initial_state, Meter(), 0.0
    per_epoch = trainer.steps_per_epoch
    start_epoch, start_step = done // per_epoch + 1, done % per_epoch
    history = run.rundir.read_metrics(start_epoch - 1)
    run.rundir.write_metrics(history)
    bar = _progress_bar(per_epoch * trainer.config.epochs, done, options)
    start = time.perf_counter()

    def clock() -> float:
        return wall_before + time.perf_counter() - start

    try:
        for epoch in range(start_epoch, trainer.config.epochs + 1):
            epoch_start = time.perf_counter()
            first = start_step if epoch == start_epoch else 0
            meter = meter if epoch == start_epoch else Meter()
            state = _train_steps(run, state, epoch, first, meter, clock, bar)
            _guard_finite(run, meter, epoch)  # waits for the epoch's last step
            row = _end_epoch(run, state, epoch, meter, time.perf_counter() - epoch_start, clock())
            history.append(row)
            run.rundir.write_metrics(history)
            run.checkpoints.save(
                epoch * per_epoch, _checkpoint_state(state, Meter(), row["wall_seconds"])
            )
            if options.epoch_lines and is_writer():
                _say(run, _epoch_line(run, row))
            if bar is not None:
                bar.set_postfix(
                    epoch=epoch,
                    loss=f"{row['train_loss']:.3f}",
                    test_acc=f"{row['test_accuracy']:.3f}",
                )
    finally:
        if bar is not None:
            bar.close()
    return _summary(run, state, history)


def _say(run: _Run, line: str) -> None:
    """Prints ``line``; when stdout's reader is gone (``sam-optax train | head``), asks the
    run to stop as a signal would (checkpoint, resume command, exit 141) and prints no more."""
    try:
        print(line, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        if jax.distributed.is_initialized():
            # Every process must stop at one step: through jax's preemption
            # service, as Ctrl-C is (exit 143); without it the run goes on.
            if jax.config.jax_enable_preemption_service:
                os.kill(os.getpid(), signal.SIGTERM)
            return
        stop = run.options.stop
        if stop is not None and not stop.is_set():
            stop.signum = signal.SIGPIPE
            stop.set()


def _epoch_line(run: _Run, row: dict[str, Any]) -> str:
    """``epoch 3/40: train loss 1.2345, accuracy 0.6012; test loss ..., accuracy ...; 0.9 s``."""
    prefix = f"{run.options.description}: " if run.options.description else ""
    return (
        f"{prefix}epoch {row['epoch']}/{run.trainer.config.epochs}: "
        f"train loss {row['train_loss']:.4f}, accuracy {row['train_accuracy']:.4f}; "
        f"test loss {row['test_loss']:.4f}, accuracy {row['test_accuracy']:.4f}; "
        f"{row['epoch_seconds']:.1f} s"
    )


def _summary(run: _Run, state: dict[str, Any], history: list[dict[str, Any]]) -> dict[str, Any]:
    config = run.trainer.config
    timed = [r["epoch_seconds"] for r in history[1:]] or [history[0]["epoch_seconds"]]
    summary = {
        "optimizer": config.optimizer,
        "method": config.method,
        "rho": config.radius,
        "m": config.m,
        "seed": config.seed,
        "label_noise": config.label_noise,
        "epochs": config.epochs,
        "dataset": config.dataset,
        "model": config.model,
        "test_accuracy": history[-1]["test_accuracy"],
        "train_accuracy": history[-1]["train_accuracy"],
        "wall_seconds": history[-1]["wall_seconds"],
        "median_epoch_seconds": float(np.median(timed)),
        "gradients_per_step": float(np.mean([r["gradients_per_step"] for r in history])),
        "num_params": models.count_params(state["params"]),
        "devices": jax.device_count(),
        "run_dir": str(run.rundir.path),
    }
    run.rundir.write_json(run.rundir.summary_file, summary)
    return summary


def _progress_bar(total: int, initial: int, options: RunOptions) -> Any:
    if not options.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=options.description or "train",
        unit="step",
        dynamic_ncols=True,
        leave=False,
    )
