"""A small regression problem shared by the data-parallel tests and their worker.

Kept free of pytest so that ``tests/multiprocess_worker.py`` can import it in a
process of its own.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

N_IN, N_HIDDEN, BATCH = 5, 7, 64


def make_params(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "w1": rng.normal(size=(N_IN, N_HIDDEN)) * 0.7,
        "b1": rng.normal(size=(N_HIDDEN,)) * 0.1,
        "w2": rng.normal(size=(N_HIDDEN,)) * 0.7,
    }


def make_batch(seed: int = 1, size: int = BATCH) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(size, N_IN))
    y = np.sin(x @ np.arange(1, N_IN + 1) / N_IN) + 0.3 * rng.normal(size=size)
    return x, y


def loss(params, batch):
    x, y = batch
    h = jnp.tanh(x @ params["w1"] + params["b1"][None, :])
    return jnp.mean((h @ params["w2"] - y) ** 2)


def reference_sam_gradient(params, batch, rho: float):
    """SAM gradient of one shard written out by hand (eq. 2 and 3, p = 2)."""
    g = jax.grad(loss)(params, batch)
    norm = jnp.sqrt(sum(jnp.sum(v**2) for v in jax.tree.leaves(g)))
    perturbed = jax.tree.map(lambda w, v: w + rho * v / norm, params, g)
    return jax.grad(loss)(perturbed, batch)
