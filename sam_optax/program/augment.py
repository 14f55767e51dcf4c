"""On-device data augmentation: random flips, 4-pixel pad + random crop, cutout.

Pure JAX functions of a batch and a key, run inside the jitted train step
(per device, the same key in both SAM passes, so both see the same images).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sam_optax.program.configs import AUGMENTATIONS

__all__ = ["AUGMENTATIONS", "augment", "cutout", "flip_crop"]


def flip_crop(x: jax.Array, key: jax.Array, pad: int = 4) -> jax.Array:
    """Random horizontal flip, then zero-pad ``pad`` pixels and crop back at random."""
    n, h, w, _ = x.shape
    k_flip, k_y, k_x = jax.random.split(key, 3)
    flip = jax.random.bernoulli(k_flip, 0.5, (n,))
    x = jnp.where(flip[:, None, None, None], x[:, :, ::-1, :], x)
    padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    dy = jax.random.randint(k_y, (n,), 0, 2 * pad + 1)
    dx = jax.random.randint(k_x, (n,), 0, 2 * pad + 1)
    crop = lambda img, i, j: jax.lax.dynamic_slice(img, (i, j, 0), (h, w, img.shape[-1]))  # noqa: E731
    return jax.vmap(crop)(padded, dy, dx)


def cutout(x: jax.Array, key: jax.Array, size: int = 16) -> jax.Array:
    """Zeroes a ``size x size`` square at a random centre of each image (DeVries & Taylor)."""
    n, h, w, _ = x.shape
    k_y, k_x = jax.random.split(key)
    cy = jax.random.randint(k_y, (n, 1, 1), 0, h)
    cx = jax.random.randint(k_x, (n, 1, 1), 0, w)
    ys = jnp.arange(h)[None, :, None]
    xs = jnp.arange(w)[None, None, :]
    inside = (
        (ys >= cy - size // 2)
        & (ys < cy + (size + 1) // 2)
        & (xs >= cx - size // 2)
        & (xs < cx + (size + 1) // 2)
    )
    return jnp.where(inside[..., None], jnp.zeros_like(x), x)


def augment(x: jax.Array, key: jax.Array, kind: str) -> jax.Array:
    if kind == "none":
        return x
    k1, k2 = jax.random.split(key)
    x = flip_crop(x, k1)
    if kind == "cutout":
        x = cutout(x, k2, size=max(1, x.shape[1] // 2))
    return x
