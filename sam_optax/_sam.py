"""``sam``: Sharpness-Aware Minimization as an optax transformation.

:func:`sam` validates its arguments and wires the stages of
:mod:`sam_optax._stages`; :func:`objective_from_args` turns ``tx.update``'s
extra arguments into the :class:`~sam_optax._stages.Objective` every factory
of the package works on.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Hashable
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax import _axes
from sam_optax import _checks
from sam_optax._directions import select
from sam_optax._stages import Ascent
from sam_optax._stages import Objective
from sam_optax._stages import sam_gradient

__all__ = ["GroupedObjective", "SAMState", "sam"]

DIRECTIONS = ("gradient", "random")


class SAMState(NamedTuple):
    """State of :func:`sam`: no copy of the params, only a few scalars.

    Attributes:
      count: number of updates taken (indexes a ``rho`` schedule), int32.
      key: raw ``uint32`` PRNG key data for ``direction='random'``, else ``None``.
    """

    count: jax.Array
    key: jax.Array | None


class GroupedObjective(NamedTuple):
    """m-sharpness on one device: several groups, one perturbation each.

    Pass it to ``tx.update(..., grouped_objective=GroupedObjective(...))`` in
    place of ``value_fn``. With ``G`` groups of the batch, group ``i`` gets its
    own :math:`\\hat\\epsilon_i` from its own gradient, and the SAM gradient is
    the mean over groups of :math:`\\nabla L_i(w + \\hat\\epsilon_i)`. All the
    groups are differentiated in one call of ``value_fn``, each against its own
    copy of the params, so no batched weights appear (that is what makes it as
    fast as one plain SAM step; see ``benchmarks/msharpness.py``).
    :func:`sam_optax.parallel.grouped_step` builds one for you.

    Attributes:
      value_fn: ``(params_0, ..., params_{G-1}) -> mean_i L_i(params_i)`` (a
        tuple of G param trees in; a scalar, or ``(scalar, aux)`` with
        ``has_aux=True``, out).
      grads: the G gradients ``grads[i] = grad L_i(params)``, each a tree like
        the params (the ascent directions; computing them is the caller's
        first pass).
    """

    value_fn: Callable[[tuple[Any, ...]], Any]
    grads: Sequence[Any]


def objective_from_args(
    updates: Any,
    params: Any,
    value_fn: Callable[[Any], Any] | None,
    grouped_objective: GroupedObjective | None,
    has_aux: bool,
    owner: str = "sam",
) -> Objective:
    """The :class:`Objective` of one ``tx.update`` call, its inputs checked.

    Either ``value_fn`` (one group: the incoming ``updates`` are its gradient)
    or a :class:`GroupedObjective`. Raises a clear error for a missing
    ``params`` or closure, trees that do not match the params, and (at trace
    time) a closure that does not return a scalar loss.
    """
    if params is None:
        raise ValueError(
            f"{owner}: update needs params (tx.update(grads, state, params, value_fn=...))."
        )
    _checks.check_tree_matches(updates, params, "updates", owner)
    if grouped_objective is None:
        user_fn = _checks.check_value_fn(value_fn, owner)
        loss = _checks.checked_loss(user_fn, has_aux, "value_fn", owner)
        return Objective(loss=lambda points: loss(points[0]), grads=[updates])
    if not isinstance(grouped_objective, GroupedObjective):
        raise TypeError(f"{owner}: grouped_objective must be a sam_optax.GroupedObjective.")
    grads = list(grouped_objective.grads)
    if not grads:
        raise ValueError(f"{owner}: grouped_objective.grads is empty.")
    for i, g in enumerate(grads):
        _checks.check_tree_matches(g, params, f"grouped_objective.grads[{i}]", owner)
    loss = _checks.checked_loss(
        grouped_objective.value_fn, has_aux, "grouped_objective.value_fn", owner
    )
    return Objective(loss=loss, grads=grads, name="grouped_objective.grads")


def check_local_gradients(
    objective: Objective, sel: Any, axis_name: Any, manual: tuple[Hashable, ...]
) -> None:
    """Refuses, inside ``shard_map``, a gradient that is the same on every device.

    A gradient taken with respect to replicated params inside ``shard_map`` is
    already summed over the devices (the gradient-sum trap): per-device
    perturbation would silently become a synced one, with an update
    n_devices times too large.
    """
    if not manual or not _axes.vma_checked(manual):
        return
    leaves = [jax.tree.leaves(g) for g in objective.grads]
    for b, g in enumerate(leaves):
        for i in sel.indices:
            if not set(manual) <= _axes.varying_axes(g[i]):
                name = objective.name if len(leaves) == 1 else f"{objective.name}[{b}]"
                raise ValueError(
                    f"sam(axis_name={axis_name!r}): the incoming gradient ({name}) "
                    f"is the same on every device of axis {manual}: it was "
                    "taken with respect to replicated params, and shard_map "
                    "has already summed it over the devices. Differentiate "
                    f"with respect to jax.lax.pcast(params, {manual!r}, "
                    "to='varying') to keep each device's own gradient, or "
                    "pass sync_perturbation=True."
                )


def check_no_complex_second_order(params: Any, sel: Any, ascent: Ascent) -> None:
    if not ascent.second_order:
        return
    leaves = jax.tree.leaves(params)
    for i in sel.indices:
        if jnp.iscomplexobj(leaves[i]):
            raise TypeError(
                f"sam(second_order=True) does not support complex params; leaf {i} "
                f"has dtype {leaves[i].dtype}. Use second_order=False, or mask that leaf out."
            )


def _validated_ascent(
    norm: Any,
    adaptive: bool,
    eta: Any,
    ascent_steps: Any,
    second_order: bool,
    mask: Any,
    direction: str,
    eps: Any,
) -> Ascent:
    norm = _checks.check_norm(norm)
    steps = _checks.check_positive_int("ascent_steps", ascent_steps)
    _checks.check_nonnegative("eta", eta)
    _checks.check_nonnegative("eps", eps)
    _checks.check_choice("direction", direction, DIRECTIONS)
    if (second_order or direction == "random") and not isinstance(steps, int):
        raise ValueError(
            "second_order=True and direction='random' need a concrete "
            "ascent_steps=1; with optax.inject_hyperparams pass "
            "static_args=('ascent_steps',)."
        )
    if second_order and steps != 1:
        raise ValueError(
            f"second_order=True supports ascent_steps=1 only (appendix C.4), got ascent_steps={steps}."
        )
    if direction == "random" and (second_order or steps != 1):
        raise ValueError("direction='random' takes neither second_order=True nor ascent_steps > 1.")
    if mask is not None and not callable(mask) and not jax.tree.leaves(mask):
        raise ValueError(f"mask must be a pytree of bools or a callable, got {mask!r}.")
    return Ascent(norm, adaptive, eta, steps, second_order, mask, direction, eps)


def sam(
    rho: optax.ScalarOrSchedule = 0.05,
    *,
    norm: jax.typing.ArrayLike = 2,
    adaptive: bool = False,
    eta: jax.typing.ArrayLike = 0.01,
    ascent_steps: int = 1,
    second_order: bool = False,
    mask: Any = None,
    axis_name: Hashable | tuple[Hashable, ...] | None = None,
    sync_perturbation: bool = False,
    eps: jax.typing.ArrayLike = 1e-12,
    has_aux: bool = False,
    direction: str = "gradient",
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""Sharpness-Aware Minimization: turns :math:`\nabla L(w)` into :math:`\nabla L(w + \hat\epsilon)`.

    Put it first in an optax chain; it takes the gradient at ``params`` (the
    caller's first backward pass) and the loss closure ``value_fn`` at update
    time, and hands on the gradient at the perturbed point

    .. math::

      \hat\epsilon(w) = \rho\,\mathrm{sign}(g)\,|g|^{q-1} / \|g\|_q^{q-1},
      \qquad g = \nabla L(w), \quad 1/p + 1/q = 1 \quad \text{(eq. 2)}

      g_{\mathrm{SAM}} = \nabla L(w)\big|_{w + \hat\epsilon(w)} \quad \text{(eq. 3)}

    so a step costs two gradient evaluations and one base update, and the state
    holds a step count (and a PRNG key for random directions), never a copy of
    the params.

    Variants (all of the paper's, plus ASAM):

    * ``norm=p``: the p-norm ball of eq. (2); ``float('inf')`` is the sign.
    * ``adaptive=True``: ASAM, :math:`T_w = |w| + \eta`,
      :math:`\hat\epsilon = \rho T_w\,d_p(T_w g)` (for p = 2,
      :math:`\rho T_w^2 g/\|T_w g\|_2`).
    * ``ascent_steps=k``: k steps of projected gradient ascent (appendix C.6):
      :math:`\delta_1 = \rho\, d_p(T g_0)`, then
      :math:`\delta_{j+1} = \Pi_\rho(\delta_j + \rho\, d_p(T\nabla L(w + T\delta_j)))`,
      with :math:`\epsilon = T\delta` (T = 1 unless adaptive) and
      :math:`\Pi_\rho` the projection onto the :math:`\rho`-ball (exact for
      p = 2 and inf, a radial rescaling for other p). Each extra step costs
      one gradient; k = 1 is SAM.
    * ``second_order=True``: keeps the :math:`(d\hat\epsilon/dw)^\top` term
      (appendix C.4): :math:`g_{\mathrm{SAM}} + H J^\top g_{\mathrm{SAM}}`
      (plus :math:`\partial\hat\epsilon/\partial w` for ASAM), where J is the
      Jacobian of the direction in g, through one Hessian-vector product
      (forward-over-reverse), never a materialized Hessian.
    * ``direction='random'``: the ablation of appendix C.5: a Gaussian
      direction of norm :math:`\rho`, from ``seed`` and the step count.
    * ``mask``: which leaves are perturbed; the norm runs over those only.
    * ``rho``: a number or an optax schedule of SAM's own step count.

    Data parallelism (paper §3.1, §4.1): with ``axis_name`` the update must run
    under ``jax.shard_map``, ``jax.pmap`` or ``jax.vmap`` with that axis; each
    device perturbs with its own (un-averaged) gradient, and the SAM gradients
    are averaged over the axis before they are handed on. With
    ``sync_perturbation=True`` the incoming gradients are averaged first (one
    perturbation for the whole batch). Inside ``jax.shard_map`` the incoming
    gradient must be the device's own: differentiate with respect to
    ``jax.lax.pcast(params, axis_name, to='varying')`` (a gradient taken with
    respect to replicated params is already summed over the devices, and this
    transformation raises rather than silently syncing). ``value_fn`` must be
    the device-local loss (no collectives over ``axis_name`` inside it).

    With ``rho == 0`` the incoming gradient is returned unchanged (averaged
    over ``axis_name`` if given): the chain is then exactly its base optimizer.

    Complex params follow optax's convention: pass the conjugate of
    ``jax.grad`` (``optax.tree.conj``); norms use :math:`|x|^2` and the
    gradient at the perturbed point is conjugated the same way
    (``second_order=True`` refuses complex leaves).

    ``optax.inject_hyperparams(sam)(rho=...)`` works as is; ``norm``, ``eta``,
    ``eps`` and ``ascent_steps`` then become traced numbers too, which is
    correct but slower (general-p formula, a while loop for the steps). For the
    fastest code pass ``static_args=('norm', 'ascent_steps')``; a callable
    ``mask`` must be listed in ``static_args`` as well.

    Args:
      rho: radius :math:`\rho \ge 0` of the neighbourhood, or a schedule.
      norm: p of eq. (2), a number > 1 or ``float('inf')``.
      adaptive: use ASAM's scale-invariant neighbourhood.
      eta: ASAM's :math:`\eta` in :math:`T_w = |w| + \eta`.
      ascent_steps: number k >= 1 of projected ascent steps.
      second_order: keep the second-order term of the SAM gradient.
      mask: pytree of bools (or of boolean arrays; a prefix of the params is
        fine), or a callable ``params -> mask``: ``False`` leaves are not
        perturbed and do not enter the norm.
      axis_name: the mapped axis (or tuple of axes) of data parallelism.
      sync_perturbation: average the incoming gradients over ``axis_name``
        before computing the perturbation (the paper does not).
      eps: added to the gradient's dual norm (zero gradient -> zero
        perturbation, never NaN).
      has_aux: ``value_fn`` returns ``(loss, aux)``; ``aux`` is ignored.
      direction: ``'gradient'`` (SAM) or ``'random'`` (the C.5 ablation).
      seed: seed of the random directions (``direction='random'``).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` is
      ``update(updates, state, params, *, value_fn, **extra_args)``.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> import sam_optax
      >>> loss_fn = lambda w: jnp.sum((w - jnp.array([1.0, 2.0])) ** 2)
      >>> tx = optax.chain(sam_optax.sam(rho=0.1), optax.sgd(0.1))
      >>> params = jnp.zeros(2)
      >>> state = tx.init(params)
      >>> grads = jax.grad(loss_fn)(params)
      >>> updates, state = tx.update(grads, state, params, value_fn=loss_fn)
      >>> print([round(float(u), 3) for u in updates])
      [0.209, 0.418]

    References:
      Foret et al, `Sharpness-Aware Minimization for Efficiently Improving
      Generalization <https://arxiv.org/abs/2010.01412>`_, 2021.

      Kwon et al, `ASAM: Adaptive Sharpness-Aware Minimization
      <https://arxiv.org/abs/2102.11600>`_, 2021.
    """
    _checks.check_nonnegative("rho", rho)
    ascent = _validated_ascent(
        norm, adaptive, eta, ascent_steps, second_order, mask, direction, eps
    )
    if sync_perturbation and axis_name is None:
        raise ValueError("sync_perturbation=True needs axis_name (the axis to average over).")
    axes = _axes.axis_names(axis_name)
    rho_static = None if callable(rho) else _checks.concrete_float(rho)

    def init_fn(params: optax.Params) -> SAMState:
        del params
        key = None
        if direction == "random":
            key = jax.random.key_data(jax.random.key(seed))
        return SAMState(count=jnp.zeros([], jnp.int32), key=key)

    def update_fn(
        updates: optax.Updates,
        state: SAMState,
        params: optax.Params | None = None,
        *,
        value_fn: Callable[[Any], Any] | None = None,
        grouped_objective: GroupedObjective | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, SAMState]:
        del extra_args
        objective = objective_from_args(updates, params, value_fn, grouped_objective, has_aux)
        _axes.check_bound(axes)
        new_state = _next_state(state)
        sel = select(params, ascent.mask, *objective.grads)
        baseline = _axes.pmean(updates, axes)
        if rho_static == 0.0 or not sel.indices:
            # Nothing is perturbed: the gradient at w + 0 is the gradient at w.
            return baseline, new_state
        check_local_gradients(objective, sel, axis_name, _axes.manual_axes(axes))
        check_no_complex_second_order(params, sel, ascent)
        rho_t = rho(state.count) if callable(rho) else rho
        key = None if state.key is None else jax.random.wrap_key_data(state.key)
        out, _ = sam_gradient(
            objective, params, sel, rho_t, ascent, axes=axes, sync=sync_perturbation, key=key
        )
        out = _axes.pmean(out, axes)
        out = [o.astype(u.dtype) for o, u in zip(out, jax.tree.leaves(updates))]
        out = jax.tree.unflatten(jax.tree.structure(updates), out)
        if rho_static is None:  # a schedule or a traced rho may be 0 at this step
            out = jax.tree.map(lambda b, o: jnp.where(rho_t == 0, b, o), baseline, out)
        return out, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _next_state(state: SAMState) -> SAMState:
    key = state.key
    if key is not None:
        key = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(key))[0])
    return SAMState(count=optax.safe_increment(state.count), key=key)
