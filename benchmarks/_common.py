"""Shared pieces of the benchmarks: the benchmark CNN and an interleaved timer.

The CNN is the one the issues name: two 3x3 convolutions (32 and 64 channels)
each followed by 2x2 max pooling, a dense layer of 256, 10 classes; inputs are
32x32x3, batch 128. Written in plain JAX so the benchmarks measure optax and
sam_optax, not a model library.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

BATCH = 128


def init_cnn(key: jax.Array) -> dict:
    k1, k2, k3, k4 = jax.random.split(key, 4)

    def he(k, shape, fan_in):
        return jax.random.normal(k, shape) * np.sqrt(2.0 / fan_in)

    return {
        "conv1": {"w": he(k1, (3, 3, 3, 32), 27), "b": jnp.zeros(32)},
        "conv2": {"w": he(k2, (3, 3, 32, 64), 288), "b": jnp.zeros(64)},
        "dense1": {"w": he(k3, (8 * 8 * 64, 256), 4096), "b": jnp.zeros(256)},
        "dense2": {"w": he(k4, (256, 10), 256), "b": jnp.zeros(10)},
    }


def _conv(x, p):
    y = jax.lax.conv_general_dilated(
        x, p["w"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return y + p["b"][None, None, None, :]


def _pool(x):
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def cnn_apply(params: dict, x: jax.Array) -> jax.Array:
    x = _pool(jax.nn.relu(_conv(x, params["conv1"])))
    x = _pool(jax.nn.relu(_conv(x, params["conv2"])))
    x = x.reshape(x.shape[0], -1)
    x = jax.nn.relu(x @ params["dense1"]["w"] + params["dense1"]["b"][None, :])
    return x @ params["dense2"]["w"] + params["dense2"]["b"][None, :]


def cnn_loss(params: dict, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
    x, y = batch
    logits = cnn_apply(params, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def make_batch(key: jax.Array, batch: int = BATCH) -> tuple[jax.Array, jax.Array]:
    kx, ky = jax.random.split(key)
    return jax.random.normal(kx, (batch, 32, 32, 3)), jax.random.randint(ky, (batch,), 0, 10)


def init_mlp(key: jax.Array, sizes=(64, 256, 256, 10)) -> dict:
    """The program's default MLP on digits-sized inputs (64 features)."""
    keys = jax.random.split(key, len(sizes) - 1)
    return {
        f"dense{i}": {
            "w": jax.random.normal(k, (m, n)) * np.sqrt(2.0 / m),
            "b": jnp.zeros(n),
        }
        for i, (k, m, n) in enumerate(zip(keys, sizes[:-1], sizes[1:]))
    }


BIG_MLP = (512, 2048, 2048, 2048, 10)
"""The memory benchmark's MLP: 9.5M float32 params, where params-sized buffers dominate."""


def init_big_mlp(key: jax.Array) -> dict:
    return init_mlp(key, BIG_MLP)


def make_big_mlp_batch(key: jax.Array, batch: int = BATCH) -> tuple[jax.Array, jax.Array]:
    kx, ky = jax.random.split(key)
    return jax.random.normal(kx, (batch, BIG_MLP[0])), jax.random.randint(ky, (batch,), 0, 10)


def mlp_loss(params: dict, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
    x, y = batch
    layers = [params[f"dense{i}"] for i in range(len(params))]
    for layer in layers[:-1]:
        x = jax.nn.relu(x @ layer["w"] + layer["b"][None, :])
    logits = x @ layers[-1]["w"] + layers[-1]["b"][None, :]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def make_mlp_batch(key: jax.Array, batch: int = 64) -> tuple[jax.Array, jax.Array]:
    kx, ky = jax.random.split(key)
    return jax.random.normal(kx, (batch, 64)), jax.random.randint(ky, (batch,), 0, 10)


def nbytes(tree) -> int:
    return sum(int(np.asarray(x).nbytes) for x in jax.tree.leaves(tree))


def interleaved_medians(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 3
) -> dict[str, float]:
    """Runs each zero-argument function in turn, ``repeats`` rounds; medians in seconds.

    Interleaving spreads the machine's noise over all candidates alike; the
    numbers to read are the ratios between them, not the absolute times.
    """
    for fn in fns.values():
        for _ in range(warmup):
            jax.block_until_ready(fn())
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}
