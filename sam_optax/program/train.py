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
import jax.numpy as jnp
import numpy as np
import optax

import sam_optax
from sam_optax import parallel
from sam_optax.program import configs
from sam_optax.program import input_pipeline
from sam_optax.program import models
from sam_optax.program.augment import augment
from sam_optax.program.errors import TrainingDiverged
from sam_optax.program.errors import UsageError
from sam_optax.program.rundir import Checkpoints
from sam_optax.program.rundir import RunDir
from sam_optax.program.rundir import restore_final

__all__ = ["epoch_order", "make_optimizer", "normalizer", "restore_final", "train_and_evaluate"]

EVAL_BATCH = 1000
METRICS = ("loss", "accuracy")


# --------------------------------------------------------------------------
# The pieces of a step.
# --------------------------------------------------------------------------


def make_optimizer(
    config: configs.Config, total_steps: int, axis_name: str | None = "data"
) -> optax.GradientTransformation:
    """``chain(sam, [clip], [add_decayed_weights], sgd(cosine))``; rho = 0 is data-parallel SGD.

    ``sam`` averages the SAM gradients over the devices, so the clipping acts
    on the averaged gradient (the paper's code). Weight decay is decoupled
    unless ``l2_in_loss`` puts it in the loss (:func:`make_loss`).
    """
    schedule = optax.cosine_decay_schedule(config.lr, total_steps)
    parts = [
        sam_optax.sam(
            config.rho,
            norm=config.norm,
            adaptive=config.adaptive,
            axis_name=axis_name,
            sync_perturbation=config.sync_perturbation,
        )
    ]
    if config.clip_norm is not None:
        parts.append(optax.clip_by_global_norm(config.clip_norm))
    if config.weight_decay and not config.l2_in_loss:
        parts.append(optax.add_decayed_weights(config.weight_decay))
    parts.append(optax.sgd(schedule, momentum=config.momentum, nesterov=config.nesterov))
    return optax.chain(*parts)


def normalizer(dataset: input_pipeline.Dataset) -> Callable[[jax.Array], jax.Array]:
    """``x -> (x - mean) / std`` per channel with the dataset's statistics, in float32."""
    mean, std = (jnp.asarray(v, jnp.float32)[None, None, None, :] for v in dataset.mean_std)

    def normalize(x: jax.Array) -> jax.Array:
        return (x.astype(jnp.float32) - mean) / std

    return normalize


def l2_penalty(params: Any) -> jax.Array:
    r""":math:`\frac12 \sum_i \|w_i\|^2` over every parameter (the paper's code's weight decay)."""
    return 0.5 * sum(jnp.sum(jnp.square(w)) for w in jax.tree.leaves(params))


def make_loss(model, normalize, config: configs.Config, num_classes: int):
    """``loss(params, batch, batch_stats, rng) -> (objective, (new_batch_stats, metrics))``.

    The objective is the (label-smoothed) cross entropy, plus
    ``weight_decay * l2_penalty`` with ``l2_in_loss``. ``metrics`` holds the
    cross entropy (``loss``) and the accuracy of this pass. Augmentation and
    dropout draw from ``rng``, which the SAM step passes unchanged to both
    passes; BatchNorm runs in training mode and the new statistics come from
    this (the clean) pass.
    """

    def loss(params, batch, batch_stats, rng):
        x, y = batch
        aug_key, dropout_key = jax.random.split(rng)
        x = augment(normalize(x), aug_key, config.augment)
        variables = {"params": params}
        if batch_stats is not None:
            variables["batch_stats"] = batch_stats
        out = model.apply(
            variables,
            x,
            train=True,
            mutable=["batch_stats"] if batch_stats is not None else False,
            rngs={"dropout": dropout_key},
        )
        logits, mutated = out if batch_stats is not None else (out, {})
        targets = optax.smooth_labels(jax.nn.one_hot(y, num_classes), config.label_smoothing)
        xent = optax.softmax_cross_entropy(logits, targets).mean()
        objective = xent
        if config.l2_in_loss and config.weight_decay:
            objective = xent + config.weight_decay * l2_penalty(params)
        metrics = {"loss": xent, "accuracy": jnp.mean(jnp.argmax(logits, -1) == y)}
        return objective, (mutated.get("batch_stats"), metrics)

    return loss


def make_eval(model, normalize, num_classes: int):
    """``evaluate(params, batch_stats, x, y) -> (mean loss, accuracy)`` in chunks of EVAL_BATCH."""
    del num_classes

    @jax.jit
    def eval_batch(params, batch_stats, x, y):
        variables = {"params": params}
        if batch_stats is not None:
            variables["batch_stats"] = batch_stats
        logits = model.apply(variables, normalize(x), train=False)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return jnp.sum(losses), jnp.sum(jnp.argmax(logits, -1) == y)

    def evaluate(params, batch_stats, x, y) -> tuple[float, float]:
        params, batch_stats = jax.device_get((params, batch_stats))
        total_loss, correct = 0.0, 0
        for start in range(0, len(x), EVAL_BATCH):
            chunk = slice(start, start + EVAL_BATCH)
            batch_loss, c = eval_batch(params, batch_stats, x[chunk], y[chunk])
            total_loss += float(batch_loss)
            correct += int(c)
        return total_loss / len(x), correct / len(x)

    return evaluate


def epoch_order(seed: int, epoch: int, n: int, batch_size: int) -> np.ndarray:
    """The batches of an epoch: a permutation seeded by (seed, epoch), last partial batch dropped."""
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    steps = n // batch_size
    return perm[: steps * batch_size].reshape(steps, batch_size)


# --------------------------------------------------------------------------
# Per-epoch bookkeeping.
# --------------------------------------------------------------------------


class Meter:
    """An epoch's per-step scalars, summed on the host in step order.

    Steps hand in device arrays (no host sync); :meth:`flush` brings the
    pending ones over at checkpoints and at the epoch's end, adds them in
    order (so a resumed epoch sums exactly as an uninterrupted one) and
    returns the index of the first step whose loss is not finite.
    """

    def __init__(self, sums: dict[str, float] | None = None, count: int = 0):
        self.sums = dict(sums) if sums else dict.fromkeys(METRICS, 0.0)
        self.count = count
        self.pending: list[dict[str, jax.Array]] = []

    def add(self, scalars: dict[str, jax.Array]) -> None:
        self.pending.append(scalars)

    def flush(self) -> int | None:
        bad = None
        for i, row in enumerate(jax.device_get(self.pending)):
            if bad is None and not math.isfinite(float(row["loss"])):
                bad = self.count + i
            for k in self.sums:
                self.sums[k] += float(row[k])
        self.count += len(self.pending)
        self.pending = []
        return bad

    def means(self) -> dict[str, float]:
        return {k: v / max(self.count, 1) for k, v in self.sums.items()}

    def state(self) -> dict[str, Any]:
        return {
            "sums": {k: np.asarray(v, np.float64) for k, v in self.sums.items()},
            "count": np.asarray(self.count, np.int64),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Meter:
        return cls({k: float(v) for k, v in state["sums"].items()}, int(state["count"]))


# --------------------------------------------------------------------------
# The run.
# --------------------------------------------------------------------------


@dataclasses.dataclass
class _Run:
    """What a run is made of, built once by :func:`_setup`."""

    config: configs.Config
    rundir: RunDir
    dataset: input_pipeline.Dataset
    y_train: np.ndarray
    steps_per_epoch: int
    mesh: jax.sharding.Mesh
    step: Callable[..., Any]
    evaluate: Callable[..., Any]
    schedule: Callable[[int], Any]
    state: dict[str, Any]
    checkpoints: Checkpoints
    checkpoint_every: int | None


def _setup(config, workdir, resume: bool, checkpoint_every: int | None) -> _Run:
    devices = jax.devices()
    configs.validate(config, len(devices))
    dataset = input_pipeline.load(config.dataset, config.data_dir)
    rundir = RunDir(workdir)
    rundir.prepare(config, resume)
    y_train = dataset.y_train
    if config.label_noise > 0:
        y_train, flipped = input_pipeline.symmetric_label_noise(
            dataset.y_train, config.label_noise, dataset.num_classes, config.seed
        )
        if not rundir.noise_file.is_file():
            rundir.write_json(
                rundir.noise_file, {"rate": config.label_noise, "flipped": flipped.tolist()}
            )
    steps_per_epoch = len(dataset.x_train) // config.batch_size
    if steps_per_epoch == 0:
        raise UsageError(
            f"--batch-size {config.batch_size} is larger than the "
            f"{len(dataset.x_train)} training examples."
        )
    total_steps = steps_per_epoch * config.epochs
    mesh = jax.make_mesh(
        (len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices
    )
    normalize = normalizer(dataset)
    model = models.create_model(config.model, dataset.num_classes, config.dropout)
    variables = models.init_variables(model, dataset.image_shape, jax.random.key(config.seed))
    tx = make_optimizer(config, total_steps)
    group_size = (
        config.m if config.m is not None and config.m < config.batch_size // len(devices) else None
    )
    step = parallel.shard_map_step(
        make_loss(model, normalize, config, dataset.num_classes),
        tx,
        mesh,
        group_size=group_size,
        has_aux=True,
        donate=True,
    )
    state = {
        "params": variables["params"],
        "batch_stats": variables.get("batch_stats"),
        "opt_state": tx.init(variables["params"]),
    }
    return _Run(
        config=config,
        rundir=rundir,
        dataset=dataset,
        y_train=y_train,
        steps_per_epoch=steps_per_epoch,
        mesh=mesh,
        step=step,
        evaluate=make_eval(model, normalize, dataset.num_classes),
        schedule=optax.cosine_decay_schedule(config.lr, total_steps),
        state=state,
        checkpoints=Checkpoints(rundir.checkpoints),
        checkpoint_every=checkpoint_every,
    )


def _checkpoint_state(run: _Run, meter: Meter, wall: float) -> dict[str, Any]:
    return {**run.state, "meter": meter.state(), "wall_seconds": np.asarray(wall, np.float64)}


def _restore(run: _Run) -> tuple[int, Meter, float]:
    """Restores the latest checkpoint: ``(steps done, the epoch's meter, wall seconds)``."""
    latest = run.checkpoints.latest()
    if latest is None:
        return 0, Meter(), 0.0
    restored = run.checkpoints.restore(latest, _checkpoint_state(run, Meter(), 0.0))
    run.state = {k: restored[k] for k in run.state}
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
        local = order[i].reshape(jax.process_count(), -1)[jax.process_index()]
        batch = parallel.shard_batch((run.dataset.x_train[local], run.y_train[local]), run.mesh)
        params, opt_state, _, (batch_stats, scalars) = run.step(
            run.state["params"],
            run.state["opt_state"],
            batch,
            run.state["batch_stats"],
            rng=jax.random.fold_in(base_key, global_step),
        )
        run.state = {"params": params, "batch_stats": batch_stats, "opt_state": opt_state}
        meter.add(scalars)
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
    }


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


def _train(run: _Run, resume: bool, progress: bool, description: str | None) -> dict[str, Any]:
    done, meter, wall_before = _restore(run) if resume else (0, Meter(), 0.0)
    start_epoch, start_step = done // run.steps_per_epoch + 1, done % run.steps_per_epoch
    history = run.rundir.read_metrics(start_epoch - 1)
    run.rundir.write_metrics(history)
    run.state = parallel.replicate(run.state, run.mesh)
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
