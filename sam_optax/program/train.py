"""One training run: ``train_and_evaluate(config, workdir)``.

SGD (momentum 0.9, optional Nesterov), cosine learning rate, weight decay,
label smoothing, on-device augmentation, data parallel over all local devices
with per-device perturbations (``sam_optax.parallel.shard_map_step``), one
evaluation per epoch, metrics appended as JSON lines, an orbax checkpoint per
epoch, and ``resume=True`` that ends with the same parameters as an
uninterrupted run (data order and step keys are functions of the seed, the
epoch and the step, never of the process).

Run directory::

    config.json       the Config of the run
    label_noise.json  the flipped training indices (seeded, recorded)
    metrics.jsonl     one line per epoch
    checkpoints/      orbax checkpoints (the last two epochs)
    summary.json      written when the run completes
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

import sam_optax
from sam_optax import parallel
from sam_optax.program import configs
from sam_optax.program import input_pipeline
from sam_optax.program import models
from sam_optax.program.augment import augment
from sam_optax.program.errors import RunDirError
from sam_optax.program.errors import UsageError

EVAL_BATCH = 1000


def make_optimizer(config: configs.Config, total_steps: int) -> optax.GradientTransformation:
    """``chain(sam, add_decayed_weights, sgd(cosine))``; rho = 0 is plain data-parallel SGD."""
    schedule = optax.cosine_decay_schedule(config.lr, total_steps)
    return optax.chain(
        sam_optax.sam(
            config.rho,
            norm=config.norm,
            adaptive=config.adaptive,
            axis_name="data",
            sync_perturbation=config.sync_perturbation,
        ),
        optax.add_decayed_weights(config.weight_decay),
        optax.sgd(schedule, momentum=config.momentum, nesterov=config.nesterov),
    )


def normalizer(dataset: input_pipeline.Dataset) -> Callable[[jax.Array], jax.Array]:
    """``x -> (x - mean) / std`` per channel with the dataset's statistics, in float32."""
    mean, std = (jnp.asarray(v, jnp.float32)[None, None, None, :] for v in dataset.mean_std)

    def normalize(x: jax.Array) -> jax.Array:
        return (x.astype(jnp.float32) - mean) / std

    return normalize


def make_loss(model, normalize, config: configs.Config, num_classes: int):
    """``loss(params, batch, batch_stats, rng) -> (loss, (new_batch_stats, accuracy))``.

    Augmentation and dropout draw from ``rng``, which the SAM step passes
    unchanged to both passes; BatchNorm runs in training mode and the new
    statistics come from this (the clean) pass.
    """

    def loss(params, batch, batch_stats, rng):
        x, y = batch
        aug_key, dropout_key = jax.random.split(rng)
        x = augment(normalize(x), aug_key, config.augment)
        variables = {"params": params}
        mutable: list[str] = []
        if batch_stats is not None:
            variables["batch_stats"] = batch_stats
            mutable = ["batch_stats"]
        out = model.apply(
            variables, x, train=True, mutable=mutable or False, rngs={"dropout": dropout_key}
        )
        logits, mutated = out if mutable else (out, {})
        targets = optax.smooth_labels(jax.nn.one_hot(y, num_classes), config.label_smoothing)
        value = optax.softmax_cross_entropy(logits, targets).mean()
        accuracy = jnp.mean(jnp.argmax(logits, -1) == y)
        return value, (mutated.get("batch_stats"), accuracy)

    return loss


def make_eval(model, normalize, num_classes: int):
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
            batch_loss, c = eval_batch(
                params, batch_stats, x[start : start + EVAL_BATCH], y[start : start + EVAL_BATCH]
            )
            total_loss += float(batch_loss)
            correct += int(c)
        return total_loss / len(x), correct / len(x)

    return evaluate


def epoch_order(seed: int, epoch: int, n: int, batch_size: int) -> np.ndarray:
    """The batches of an epoch: a permutation seeded by (seed, epoch), last partial batch dropped."""
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    steps = n // batch_size
    return perm[: steps * batch_size].reshape(steps, batch_size)


def prepare_workdir(workdir: Path, config: configs.Config, resume: bool) -> None:
    """Creates the run directory, or checks it for ``resume``; never overwrites silently."""
    config_file = workdir / "config.json"
    if resume:
        if not config_file.is_file():
            raise RunDirError(f"--resume: {workdir} holds no run to resume (no config.json).")
        saved = json.loads(config_file.read_text())
        current = json.loads(json.dumps(config.to_dict()))
        diff = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
        if diff:
            changes = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
            raise RunDirError(
                f"--resume: the settings differ from the run in {workdir} ({changes})."
            )
        return
    if workdir.exists() and any(workdir.iterdir()):
        raise RunDirError(
            f"--out {workdir} already exists and is not empty; pass --resume to continue "
            "that run, or choose another --out."
        )
    workdir.mkdir(parents=True, exist_ok=True)
    config_file.write_text(json.dumps(config.to_dict(), indent=2) + "\n")


def _read_metrics(path: Path, up_to_epoch: int) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["epoch"] <= up_to_epoch]


def train_and_evaluate(
    config: configs.Config,
    workdir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    description: str | None = None,
) -> dict[str, Any]:
    """Trains, evaluates each epoch, checkpoints, and returns the run's summary."""
    workdir = Path(workdir)
    devices = jax.local_devices()
    configs.validate(config, len(devices))
    dataset = input_pipeline.load(config.dataset, config.data_dir)
    prepare_workdir(workdir, config, resume)

    y_train = dataset.y_train
    noise_file = workdir / "label_noise.json"
    if config.label_noise > 0:
        y_train, flipped = input_pipeline.symmetric_label_noise(
            dataset.y_train, config.label_noise, dataset.num_classes, config.seed
        )
        if not noise_file.is_file():
            noise_file.write_text(
                json.dumps({"rate": config.label_noise, "flipped": flipped.tolist()}) + "\n"
            )

    n_train = len(dataset.x_train)
    steps_per_epoch = n_train // config.batch_size
    if steps_per_epoch == 0:
        raise UsageError(
            f"--batch-size {config.batch_size} is larger than the {n_train} training examples."
        )
    total_steps = steps_per_epoch * config.epochs

    mesh = jax.make_mesh(
        (len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices
    )
    normalize = normalizer(dataset)
    model = models.create_model(config.model, dataset.num_classes, config.dropout)
    variables = models.init_variables(model, dataset.image_shape, jax.random.key(config.seed))
    tx = make_optimizer(config, total_steps)
    state = {
        "params": variables["params"],
        "batch_stats": variables.get("batch_stats"),
        "opt_state": tx.init(variables["params"]),
    }
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
    evaluate = make_eval(model, normalize, dataset.num_classes)

    options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
    manager = ocp.CheckpointManager((workdir / "checkpoints").absolute(), options=options)
    start_epoch, wall_before = 1, 0.0
    if resume and manager.latest_step() is not None:
        latest = manager.latest_step()
        template = jax.tree.map(ocp.utils.to_shape_dtype_struct, {**state, "wall_seconds": 0.0})
        restored = manager.restore(latest, args=ocp.args.StandardRestore(template))
        wall_before = float(restored.pop("wall_seconds"))
        state = restored
        start_epoch = latest + 1
    history = _read_metrics(workdir / "metrics.jsonl", start_epoch - 1)
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))

    state = parallel.replicate(state, mesh)
    base_key = jax.random.key(config.seed + 1)
    schedule = optax.cosine_decay_schedule(config.lr, total_steps)
    bar = _progress_bar(total_steps, (start_epoch - 1) * steps_per_epoch, progress, description)
    start = time.perf_counter()
    test_accuracy = history[-1]["test_accuracy"] if history else math.nan
    for epoch in range(start_epoch, config.epochs + 1):
        epoch_start = time.perf_counter()
        losses, accuracies = [], []
        for i, idx in enumerate(epoch_order(config.seed, epoch, n_train, config.batch_size)):
            global_step = (epoch - 1) * steps_per_epoch + i
            batch = parallel.shard_batch((dataset.x_train[idx], y_train[idx]), mesh)
            params, opt_state, loss, (batch_stats, accuracy) = step(
                state["params"],
                state["opt_state"],
                batch,
                state["batch_stats"],
                rng=jax.random.fold_in(base_key, global_step),
            )
            state = {"params": params, "batch_stats": batch_stats, "opt_state": opt_state}
            losses.append(loss)
            accuracies.append(accuracy)
            if bar is not None:
                bar.update(1)
                if i % 10 == 0 or i == steps_per_epoch - 1:
                    bar.set_postfix(
                        epoch=epoch, loss=f"{float(loss):.3f}", test_acc=f"{test_accuracy:.3f}"
                    )
        train_loss = float(np.mean(jax.device_get(losses)))
        train_accuracy = float(np.mean(jax.device_get(accuracies)))
        epoch_seconds = time.perf_counter() - epoch_start
        test_loss, test_accuracy = evaluate(
            state["params"], state["batch_stats"], dataset.x_test, dataset.y_test
        )
        wall = wall_before + time.perf_counter() - start
        row = {
            "epoch": epoch,
            "step": epoch * steps_per_epoch,
            "lr": float(schedule(epoch * steps_per_epoch - 1)),
            "train_loss": train_loss,
            "train_accuracy": train_accuracy,
            "test_loss": test_loss,
            "test_accuracy": test_accuracy,
            "epoch_seconds": epoch_seconds,
            "wall_seconds": wall,
        }
        history.append(row)
        with (workdir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
        manager.save(epoch, args=ocp.args.StandardSave({**state, "wall_seconds": wall}))
        if bar is not None:
            bar.set_postfix(epoch=epoch, loss=f"{train_loss:.3f}", test_acc=f"{test_accuracy:.3f}")
    manager.wait_until_finished()
    manager.close()
    if bar is not None:
        bar.close()

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
        "median_epoch_seconds": float(
            np.median([r["epoch_seconds"] for r in history[1:]] or [history[0]["epoch_seconds"]])
        ),
        "num_params": models.count_params(state["params"]),
        "devices": len(devices),
        "run_dir": str(workdir),
    }
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def restore_final(workdir: str | Path) -> dict[str, Any]:
    """The last checkpoint of a run (params, batch_stats, opt_state) as host arrays."""
    workdir = Path(workdir)
    manager = ocp.CheckpointManager((workdir / "checkpoints").absolute())
    latest = manager.latest_step()
    if latest is None:
        raise RunDirError(f"{workdir} has no checkpoint.")
    restored = manager.restore(latest, args=ocp.args.StandardRestore())
    manager.close()
    return restored


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
