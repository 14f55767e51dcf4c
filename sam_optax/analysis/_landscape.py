"""Loss landscapes along filter-normalized random directions (Li et al., 2017; the paper's Figure 1)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["filter_normalized_direction", "loss_landscape_1d", "loss_landscape_2d"]


def filter_normalized_direction(key: jax.Array, params: Any, *, ignore_1d: bool = True) -> Any:
    r"""A Gaussian direction with each filter rescaled to its parameter filter's norm.

    For every leaf with two or more axes (Flax ``Conv`` and ``Dense``
    kernels) a filter is a slice along the LAST axis (one output feature):
    :math:`d_j \leftarrow d_j \|w_j\| / \|d_j\|`. One-dimensional leaves
    (biases, BatchNorm scales and offsets) get zero by default, as in Li et
    al.; with ``ignore_1d=False`` each is rescaled as a whole to its norm.

    Args:
      key: PRNG key.
      params: the parameters (any pytree).
      ignore_1d: zero the direction on leaves with fewer than two axes.

    Returns:
      A direction shaped like ``params``.
    """
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    out = []
    for k, w in zip(keys, leaves, strict=True):
        w = jnp.asarray(w)
        d = jax.random.normal(k, w.shape, jnp.promote_types(w.dtype, jnp.float32))
        if w.ndim < 2:
            d = jnp.zeros_like(d) if ignore_1d else d * jnp.linalg.norm(w) / jnp.linalg.norm(d)
        else:
            axes = tuple(range(w.ndim - 1))
            d_norm = jnp.sqrt(jnp.sum(d**2, axis=axes, keepdims=True))
            w_norm = jnp.sqrt(jnp.sum(w.astype(d.dtype) ** 2, axis=axes, keepdims=True))
            d = d * w_norm / jnp.where(d_norm > 0, d_norm, 1.0)
        out.append(d.astype(w.dtype))
    return jax.tree.unflatten(treedef, out)


def _shifted(params: Any, steps: tuple[jax.Array, ...], directions: tuple[Any, ...]) -> Any:
    def shift(w, *ds):
        total = w
        for s, d in zip(steps, ds, strict=True):
            total = total + (s * d).astype(w.dtype)
        return total

    return jax.tree.map(shift, params, *directions)


def loss_landscape_1d(
    loss_fn: Callable[[Any], jax.Array],
    params: Any,
    direction: Any = None,
    *,
    alphas: jax.Array | None = None,
    key: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """``L(w + alpha d)`` for each ``alpha`` (default: 41 points in [-1, 1]).

    ``direction`` defaults to :func:`filter_normalized_direction` drawn from
    ``key``. One compiled evaluation (params and direction as arguments),
    called per point: memory of one forward pass, no loop for XLA to slow.
    """
    if direction is None:
        direction = filter_normalized_direction(jax.random.key(0) if key is None else key, params)
    alphas = jnp.linspace(-1.0, 1.0, 41) if alphas is None else jnp.asarray(alphas)
    at = jax.jit(lambda p, d, s: loss_fn(_shifted(p, (s,), (d,))))
    return alphas, jnp.stack([at(params, direction, a) for a in alphas])


def loss_landscape_2d(
    loss_fn: Callable[[Any], jax.Array],
    params: Any,
    directions: tuple[Any, Any] | None = None,
    *,
    alphas: jax.Array | None = None,
    betas: jax.Array | None = None,
    key: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``Z[i, j] = L(w + alphas[i] d1 + betas[j] d2)`` (default: 21 x 21 points in [-1, 1]^2)."""
    if directions is None:
        k1, k2 = jax.random.split(jax.random.key(0) if key is None else key)
        directions = (
            filter_normalized_direction(k1, params),
            filter_normalized_direction(k2, params),
        )
    alphas = jnp.linspace(-1.0, 1.0, 21) if alphas is None else jnp.asarray(alphas)
    betas = jnp.linspace(-1.0, 1.0, 21) if betas is None else jnp.asarray(betas)
    aa, bb = jnp.meshgrid(alphas, betas, indexing="ij")
    at = jax.jit(lambda p, ds, a, b: loss_fn(_shifted(p, (a, b), ds)))
    flat = jnp.stack(
        [at(params, directions, a, b) for a, b in zip(aa.ravel(), bb.ravel(), strict=True)]
    )
    return alphas, betas, flat.reshape(aa.shape)
