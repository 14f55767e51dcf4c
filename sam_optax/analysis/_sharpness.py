"""Sharpness by projected gradient ascent (appendix C.6) and m-sharpness (section 4.1)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from sam_optax._directions import ascent_direction
from sam_optax._directions import project_to_ball
from sam_optax._groups import stack_groups
from sam_optax.analysis._loops import resolve_unroll
from sam_optax.analysis._loops import scan

__all__ = ["ascent_perturbation", "m_sharpness", "sharpness"]


def ascent_perturbation(
    loss_fn: Callable[[Any], jax.Array],
    params: Any,
    rho: jax.typing.ArrayLike,
    ascent_steps: int = 1,
    *,
    unroll: bool | int | None = None,
    **direction_kwargs: Any,
) -> Any:
    r"""The perturbation found by ``ascent_steps`` steps of projected gradient ascent.

    :math:`\epsilon_1 = \hat\epsilon(w)` of eq. (2) (:func:`sam_optax.ascent_direction`),
    then :math:`\epsilon_{j+1} = \Pi_\rho(\epsilon_j + \hat\epsilon(w + \epsilon_j))`
    (:func:`sam_optax.project_to_ball`): the same iteration as
    ``sam(ascent_steps=k)``. The result lies in the :math:`\rho`-ball.

    Args:
      loss_fn: ``loss_fn(params) -> scalar``.
      params: the point :math:`w`.
      rho: radius.
      ascent_steps: number of steps (1 is SAM's single step).
      unroll: how the steps are compiled (default: unrolled on CPU when the
        loss convolves, see ``sam_optax.analysis._loops``).
      **direction_kwargs: ``norm``, ``adaptive``, ``eta``, ``mask`` as in
        :func:`sam_optax.ascent_direction`.

    Returns:
      :math:`\epsilon`, a tree like ``params``.
    """
    if int(ascent_steps) < 1:
        raise ValueError(f"ascent_steps must be >= 1, got {ascent_steps}.")
    grad = jax.grad(loss_fn)

    def direction(w: Any, w_eps: Any) -> Any:
        return ascent_direction(grad(w_eps), rho, params=w, **direction_kwargs)

    def step(carry: tuple[Any, Any], _: Any) -> tuple[tuple[Any, Any], None]:
        # The params ride in the carry: traced, not constants of the loop.
        w, perturbation = carry
        moved = jax.tree.map(
            jnp.add, perturbation, direction(w, jax.tree.map(jnp.add, w, perturbation))
        )
        return (w, project_to_ball(moved, rho, params=w, **direction_kwargs)), None

    perturbation = direction(params, params)
    if int(ascent_steps) == 1:
        return perturbation
    unroll = resolve_unroll(unroll, loss_fn, params)
    (_, perturbation), _ = scan(
        step, (params, perturbation), None, length=int(ascent_steps) - 1, unroll=unroll
    )
    return perturbation


def sharpness(
    loss_fn: Callable[[Any], jax.Array],
    params: Any,
    rho: jax.typing.ArrayLike,
    ascent_steps: int = 1,
    **direction_kwargs: Any,
) -> jax.Array:
    r"""Estimated sharpness :math:`\max_{\|\epsilon\| \le \rho} L(w + \epsilon) - L(w)`.

    The maximum is estimated by :func:`ascent_perturbation` (Table 11's
    "estimated sharpness" with k = ``ascent_steps``). Costs ``ascent_steps``
    gradients and two loss evaluations.

    Examples:
      >>> import jax.numpy as jnp
      >>> from sam_optax.analysis import sharpness
      >>> loss = lambda w: 0.5 * jnp.sum(jnp.array([4.0, 1.0]) * w**2)
      >>> print(round(float(sharpness(loss, jnp.array([1.0, 1.0]), 0.1)), 4))
      0.4314
    """
    perturbation = ascent_perturbation(loss_fn, params, rho, ascent_steps, **direction_kwargs)
    return loss_fn(jax.tree.map(jnp.add, params, perturbation)) - loss_fn(params)


def m_sharpness(
    loss_fn: Callable[[Any, Any], jax.Array],
    params: Any,
    batch: Any,
    rho: jax.typing.ArrayLike,
    m: int,
    ascent_steps: int = 1,
    *,
    unroll: bool | int | None = None,
    **direction_kwargs: Any,
) -> jax.Array:
    r"""m-sharpness (section 4.1): the mean over disjoint groups of m examples of each group's sharpness.

    The batch's leading axis splits into ``n // m`` consecutive groups;
    each gets its own :func:`sharpness` with ``loss_fn(params, group)``.
    The groups run one after the other (one ``lax.scan``, unrolled on CPU),
    so memory stays that of one group.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar`` (a mean over the batch).
      params: the point :math:`w`.
      batch: a pytree whose leaves share the leading axis.
      rho: radius.
      m: examples per group; must divide the batch.
      ascent_steps: steps of projected ascent per group.
      unroll: as in :func:`ascent_perturbation`.
      **direction_kwargs: as in :func:`sharpness`.

    Returns:
      The mean of the groups' sharpness.
    """
    groups = stack_groups(batch, m)
    n_groups = jax.tree.leaves(groups)[0].shape[0]

    def one(total: jax.Array, group: Any) -> tuple[jax.Array, None]:
        value = sharpness(
            lambda p: loss_fn(p, group),
            params,
            rho,
            ascent_steps,
            unroll=unroll,
            **direction_kwargs,
        )
        return total + value, None

    unroll = resolve_unroll(unroll, loss_fn, params, jax.tree.map(lambda g: g[0], groups))
    total, _ = scan(one, jnp.zeros(()), groups, unroll=unroll)
    return total / n_groups
