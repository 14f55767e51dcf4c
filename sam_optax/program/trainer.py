"""What a training step is made of: the optimizer, the loss, the mesh, the compiled step.

:func:`build_trainer` turns a :class:`~sam_optax.program.configs.Config` into
a :class:`Trainer`: the model, its (placed) initial state, the device mesh
(``data`` replicas, optionally split into ``sync`` groups that share one
perturbation, and a ``model`` axis that shards the params within each
replica), the data-parallel SAM step and the evaluation, both built on
:func:`sam_optax.flax.linen_loss_fn`. The method comes from
:data:`~sam_optax.program.configs.METHODS`. The training loop
(:mod:`sam_optax.program.train`) builds on it.
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
from sam_optax import flax as sam_flax
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


def _method_options(config: configs.Config, axis_name: Any) -> dict[str, Any]:
    """The options handed to the method's factory: the perturbation's, or the axis (and mask)."""
    mask = {} if config.perturb == "all" else {"mask": sam_flax.linen_normalization_mask()}
    if not configs.METHODS[config.method].perturbation_options:
        return {"axis_name": axis_name, **mask}
    sync = config.sync_perturbation
    if config.sync_group is not None and axis_name is not None:
        sync = "sync"
    return {
        "norm": config.norm,
        "adaptive": config.adaptive,
        "eta": config.eta,
        "axis_name": axis_name,
        "sync_perturbation": sync,
        **mask,
    }


def _check_perturbed_params(config: configs.Config, params: Any) -> None:
    """``--perturb norm`` needs a model with normalization layers."""
    if config.perturb == "norm" and not any(
        jax.tree.leaves(sam_flax.linen_normalization_mask()(params))
    ):
        raise UsageError(
            f"--perturb norm perturbs the normalization layers, and --model {config.model} "
            "has none (cnn, resnet20, resnet32 and the wide ResNets have BatchNorm)."
        )


def make_optimizer(
    config: configs.Config, total_steps: int, axis_name: Any = "data"
) -> optax.GradientTransformation:
    """``chain(method, [clip], [add_decayed_weights], sgd(cosine))``; rho = 0 is data-parallel SGD.

    The method (:data:`~sam_optax.program.configs.METHODS`; ``sam(0.0)``, the
    data-parallel average alone, when ``rho == 0``) averages the SAM
    gradients over the devices, so the clipping acts on the averaged gradient
    (the paper's code); a method that ``wraps_base`` builds the whole
    optimizer around the same base. ``axis_name`` is the data axis (or
    ``('data', 'sync')`` with ``config.sync_group``: one perturbation per
    group of devices). Weight decay is decoupled unless ``l2_in_loss`` puts it
    in the loss (:func:`make_loss`).
    """
    schedule = optax.cosine_decay_schedule(config.lr, total_steps)
    parts = []
    if config.clip_norm is not None:
        parts.append(optax.clip_by_global_norm(config.clip_norm))
    if config.weight_decay and not config.l2_in_loss:
        parts.append(optax.add_decayed_weights(config.weight_decay))
    parts.append(optax.sgd(schedule, momentum=config.momentum, nesterov=config.nesterov))
    if config.rho == 0:
        return optax.chain(sam_optax.sam(0.0, axis_name=axis_name), *parts)
    method = configs.METHODS[config.method]
    options = _method_options(config, axis_name)
    tx = method.build(config, options, total_steps, optax.chain(*parts))
    return tx if method.wraps_base else optax.chain(tx, *parts)


def normalizer(dataset: input_pipeline.Dataset) -> Callable[[jax.Array], jax.Array]:
    """``x -> (x - mean) / std`` per channel with the dataset's statistics, in float32."""
    mean, std = (jnp.asarray(v, jnp.float32)[None, None, None, :] for v in dataset.mean_std)

    def normalize(x: jax.Array) -> jax.Array:
        return (x.astype(jnp.float32) - mean) / std

    return normalize


def l2_penalty(params: Any) -> jax.Array:
    r""":math:`\frac12 \sum_i \|w_i\|^2` over every parameter (the paper's code's weight decay)."""
    return 0.5 * sum(jnp.sum(jnp.square(w)) for w in jax.tree.leaves(params))


def make_loss(model, normalize, config: configs.Config, num_classes: int, per_example=False):
    """``loss(params, batch, batch_stats, rng) -> (objective, (new_batch_stats, metrics))``.

    The model's pass is :func:`sam_optax.flax.linen_loss_fn` (training mode:
    BatchNorm normalizes with the batch's statistics and the new statistics
    come from this, the clean, pass). The objective is the (label-smoothed)
    cross entropy, plus ``weight_decay * l2_penalty`` with ``l2_in_loss``;
    ``metrics`` holds the cross entropy (``loss``) and the accuracy of the
    pass. Augmentation and dropout draw from ``rng``, which the SAM step
    passes unchanged to both passes. With ``per_example`` (ESAM) the objective
    is the vector of per-example objectives (their mean is the loss).
    """

    def criterion(logits: jax.Array, y: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        targets = optax.smooth_labels(jax.nn.one_hot(y, num_classes), config.label_smoothing)
        losses = optax.softmax_cross_entropy(logits, targets)
        xent = losses.mean()
        metrics = {"loss": xent, "accuracy": jnp.mean(jnp.argmax(logits, -1) == y)}
        return (losses if per_example else xent), metrics

    forward = sam_flax.linen_loss_fn(model.apply, criterion, has_aux=True, train=True)
    decay = config.weight_decay if config.l2_in_loss else 0.0

    def loss(params, batch, batch_stats, rng):
        x, y = batch
        aug_key, dropout_key = jax.random.split(rng)
        x = augment(normalize(x), aug_key, config.augment)
        xent, aux = forward(params, (x, y), batch_stats, dropout_key)
        return (xent + decay * l2_penalty(params) if decay else xent), aux

    return loss


def make_eval(model, normalize):
    """``evaluate(params, batch_stats, x, y) -> (mean loss, accuracy)`` in chunks of EVAL_BATCH.

    The model in evaluation mode (running BatchNorm statistics, no dropout),
    through :func:`sam_optax.flax.linen_loss_fn`.
    """

    def criterion(logits: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return jnp.sum(losses), jnp.sum(jnp.argmax(logits, -1) == y)

    forward = sam_flax.linen_loss_fn(
        model.apply, criterion, update_batch_stats=False, has_aux=True, train=False
    )

    @jax.jit
    def eval_batch(params, batch_stats, x, y):
        total, (_, correct) = forward(params, (normalize(x), y), batch_stats)
        return total, correct

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


@dataclasses.dataclass(frozen=True)
class Trainer:
    """A compiled training setup: data, mesh, step, evaluation and the placed initial state.

    Immutable: the training loop passes the state along
    (``{'params', 'batch_stats', 'opt_state'}``, starting from
    ``initial_state``) and hands it to :attr:`step`.
    """

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
    initial_state: dict[str, Any]

    def batch(self, indices: np.ndarray) -> Any:
        """The global batch of these example indices; each process feeds its own slice."""
        local = indices.reshape(jax.process_count(), -1)[jax.process_index()]
        x, y = self.dataset.x_train[local], self.y_train[local]
        return parallel.shard_batch((x, y), self.mesh, self.data_axes)


def training_labels(
    config: configs.Config, dataset: input_pipeline.Dataset
) -> tuple[np.ndarray, np.ndarray | None]:
    """The training labels, with ``config.label_noise`` of them flipped, and which were."""
    if config.label_noise == 0:
        return dataset.y_train, None
    return input_pipeline.symmetric_label_noise(
        dataset.y_train, config.label_noise, dataset.num_classes, config.seed
    )


def build_trainer(config: configs.Config, dataset: input_pipeline.Dataset | None = None) -> Trainer:
    """Everything a run of ``config`` needs, placed on the mesh of all devices."""
    n_devices = jax.device_count()
    configs.validate(config, n_devices)
    dataset = dataset or input_pipeline.load(config.dataset, config.data_dir)
    y_train, flipped = training_labels(config, dataset)
    steps_per_epoch = len(dataset.x_train) // config.batch_size
    if steps_per_epoch == 0:
        raise UsageError(
            f"--batch-size {config.batch_size} is larger than the "
            f"{len(dataset.x_train)} training examples."
        )
    shape = configs.mesh_shape(config, n_devices)
    mesh = jax.make_mesh(
        tuple(shape.values()), tuple(shape), axis_types=(jax.sharding.AxisType.Auto,) * len(shape)
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
    per_example = config.rho > 0 and configs.METHODS[config.method].per_example
    _check_perturbed_params(config, variables["params"])
    step = parallel.shard_map_step(
        make_loss(model, normalize, config, dataset.num_classes, per_example),
        tx,
        mesh,
        axis_name=axes,
        group_size=group_size,
        has_aux=True,
        per_example=per_example,
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
        evaluate=make_eval(model, normalize),
        schedule=optax.cosine_decay_schedule(config.lr, total_steps),
        initial_state=state,
    )
