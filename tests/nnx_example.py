"""The model and step of the official Flax NNX MNIST example, re-expressed here.

The shape of google/flax ``examples/mnist/train.py`` (and ``docs_nnx/mnist_tutorial``)
as a user would have it, written for these tests: a CNN with BatchNorm and
dropout whose ``nnx.Rngs`` are passed to the loss as an argument (not held by
the model), a loss returning ``(loss, logits)``, ``nnx.MultiMetric`` updated
inside the jitted step, ``optimizer.update(model, grads)``. Below it, the two
ways to switch that step to SAM.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from sam_optax import flax as sam_flax


class ExampleCNN(nnx.Module):
    """Two 3x3 convolutions (32, 64) with BatchNorm, average pooling, dense 256, 10 classes."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 32, kernel_size=(3, 3), rngs=rngs)
        self.batch_norm1 = nnx.BatchNorm(32, rngs=rngs)
        self.dropout1 = nnx.Dropout(rate=0.25)
        self.conv2 = nnx.Conv(32, 64, kernel_size=(3, 3), rngs=rngs)
        self.batch_norm2 = nnx.BatchNorm(64, rngs=rngs)
        self.pool = partial(nnx.avg_pool, window_shape=(2, 2), strides=(2, 2))
        self.linear1 = nnx.Linear(7 * 7 * 64, 256, rngs=rngs)
        self.dropout2 = nnx.Dropout(rate=0.25)
        self.linear2 = nnx.Linear(256, 10, rngs=rngs)

    def __call__(self, x: jax.Array, rngs: nnx.Rngs | None) -> jax.Array:
        x = self.pool(nnx.relu(self.batch_norm1(self.dropout1(self.conv1(x), rngs=rngs))))
        x = self.pool(nnx.relu(self.batch_norm2(self.conv2(x))))
        x = nnx.relu(self.dropout2(self.linear1(x.reshape(x.shape[0], -1)), rngs=rngs))
        return self.linear2(x)


def loss_fn(model: ExampleCNN, batch: dict, rngs: nnx.Rngs | None):
    logits = model(batch["image"], rngs)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    return loss, logits


def make_metrics() -> nnx.MultiMetric:
    return nnx.MultiMetric(accuracy=nnx.metrics.Accuracy(), loss=nnx.metrics.Average("loss"))


def make_batch(seed: int, size: int = 16) -> dict:
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {
        "image": jax.random.uniform(k1, (size, 28, 28, 1)),
        "label": jax.random.randint(k2, (size,), 0, 10),
    }


# The example's own step (plain optax).
@nnx.jit
def train_step(model, optimizer, metrics, batch, rngs):
    (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, batch, rngs)
    metrics.update(loss=loss, logits=logits, labels=batch["label"])
    optimizer.update(model, grads)


# SAM, first way: nnx.value_and_grad -> sam_flax.nnx_value_and_grad, value_fn to update.
@nnx.jit
def sam_train_step(model, optimizer, metrics, batch, rngs):
    (loss, logits), grads, value_fn = sam_flax.nnx_value_and_grad(loss_fn, has_aux=True)(
        model, batch, rngs
    )
    metrics.update(loss=loss, logits=logits, labels=batch["label"])
    optimizer.update(model, grads, value_fn=value_fn)


# SAM, the closure alone: nnx_value_fn built before the clean pass (it
# snapshots the model and the Rngs), the example's own nnx.value_and_grad.
@nnx.jit
def sam_train_step_value_fn(model, optimizer, metrics, batch, rngs):
    value_fn = sam_flax.nnx_value_fn(model, loss_fn, batch, rngs, has_aux=True)
    (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, batch, rngs)
    metrics.update(loss=loss, logits=logits, labels=batch["label"])
    optimizer.update(model, grads, value_fn=value_fn)


# SAM, second way: the library's step inside the user's jit, metrics updated there.
_sam_step = sam_flax.nnx_train_step(loss_fn, has_aux=True)


@nnx.jit
def sam_train_step_builtin(model, optimizer, metrics, batch, rngs):
    loss, logits = _sam_step(model, optimizer, batch, rngs)
    metrics.update(loss=loss, logits=logits, labels=batch["label"])


def state_of(model, optimizer, metrics, rngs) -> dict:
    """Everything a step changes, as pure arrays (for bit-for-bit comparisons)."""
    return {
        "model": nnx.as_pure(nnx.state(model)),
        "opt": nnx.as_pure(nnx.state(optimizer, nnx.OptState)),
        "metrics": {k: jnp.asarray(v) for k, v in metrics.compute().items()},
        "rngs": jax.tree.map(
            lambda x: jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x,
            nnx.as_pure(nnx.state(rngs)),
        ),
    }
