"""What a training step is made of: the optimizer, the loss, the mesh, the compiled step.

:func:`build_trainer` turns a :class:`~sam_optax.program.configs.Config` into
a :class:`Trainer`: the model, its (placed) initial state, the device mesh
(``data`` replicas, optionally split into ``sync`` groups that share one
perturbation, and a ``model`` axis that shards the params within each
replica), the data-parallel SAM step and the evaluation. The training loop
(:mod:`sam_optax.program.train`) and the comparisons' cost measurements
(:mod:`sam_optax.program.compare`) build on it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

import sam_optax
from sam_optax import parallel
from sam_optax.program import configs
from sam_optax.program import input_pipeline
from sam_optax.program import models
from sam_optax.program.augment import augment
from sam_optax.program.errors import UsageError

EVAL_BATCH = 1000


# --------------------------------------------------------------------------
# The pieces of a step.
# --------------------------------------------------------------------------


def make_sam(
    config: configs.Config, total_steps: int, axis_name: Any = "data"
) -> optax.GradientTransformationExtraArgs:
    """The SAM-family transformation of ``config.method`` (``sam(0.0)`` when ``rho == 0``).

    ``axis_name`` is the data axis (or ``('data', 'sync')`` with
    ``config.sync_group``: one perturbation per group of devices).
    """
    if config.rho == 0:
        return sam_optax.sam(0.0, axis_name=axis_name)
    sync = config.sync_perturbation
    if config.sync_group is not None and axis_name is not None:
        sync = "sync"
    common = {
        "norm": config.norm,
        "adaptive": config.adaptive,
        "axis_name": axis_name,
        "sync_perturbation": sync,
    }
    rho = config.rho
    factories = {
        "sam": lambda: sam_optax.sam(rho, **common),
        "gsam": lambda: sam_optax.gsam(rho, config.gsam_alpha, **common),
        "looksam": lambda: sam_optax.looksam(
            rho, config.looksam_every, config.looksam_alpha, **common
        ),
        "rst": lambda: sam_optax.rst(rho, config.rst_probability, seed=config.seed, **common),
        "aesam": lambda: sam_optax.aesam(
            rho,
            optax.linear_schedule(config.aesam_threshold, -config.aesam_threshold, total_steps),
            **common,
        ),
        "fsam": lambda: sam_optax.fsam(rho, config.fsam_sigma, decay=config.fsam_decay, **common),
    }
    return factories[config.method]()


def make_optimizer(
    config: configs.Config, total_steps: int, axis_name: Any = "data"
) -> optax.GradientTransformation:
    """``chain(method, [clip], [add_decayed_weights], sgd(cosine))``; rho = 0 is data-parallel SGD.

    The method (``sam`` or a variant) averages the SAM gradients over the
    devices, so the clipping acts on the averaged gradient (the paper's code).
    Weight decay is decoupled unless ``l2_in_loss`` puts it in the loss
    (:func:`make_loss`).
    """
    schedule = optax.cosine_decay_schedule(config.lr, total_steps)
    parts = []
    if config.clip_norm is not None:
        parts.append(optax.clip_by_global_norm(config.clip_norm))
    if config.weight_decay and not config.l2_in_loss:
        parts.append(optax.add_decayed_weights(config.weight_decay))
    parts.append(optax.sgd(schedule, momentum=config.momentum, nesterov=config.nesterov))
    if config.optimizer == "msam":
        # The authors' SGD-MSAM: the direction is SGD's own momentum (clipped
        # gradients and weight decay included), decay read at the point held.
        if config.adaptive or config.norm != 2 or config.sync_perturbation:
            raise UsageError(
                "--method msam takes neither --adaptive, --norm nor --sync-perturbation."
            )
        return sam_optax.msam(
            optax.chain(*parts), config.msam_rho, sees="perturbed", axis_name=axis_name
        )
    return optax.chain(make_sam(config, total_steps, axis_name), *parts)


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
        params, batch_stats = host_copy((params, batch_stats))
        total_loss, correct = 0.0, 0
        for start in range(0, len(x), EVAL_BATCH):
            chunk = slice(start, start + EVAL_BATCH)
            batch_loss, c = eval_batch(params, batch_stats, x[chunk], y[chunk])
            total_loss += float(batch_loss)
            correct += int(c)
        return total_loss / len(x), correct / len(x)

    return evaluate


def host_copy(tree: Any) -> Any:
    """Numpy copies of (possibly sharded, possibly multi-process) global arrays, on every process."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


# --------------------------------------------------------------------------
# The mesh and the placement of the params.
# --------------------------------------------------------------------------


def mesh_shape(config: configs.Config, n_devices: int) -> dict[str, int]:
    """The mesh axes of a run: ``data`` (split into ``data`` x ``sync`` with
    ``sync_group``) and ``model``; ``config.mesh`` like ``'data=4,model=2'``."""
    axes = configs.parse_mesh(config.mesh)
    model = axes.get("model", 1)
    data = axes.get("data", n_devices // model)
    if data * model != n_devices:
        raise UsageError(
            f"--mesh {config.mesh!r} needs {data * model} devices, {n_devices} are here."
        )
    if config.sync_group is None:
        return {"data": data, "model": model}
    if data % config.sync_group:
        raise UsageError(
            f"--sync-group {config.sync_group} does not divide the {data} data replicas."
        )
    return {"data": data // config.sync_group, "sync": config.sync_group, "model": model}


def data_axes(shape: dict[str, int]) -> str | tuple[str, str]:
    return ("data", "sync") if "sync" in shape else "data"


def param_specs(params: Any, model_size: int) -> Any:
    """Shards each matrix (or kernel) over ``model`` along its last axis that divides."""

    def spec(x: Any) -> P:
        shape = np.shape(x)
        if model_size == 1 or len(shape) < 2:
            return P()
        for axis in reversed(range(len(shape))):
            if shape[axis] % model_size == 0:
                return P(*([None] * axis), "model")
        return P()

    return jax.tree.map(spec, params)


# --------------------------------------------------------------------------
# The trainer.
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Trainer:
    """A compiled training setup: data, mesh, step, evaluation and the placed initial state."""

    config: configs.Config
    dataset: input_pipeline.Dataset
    y_train: np.ndarray
    flipped: np.ndarray | None
    steps_per_epoch: int
    mesh: jax.sharding.Mesh
    data_axes: Any
    step: Callable[..., Any]
    evaluate: Callable[..., Any]
    schedule: Callable[[int], Any]
    state: dict[str, Any]

    def batch(self, indices: np.ndarray) -> Any:
        """The global batch of these example indices; each process feeds its own slice."""
        local = indices.reshape(jax.process_count(), -1)[jax.process_index()]
        x, y = self.dataset.x_train[local], self.y_train[local]
        return parallel.shard_batch((x, y), self.mesh, self.data_axes)


def build_trainer(config: configs.Config, dataset: input_pipeline.Dataset | None = None) -> Trainer:
    """Everything a run of ``config`` needs, placed on the mesh of all devices."""
    n_devices = jax.device_count()
    configs.validate(config, n_devices)
    dataset = dataset or input_pipeline.load(config.dataset, config.data_dir)
    y_train, flipped = dataset.y_train, None
    if config.label_noise > 0:
        y_train, flipped = input_pipeline.symmetric_label_noise(
            dataset.y_train, config.label_noise, dataset.num_classes, config.seed
        )
    steps_per_epoch = len(dataset.x_train) // config.batch_size
    if steps_per_epoch == 0:
        raise UsageError(
            f"--batch-size {config.batch_size} is larger than the "
            f"{len(dataset.x_train)} training examples."
        )
    shape = mesh_shape(config, n_devices)
    mesh = jax.make_mesh(
        tuple(shape.values()),
        tuple(shape),
        axis_types=(jax.sharding.AxisType.Auto,) * len(shape),
    )
    axes = data_axes(shape)
    total_steps = steps_per_epoch * config.epochs
    normalize = normalizer(dataset)
    model = models.create_model(config.model, dataset.num_classes, config.dropout)
    variables = models.init_variables(model, dataset.image_shape, jax.random.key(config.seed))
    tx = make_optimizer(config, total_steps, axis_name=axes)
    replicas = n_devices // shape["model"]
    per_replica = config.batch_size // replicas
    group_size = config.m if config.m is not None and config.m < per_replica else None
    step = parallel.shard_map_step(
        make_loss(model, normalize, config, dataset.num_classes),
        tx,
        mesh,
        axis_name=axes,
        group_size=group_size,
        has_aux=True,
        donate=True,
    )
    specs = param_specs(variables["params"], shape["model"])
    opt_state = tx.init(variables["params"])
    state = {
        "params": parallel.place(variables["params"], mesh, specs),
        "batch_stats": parallel.replicate(variables.get("batch_stats"), mesh),
        "opt_state": parallel.place(opt_state, mesh, parallel.state_specs(tx, opt_state, specs)),
    }
    return Trainer(
        config=config,
        dataset=dataset,
        y_train=y_train,
        flipped=flipped,
        steps_per_epoch=steps_per_epoch,
        mesh=mesh,
        data_axes=axes,
        step=step,
        evaluate=make_eval(model, normalize, dataset.num_classes),
        schedule=optax.cosine_decay_schedule(config.lr, total_steps),
        state=state,
    )
