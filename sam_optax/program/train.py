"""One training run: ``train_and_evaluate(config, workdir)``.

SGD (momentum, optional Nesterov), cosine learning rate, weight decay
(decoupled, or as the paper's code has it, an L2 term in the loss), optional
clipping of the averaged gradient, label smoothing, on-device augmentation,
data parallel over all local devices with per-device perturbations
(``sam_optax.parallel.shard_map_step``), one evaluation per epoch, metrics
appended as JSON lines, orbax checkpoints at each epoch's end and every
``checkpoint_every`` steps, and ``resume=True`` that ends with the same
parameters as an uninterrupted run (data order and step keys are functions of
the seed, the epoch and the step, never of the process). A loss that becomes
NaN or infinite stops the run (:class:`TrainingDiverged`) before anything
after the last good checkpoint is saved. The files are described in
:mod:`sam_optax.program.rundir`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax

from sam_optax.program import configs
from sam_optax.program import models
from sam_optax.program.errors import TrainingDiverged
from sam_optax.program.rundir import Checkpoints
from sam_optax.program.rundir import RunDir
from sam_optax.program.rundir import restore_final
from sam_optax.program.trainer import Trainer
from sam_optax.program.trainer import build_trainer
from sam_optax.program.trainer import l2_penalty
from sam_optax.program.trainer import make_loss
from sam_optax.program.trainer import make_optimizer
from sam_optax.program.trainer import make_sam
from sam_optax.program.trainer import normalizer

__all__ = [
    "Meter",
    "epoch_order",
    "l2_penalty",
    "make_loss",
    "make_optimizer",
    "make_sam",
    "normalizer",
    "restore_final",
    "train_and_evaluate",
]

EVAL_BATCH = 1000
METRICS = ("loss", "accuracy")


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
    """The per-step scalars: the clean pass's metrics and the method's diagnostics."""
    return {**aux_metrics, **{k: optax.tree.get(opt_state, k) for k in DIAGNOSTICS}}


# --------------------------------------------------------------------------
# The run.
# --------------------------------------------------------------------------


@dataclasses.dataclass
class _Run:
    """A :class:`~sam_optax.program.trainer.Trainer` and the run directory it writes."""

    trainer: Trainer
    rundir: RunDir
    checkpoints: Checkpoints
    checkpoint_every: int | None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.trainer, name)


def _setup(config, workdir, resume: bool, checkpoint_every: int | None) -> _Run:
    trainer = build_trainer(config)
    rundir = RunDir(workdir)
    rundir.prepare(config, resume)
    if trainer.flipped is not None and not rundir.noise_file.is_file():
        noise = {"rate": config.label_noise, "flipped": trainer.flipped.tolist()}
        rundir.write_json(rundir.noise_file, noise)
    return _Run(trainer, rundir, Checkpoints(rundir.checkpoints), checkpoint_every)


def _checkpoint_state(run: _Run, meter: Meter, wall: float) -> dict[str, Any]:
    return {**run.state, "meter": meter.state(), "wall_seconds": np.asarray(wall, np.float64)}


def _restore(run: _Run) -> tuple[int, Meter, float]:
    """Restores the latest checkpoint into the placed state: ``(steps done, meter, wall)``."""
    found = run.checkpoints.restore_latest(_checkpoint_state(run, Meter(), 0.0))
    if found is None:
        return 0, Meter(), 0.0
    latest, restored = found
    run.trainer.state = {k: restored[k] for k in run.state}
    return latest, Meter.from_state(restored["meter"]), float(restored["wall_seconds"])


def _guard_finite(run: _Run, meter: Meter, epoch: int) -> None:
    """Raises :class:`TrainingDiverged` when a loss since the last flush is not finite."""
    bad = meter.flush()
    if bad is None:
        return
    global_step = (epoch - 1) * run.steps_per_epoch + bad
    latest = run.checkpoints.latest()
    kept = (
        f"the last good checkpoint ({latest} steps) is kept in {run.rundir.checkpoints}"
        if latest is not None
        else "no checkpoint had been written yet"
    )
    raise TrainingDiverged(
        f"the training loss became non-finite at epoch {epoch}, step {bad + 1} of "
        f"{run.steps_per_epoch} (global step {global_step + 1}, learning rate "
        f"{float(run.schedule(global_step)):.3g}); the run stopped and {kept}. "
        "Lower --lr (or set --clip-norm) and start a new run."
    )


def _train_steps(run: _Run, epoch: int, start: int, meter: Meter, clock: Callable, bar) -> None:
    """Runs the steps ``start..`` of ``epoch``, checkpointing every ``checkpoint_every``."""
    base_key = jax.random.key(run.config.seed + 1)
    order = epoch_order(run.config.seed, epoch, len(run.dataset.x_train), run.config.batch_size)
    for i in range(start, run.steps_per_epoch):
        global_step = (epoch - 1) * run.steps_per_epoch + i
        params, opt_state, _, (batch_stats, scalars) = run.step(
            run.state["params"],
            run.state["opt_state"],
            run.batch(order[i]),
            run.state["batch_stats"],
            rng=jax.random.fold_in(base_key, global_step),
        )
        run.trainer.state = {"params": params, "batch_stats": batch_stats, "opt_state": opt_state}
        meter.add(step_scalars(scalars, opt_state))
        if bar is not None:
            bar.update(1)
            if i % 10 == 0:
                bar.set_postfix(epoch=epoch, loss=f"{float(scalars['loss']):.3f}")
        done = global_step + 1
        if (
            run.checkpoint_every
            and done % run.checkpoint_every == 0
            and i + 1 < run.steps_per_epoch
        ):
            _guard_finite(run, meter, epoch)
            run.checkpoints.save(done, _checkpoint_state(run, meter, clock()))


def _end_epoch(run: _Run, epoch: int, meter: Meter, epoch_seconds: float, wall: float) -> dict:
    """Evaluates and returns the epoch's metrics row (the meter already flushed)."""
    test_loss, test_accuracy = run.evaluate(
        run.state["params"], run.state["batch_stats"], run.dataset.x_test, run.dataset.y_test
    )
    train = meter.means()
    return {
        "epoch": epoch,
        "step": epoch * run.steps_per_epoch,
        "lr": float(run.schedule(epoch * run.steps_per_epoch - 1)),
        "train_loss": train["loss"],
        "train_accuracy": train["accuracy"],
        "test_loss": test_loss,
        "test_accuracy": test_accuracy,
        "epoch_seconds": epoch_seconds,
        "wall_seconds": wall,
        **{k: train[k] for k in DIAGNOSTICS if k != "sam_step"},
        "sam_fraction": train["sam_step"],
        "gradients_per_step": gradients_per_step(run.config, train["sam_step"]),
    }


def gradients_per_step(config: configs.Config, sam_fraction: float) -> float:
    """Gradient evaluations per step: 1 for SGD and MSAM, 1 + the SAM fraction otherwise."""
    if config.optimizer in ("sgd", "msam"):
        return 1.0
    return 1.0 + sam_fraction


def train_and_evaluate(
    config: configs.Config,
    workdir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    description: str | None = None,
    checkpoint_every: int | None = None,
) -> dict[str, Any]:
    """Trains, evaluates each epoch, checkpoints, and returns the run's summary."""
    run = _setup(config, workdir, resume, checkpoint_every)
    try:
        return _train(run, resume, progress, description)
    finally:
        run.checkpoints.close()
        run.rundir.release()


def _train(run: _Run, resume: bool, progress: bool, description: str | None) -> dict[str, Any]:
    done, meter, wall_before = _restore(run) if resume else (0, Meter(), 0.0)
    start_epoch, start_step = done // run.steps_per_epoch + 1, done % run.steps_per_epoch
    history = run.rundir.read_metrics(start_epoch - 1)
    run.rundir.write_metrics(history)
    total = run.steps_per_epoch * run.config.epochs
    bar = _progress_bar(total, done, progress, description)
    start = time.perf_counter()

    def clock() -> float:
        return wall_before + time.perf_counter() - start

    for epoch in range(start_epoch, run.config.epochs + 1):
        epoch_start = time.perf_counter()
        first = start_step if epoch == start_epoch else 0
        meter = meter if epoch == start_epoch else Meter()
        _train_steps(run, epoch, first, meter, clock, bar)
        _guard_finite(run, meter, epoch)  # waits for the epoch's last step
        row = _end_epoch(run, epoch, meter, time.perf_counter() - epoch_start, clock())
        history.append(row)
        run.rundir.write_metrics(history)
        run.checkpoints.save(
            epoch * run.steps_per_epoch, _checkpoint_state(run, Meter(), row["wall_seconds"])
        )
        if bar is not None:
            bar.set_postfix(
                epoch=epoch, loss=f"{row['train_loss']:.3f}", test_acc=f"{row['test_accuracy']:.3f}"
            )
    if bar is not None:
        bar.close()
    return _summary(run, history)


def _summary(run: _Run, history: list[dict[str, Any]]) -> dict[str, Any]:
    config = run.config
    timed = [r["epoch_seconds"] for r in history[1:]] or [history[0]["epoch_seconds"]]
    summary = {
        "optimizer": config.optimizer,
        "method": config.method,
        "rho": config.rho,
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
        "num_params": models.count_params(run.state["params"]),
        "devices": jax.device_count(),
        "run_dir": str(run.rundir.path),
    }
    run.rundir.write_json(run.rundir.summary_file, summary)
    return summary


def _progress_bar(total: int, initial: int, enabled: bool, description: str | None):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=description or "train",
        unit="step",
        dynamic_ncols=True,
        leave=False,
    )
