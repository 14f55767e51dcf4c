"""A small CNN with BatchNorm and Dropout, in NNX and in Linen, for the Flax tests."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx


class NNXNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, dropout: float = 0.3):
        self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(4, momentum=0.9, rngs=rngs)
        self.drop = nnx.Dropout(dropout, rngs=rngs)
        self.dense = nnx.Linear(4 * 8 * 8, 3, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.relu(self.bn(self.conv(x)))
        x = self.drop(x)
        return self.dense(x.reshape(x.shape[0], -1))


class LinenNet(nn.Module):
    dropout: float = 0.3

    @nn.compact
    def __call__(self, x, train: bool = True, frozen_bn: bool = False):
        x = nn.Conv(4, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=not train or frozen_bn, momentum=0.9)(x)
        x = nn.Dropout(self.dropout, deterministic=not train)(jax.nn.relu(x))
        return nn.Dense(3)(x.reshape(x.shape[0], -1))


def xent(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def nnx_loss(model, batch):
    x, y = batch
    return xent(model(x), y)


def make_batch(seed: int = 0, size: int = 32):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(size, 8, 8, 1)).astype(np.float32)
    y = (np.arange(size) % 3).astype(np.int32)
    return jnp.asarray(x), jnp.asarray(y)
