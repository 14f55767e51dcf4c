"""Hessian spectrum by Lanczos (section 4.2): top eigenvalues and spectral density.

Hessian-vector products are forward-over-reverse (``jax.jvp`` of
``jax.grad``); the Hessian is never materialized. Lanczos keeps its whole
basis to reorthogonalize fully at each iteration, so its memory is
``(num_iterations + 3) x n_params`` numbers (plus one gradient's
activations); the iterations run inside one ``lax.scan`` (unrolled on CPU,
see ``_loops.py``), never a Python loop.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from sam_optax.analysis._loops import resolve_unroll
from sam_optax.analysis._loops import scan

__all__ = ["hessian_spectral_density", "hessian_top_eigenvalues", "hvp_fn", "lanczos"]


def hvp_fn(
    loss_fn: Callable[..., jax.Array],
    params: Any,
    batches: Sequence[Any] | Any | None = None,
    unroll: bool | int | None = None,
) -> tuple[jax.tree_util.Partial, int, Any]:
    """A flat Hessian-vector product ``v -> H v`` of ``loss_fn`` at ``params``.

    With ``batches`` (a *list* of batches, or one pytree, e.g. a tuple
    ``(x, y)``, whose leaves have a leading batches axis),
    ``loss_fn(params, batch)`` and the product is averaged over the batches,
    one after the other.

    The product is a ``jax.tree_util.Partial`` whose leaves are the flat
    params and the batches: passed to a jitted function they are traced
    arguments, not constants folded into the program.

    Returns ``(hvp, n, dtype)`` with ``n`` the number of parameters.
    """
    flat, unravel = ravel_pytree(params)
    if batches is None:

        def hvp_at(x, v):
            return jax.jvp(jax.grad(lambda y: loss_fn(unravel(y))), (x,), (v,))[1]

        partial = jax.tree_util.Partial(hvp_at, flat)
        partial.unroll = resolve_unroll(unroll, lambda x: loss_fn(unravel(x)), flat)
        return partial, flat.size, flat.dtype

    if isinstance(batches, list):
        batches = jax.tree.map(lambda *xs: jnp.stack(xs), *batches)

    count = jax.tree.leaves(batches)[0].shape[0]
    first = jax.tree.map(lambda b: b[0], batches)
    unroll = resolve_unroll(unroll, lambda x: loss_fn(unravel(x), first), flat)

    def hvp_batches(x, stacked, v):
        def one(total, batch):
            g = jax.grad(lambda y: loss_fn(unravel(y), batch))
            return total + jax.jvp(g, (x,), (v,))[1], None

        return scan(one, jnp.zeros_like(v), stacked, unroll=unroll)[0] / count

    partial = jax.tree_util.Partial(hvp_batches, flat, batches)
    partial.unroll = unroll
    return partial, flat.size, flat.dtype


def lanczos(
    hvp: Callable[[jax.Array], jax.Array],
    n: int,
    num_iterations: int,
    key: jax.Array,
    dtype: Any = jnp.float32,
    unroll: bool | int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Lanczos tridiagonalization with full reorthogonalization.

    Starts from a normalized Gaussian vector. When the Krylov space is
    exhausted (``beta`` ~ 0) it restarts from a fresh random vector
    orthogonal to the basis and records ``beta = 0``, so for
    ``num_iterations >= n`` the tridiagonal matrix holds the whole spectrum.

    Args:
      hvp: ``v -> H v`` on flat vectors of size ``n``.
      n: dimension.
      num_iterations: m, the size of the tridiagonal matrix.
      key: PRNG key of the start (and restart) vectors.
      dtype: dtype of the basis.
      unroll: ``lax.scan``'s unroll (default: the choice :func:`hvp_fn`
        recorded on ``hvp`` if it still carries it, else full on CPU).

    Returns:
      ``(alphas, betas)``: the diagonal (m,) and the off-diagonal (m - 1,).
    """
    m = int(num_iterations)
    if m < 1:
        raise ValueError(f"num_iterations must be >= 1, got {num_iterations}.")
    k0, key = jax.random.split(key)
    v0 = jax.random.normal(k0, (n,), dtype)
    basis = jnp.zeros((m + 1, n), dtype).at[0].set(v0 / jnp.linalg.norm(v0))
    tol = jnp.finfo(dtype).eps ** 0.5

    def orthogonalize(w, basis):
        # Twice is enough (Kahan-Parlett); rows not yet filled are zero.
        w = w - basis.T @ (basis @ w)
        return w - basis.T @ (basis @ w)

    def body(carry, i):
        basis, alphas, betas = carry
        v = basis[i]
        w = hvp(v)
        alpha = jnp.vdot(w, v)
        w = orthogonalize(w, basis)
        beta = jnp.linalg.norm(w)
        fresh = orthogonalize(jax.random.normal(jax.random.fold_in(key, i), (n,), dtype), basis)
        restart = beta < tol * (jnp.abs(alpha) + 1.0)
        w = jnp.where(restart, fresh, w)
        norm = jnp.linalg.norm(w)
        nxt = jnp.where(norm > 0, w / jnp.where(norm > 0, norm, 1.0), 0.0)
        basis = basis.at[i + 1].set(nxt)
        return (
            basis,
            alphas.at[i].set(alpha),
            betas.at[i].set(jnp.where(restart, 0.0, beta)),
        ), None

    init = (basis, jnp.zeros(m, dtype), jnp.zeros(m, dtype))
    if unroll is None:
        unroll = getattr(hvp, "unroll", None)
    (_, alphas, betas), _ = scan(body, init, jnp.arange(m), unroll=resolve_unroll(unroll))
    return alphas, betas[:-1]


def _tridiagonal(alphas: jax.Array, betas: jax.Array) -> jax.Array:
    return jnp.diag(alphas) + jnp.diag(betas, 1) + jnp.diag(betas, -1)


def hessian_top_eigenvalues(
    loss_fn: Callable[..., jax.Array],
    params: Any,
    k: int = 5,
    *,
    batches: Sequence[Any] | Any | None = None,
    num_iterations: int | None = None,
    key: jax.Array | None = None,
    unroll: bool | int | None = None,
) -> jax.Array:
    r"""The ``k`` largest eigenvalues of the Hessian of ``loss_fn`` at ``params``, descending.

    The Ritz values of ``num_iterations`` steps of Lanczos with full
    reorthogonalization (default ``min(n, max(4 k, 40))``); the extreme
    eigenvalues converge first. :math:`\lambda_{max}` is the first, and
    ``lams[0] / lams[4]`` is the paper's :math:`\lambda_{max}/\lambda_5`.
    Memory: ``(num_iterations + 3) x n_params`` numbers.

    Args:
      loss_fn: ``loss_fn(params)``, or ``loss_fn(params, batch)`` with ``batches``.
      params: any pytree of arrays.
      k: number of eigenvalues.
      batches: batches to average the Hessian over (see :func:`hvp_fn`).
      num_iterations: Lanczos iterations.
      key: PRNG key of the start vector (default ``jax.random.key(0)``).
      unroll: how the iterations are compiled (default: unrolled on CPU when
        the loss convolves, where XLA runs convolutions inside loops 20-30x
        slower; a loop otherwise).

    Returns:
      An array of ``k`` eigenvalues, largest first.

    Examples:
      >>> import jax.numpy as jnp
      >>> from sam_optax.analysis import hessian_top_eigenvalues
      >>> loss = lambda w: 0.5 * jnp.sum(jnp.arange(1.0, 11.0) * w**2)
      >>> print(hessian_top_eigenvalues(loss, jnp.zeros(10), k=3).round(3))
      [10.  9.  8.]
    """
    hvp, n, dtype = hvp_fn(loss_fn, params, batches, unroll)
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}] (the number of parameters), got {k}.")
    m = min(n, num_iterations if num_iterations is not None else max(4 * k, 40))
    if m < k:
        raise ValueError(f"num_iterations={m} must be >= k={k}.")
    key = jax.random.key(0) if key is None else key
    alphas, betas = jax.jit(lanczos, static_argnums=(1, 2, 4, 5))(hvp, n, m, key, dtype, hvp.unroll)
    return jnp.linalg.eigvalsh(_tridiagonal(alphas, betas))[::-1][:k]


def hessian_spectral_density(
    loss_fn: Callable[..., jax.Array],
    params: Any,
    *,
    batches: Sequence[Any] | Any | None = None,
    num_iterations: int = 60,
    num_draws: int = 4,
    grid: jax.Array | None = None,
    sigma: float | None = None,
    key: jax.Array | None = None,
    unroll: bool | int | None = None,
) -> tuple[jax.Array, jax.Array, tuple[jax.Array, jax.Array]]:
    r"""Hessian eigenvalue density by stochastic Lanczos quadrature (Ghorbani et al., 2019).

    Each of ``num_draws`` Lanczos runs from a random start gives nodes
    :math:`\theta_j` (the eigenvalues of its tridiagonal matrix) and weights
    :math:`\tau_j` (the squared first components of their eigenvectors); the
    density is the average of :math:`\sum_j \tau_j\,\mathcal N(x;
    \theta_j, \sigma^2)`, which integrates to one.

    Args:
      loss_fn, params, batches: as in :func:`hessian_top_eigenvalues`.
      num_iterations: Lanczos iterations per draw.
      num_draws: independent start vectors (one compiled Lanczos, called per draw).
      grid: where to evaluate the density (default: 512 points spanning the nodes).
      sigma: Gaussian width (default: 1% of the span of the nodes).
      key: PRNG key.
      unroll: as in :func:`hessian_top_eigenvalues`.

    Returns:
      ``(grid, density, (nodes, weights))`` with nodes and weights of shape
      ``(num_draws, num_iterations)``.
    """
    hvp, n, dtype = hvp_fn(loss_fn, params, batches, unroll)
    loop_unroll = hvp.unroll
    m = min(int(num_iterations), n)
    key = jax.random.key(0) if key is None else key

    @jax.jit
    def draw(hvp, k):
        alphas, betas = lanczos(hvp, n, m, k, dtype, loop_unroll)
        theta, vecs = jnp.linalg.eigh(_tridiagonal(alphas, betas))
        return theta, vecs[0] ** 2

    # The draws are independent Lanczos runs: one compiled program, called per draw.
    nodes, weights = (
        jnp.stack(z)
        for z in zip(*(draw(hvp, k) for k in jax.random.split(key, num_draws)), strict=True)
    )
    lo, hi = jnp.min(nodes), jnp.max(nodes)
    span = jnp.maximum(hi - lo, 1e-12)
    sigma = 0.01 * span if sigma is None else sigma
    if grid is None:
        grid = jnp.linspace(lo - 5 * sigma, hi + 5 * sigma, 512)
    gauss = jnp.exp(-0.5 * ((grid[:, None, None] - nodes[None]) / sigma) ** 2) / (
        sigma * jnp.sqrt(2 * jnp.pi)
    )
    density = jnp.sum(gauss * weights[None], axis=2).mean(axis=1)
    return grid, density, (nodes, weights)
