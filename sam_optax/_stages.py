r"""The stages of a SAM step, each a pure function.

One step of :func:`sam_optax.sam` on G groups (G = 1 unless m-sharpness
splits the device's batch; see :class:`Objective`), in order:

1. :func:`direction_gradients`: the gradients the perturbations come from,
   each group's own, or their mean over groups and devices when synced;
2. :func:`first_deltas` / :func:`random_deltas`: the first ascent step,
   eq. (2), :math:`\delta = \rho\, d_p(T g)` (:math:`T = |w| + \eta` for
   ASAM, 1 otherwise; the perturbation is :math:`\epsilon = T\delta`,
   :func:`perturbations`);
3. :func:`ascend`: further steps re-projected onto the
   :math:`\rho`-ball (appendix C.6);
4. :func:`perturbed_points` and :func:`gradients_at`: each group's gradient
   at its own :math:`w + \epsilon_i` (eq. 3);
5. :func:`second_order_term`: the :math:`(d\epsilon/dw)^\top` term
   (appendix C.4), through one Hessian-vector product;
6. :func:`mean_over_groups`, then the mean over the data-parallel axes.

:func:`sam_gradient` wires 1-5 and is what every factory of the package
builds on. The stages work on the *selected* leaves (those the mask
perturbs) as lists in the compute dtype (:class:`sam_optax._directions.Selection`);
:func:`perturbed_points` and :func:`gradients_at` deal in whole params trees.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Hashable
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp

from sam_optax import _axes
from sam_optax._directions import Selection
from sam_optax._directions import adaptive_scale
from sam_optax._directions import dual_unit
from sam_optax._directions import project
from sam_optax._directions import random_unit

Leaves = list[jax.Array]


# The perturbation options (a :class:`sam_optax.SAMOptions`): ``norm``,
# ``adaptive``, ``eta``, ``ascent_steps``, ``second_order``, ``direction``,
# ``eps``; all static.
Ascent = Any


class Objective(NamedTuple):
    """The loss of G groups and each group's gradient at :math:`w`.

    Attributes:
      loss: ``loss((params_0, ..., params_{G-1})) -> mean_i L_i(params_i)``,
        a scalar (the aux, if any, already dropped).
      grads: the G gradients ``grads[i] = grad L_i(w)`` in optax's convention
        (conjugated for complex leaves), each a tree like the params.
      name: how error messages call the gradients.
    """

    loss: Callable[[tuple[Any, ...]], jax.Array]
    grads: Sequence[Any]
    name: str = "updates"

    @property
    def n_groups(self) -> int:
        return len(self.grads)


class Info(NamedTuple):
    """What a SAM gradient computation learnt on the way (local to the device).

    Attributes:
      perturbed_loss: mean over groups of :math:`L_i(w + \\epsilon_i)`.
    """

    perturbed_loss: jax.Array


# --------------------------------------------------------------------------
# 1. The gradients the perturbations come from.
# --------------------------------------------------------------------------


def direction_gradients(
    sel: Selection, grads: Sequence[Any], sync_axes: tuple[Hashable, ...] | None
) -> list[Leaves]:
    """Selected leaves of each group's gradient, or (synced) of their mean.

    With ``sync_axes=None`` every group keeps its own gradient (the paper's
    per-device perturbation). Otherwise the gradients are averaged over the
    groups and over the axes ``sync_axes`` (possibly ``()``), and every group
    perturbs with that mean.
    """
    taken = [sel.take(g) for g in grads]
    if sync_axes is None:
        return taken
    n = len(taken)
    mean = [sum(g[j] for g in taken) / n for j in range(len(sel.indices))]
    return [_axes.pmean(mean, sync_axes)] * n


# --------------------------------------------------------------------------
# 2. The first ascent step (eq. 2) and the perturbation it defines.
# --------------------------------------------------------------------------


def ascent_scale(sel: Selection, params: Any, ascent: Ascent) -> Leaves | None:
    r"""ASAM's :math:`T_w = |w| + \eta` on the selected leaves, or ``None``."""
    return adaptive_scale(sel.take(params), ascent.eta) if ascent.adaptive else None


def unit_step(grad: Leaves, scale: Leaves | None, ascent: Ascent) -> Leaves:
    r""":math:`d_p(T g)`: the eq. (2) direction of unit p-norm in the :math:`T^{-1}` coordinates."""
    if scale is not None:
        grad = [t * g for t, g in zip(scale, grad)]
    return dual_unit(grad, ascent.norm, ascent.eps)


def first_deltas(
    grads: Sequence[Leaves], scale: Leaves | None, rho: jax.Array, ascent: Ascent
) -> list[Leaves]:
    r"""The first step of each group, :math:`\delta_i = \rho\, d_p(T g_i)` (eq. 2)."""
    return [[rho * d for d in unit_step(g, scale, ascent)] for g in grads]


def random_deltas(
    key: jax.Array,
    sel: Selection,
    like: Leaves,
    n_groups: int,
    rho: jax.Array,
    ascent: Ascent,
    fold_axes: tuple[Hashable, ...],
) -> list[Leaves]:
    r"""Gaussian steps of p-norm :math:`\rho` (appendix C.5), one per group.

    The key is folded with the device index along ``fold_axes`` (each device
    its own direction unless synced) and with the group index.
    """
    key = _axes.fold_in_axis_index(key, fold_axes)
    return [
        [rho * d for d in random_unit(jax.random.fold_in(key, i), like, ascent.norm, sel.masks)]
        for i in range(n_groups)
    ]


def perturbations(deltas: Sequence[Leaves], scale: Leaves | None) -> list[Leaves]:
    r"""From the ascent coordinates to the perturbation, :math:`\epsilon = T\delta`."""
    if scale is None:
        return [list(d) for d in deltas]
    return [[t * x for t, x in zip(scale, d)] for d in deltas]


# --------------------------------------------------------------------------
# 3-4. Gradients at the perturbed points; projected ascent.
# --------------------------------------------------------------------------


def perturbed_points(
    sel: Selection, params: Any, perts: Sequence[Leaves], manual: tuple[Hashable, ...]
) -> tuple[Any, ...]:
    r"""The G param trees :math:`w + \epsilon_i` (added in the compute dtype).

    They are made varying over the ``shard_map`` axes ``manual`` so that
    their gradients stay per device.
    """
    leaves = jax.tree.leaves(params)
    points = []
    for pert in perts:
        moved = [
            (leaves[i].astype(sel.dtype) + e).astype(leaves[i].dtype)
            for i, e in zip(sel.indices, pert)
        ]
        points.append(
            _axes.as_varying(jax.tree.unflatten(sel.treedef, sel.place(moved, leaves)), manual)
        )
    return tuple(points)


def _conj(x: jax.Array) -> jax.Array:
    return jnp.conj(x) if jnp.iscomplexobj(x) else x


def gradients_at(objective: Objective, points: tuple[Any, ...]) -> tuple[jax.Array, list[Leaves]]:
    """The loss at ``points`` and each group's own gradient there (all leaves).

    The objective is the mean over the G groups, so its gradient with respect
    to ``points[i]`` is :math:`\\nabla L_i / G`; it is scaled back by G.
    Complex leaves are conjugated (optax's convention, like the caller's
    gradient).
    """
    value, grads = jax.value_and_grad(objective.loss)(points)
    n = objective.n_groups
    out = [[_conj(g) for g in jax.tree.leaves(gi)] for gi in grads]
    if n > 1:
        out = [[g * n for g in gi] for gi in out]
    return value, out


def ascend(
    deltas: list[Leaves],
    evaluate: Callable[[list[Leaves]], tuple[jax.Array, list[Leaves]]],
    directions_of: Callable[[list[Leaves]], list[Leaves]],
    scale: Leaves | None,
    rho: jax.Array,
    ascent: Ascent,
) -> tuple[jax.Array, list[Leaves]]:
    r"""The loss and gradients at the last of k projected ascent steps (appendix C.6).

    ``evaluate(deltas)`` is ``(loss, group_grads)`` at the perturbations the
    deltas define, ``directions_of(group_grads)`` the gradients the next step
    moves along (selected leaves, synced if the step is). Step j evaluates at
    :math:`\delta_j` and moves to
    :math:`\delta_{j+1} = \Pi_\rho(\delta_j + \rho\, d_p(T \nabla L(w + T\delta_j)))`,
    each group on its own; the k-th evaluation is the result (k = 1 is SAM).
    For k > 1 the evaluations run in a ``fori_loop``, so a step holds one
    evaluation's buffers whatever k (``benchmarks/memory.py``; unrolled,
    XLA kept each evaluation's activations).
    """
    if ascent.ascent_steps == 1:
        return evaluate(deltas)

    def body(_: Any, deltas: list[Leaves]) -> list[Leaves]:
        grads = directions_of(evaluate(deltas)[1])
        return [
            project(
                [d + rho * u for d, u in zip(delta, unit_step(g, scale, ascent))], ascent.norm, rho
            )
            for delta, g in zip(deltas, grads)
        ]

    # A trip count XLA cannot see: it would unroll a loop of one step (k = 2),
    # and the unrolled step kept its activations (CNN: +7x the params).
    steps = jax.lax.optimization_barrier(jnp.asarray(ascent.ascent_steps - 1, jnp.int32))
    deltas = jax.lax.fori_loop(0, steps, body, deltas)
    return evaluate(deltas)


# --------------------------------------------------------------------------
# 5. The second-order term (appendix C.4).
# --------------------------------------------------------------------------


def second_order_term(
    objective: Objective,
    sel: Selection,
    params: Any,
    dir_grads: Sequence[Leaves],
    sam_grads: Sequence[Leaves],
    rho: jax.Array,
    ascent: Ascent,
    manual: tuple[Hashable, ...],
) -> Leaves:
    r"""The term :math:`(d\hat\epsilon/dw)^\top v` that first-order SAM drops.

    For each group, :math:`\hat\epsilon(g(w), w)` depends on w through the
    gradient (and, for ASAM, through :math:`T_w`):
    :math:`(d\hat\epsilon/dw)^\top v = H J_g^\top v + J_w^\top v` with
    :math:`v` the group's SAM gradient (``sam_grads``, selected leaves) and
    :math:`H` the Hessian of its loss at w. The :math:`J^\top v` come from
    one ``vjp``; all the :math:`H u` from one Hessian-vector product
    (forward-over-reverse) of the mean objective, never a materialized
    Hessian. Returns the mean over groups, on all leaves.
    """
    w_sel = sel.take(params)

    def perturbation_of(g: Leaves, w: Leaves) -> Leaves:
        scale = adaptive_scale(w, ascent.eta) if ascent.adaptive else None
        return perturbations(first_deltas([g], scale, rho, ascent), scale)[0]

    leaves = jax.tree.leaves(params)
    tangents, w_terms = [], []
    for g, v in zip(dir_grads, sam_grads):
        _, pullback = jax.vjp(perturbation_of, g, w_sel)
        u_g, u_w = pullback(list(v))
        zeros = [jnp.zeros_like(w) for w in leaves]
        cast = [u.astype(leaves[i].dtype) for i, u in zip(sel.indices, u_g)]
        tangents.append(jax.tree.unflatten(sel.treedef, sel.place(cast, zeros)))
        w_terms.append(u_w)
    at_w = tuple(_axes.as_varying(params, manual) for _ in dir_grads)
    _, hvps = jax.jvp(jax.grad(objective.loss), (at_w,), (tuple(tangents),))
    # The objective is a mean over groups: each group's HVP is already / G.
    term = [sum(jax.tree.leaves(h)[i].astype(sel.dtype) for h in hvps) for i in range(len(leaves))]
    if ascent.adaptive:
        n = len(dir_grads)
        w_mean = [sum(t[j] for t in w_terms) / n for j in range(len(sel.indices))]
        term = sel.place([term[i] + w for i, w in zip(sel.indices, w_mean)], term)
    return term


# --------------------------------------------------------------------------
# 6. Reductions, and the whole gradient.
# --------------------------------------------------------------------------


def mean_over_groups(grads: Sequence[Leaves], dtype: Any) -> Leaves:
    """The leafwise mean of G lists of leaves, in ``dtype``."""
    if len(grads) == 1:
        return [g.astype(dtype) for g in grads[0]]
    n = len(grads)
    return [sum(g[i].astype(dtype) for g in grads) / n for i in range(len(grads[0]))]


def sam_gradient(
    objective: Objective,
    params: Any,
    sel: Selection,
    rho: jax.Array,
    ascent: Ascent,
    *,
    axes: tuple[Hashable, ...] = (),
    sync_axes: tuple[Hashable, ...] | None = None,
    key: jax.Array | None = None,
    directions: Sequence[Any] | None = None,
) -> tuple[Leaves, Info]:
    r"""The local SAM gradient :math:`\frac1G\sum_i \nabla L_i(w + \hat\epsilon_i)`, all leaves.

    Wires the stages above for the selected leaves ``sel`` (at least one):
    direction gradients (each group's own, or with ``sync_axes`` their mean
    over the groups and those axes: one perturbation per group of devices),
    the first step
    (from the gradient, or random from ``key``), the projected ascent, the
    gradients at the perturbed points and the second-order term. The result
    is in the compute dtype and not yet averaged over ``axes``.
    ``directions`` (one tree per group) replaces the gradients the first
    step is taken from (F-SAM's ``g - sigma m``).
    """
    manual = _axes.manual_axes(axes)
    rho = jnp.asarray(rho, jnp.finfo(sel.dtype).dtype)
    scale = ascent_scale(sel, params, ascent)
    if ascent.direction == "random":
        like = sel.take(params)
        deltas = random_deltas(
            key,
            sel,
            like,
            objective.n_groups,
            rho,
            ascent,
            tuple(a for a in axes if a not in (sync_axes or ())),
        )
    else:
        start = objective.grads if directions is None else directions
        dir_grads = direction_gradients(sel, start, sync_axes)
        deltas = first_deltas(dir_grads, scale, rho, ascent)

    def evaluate(deltas: list[Leaves]) -> tuple[jax.Array, list[Leaves]]:
        points = perturbed_points(sel, params, perturbations(deltas, scale), manual)
        return gradients_at(objective, points)

    def directions_of(group_grads: list[Leaves]) -> list[Leaves]:
        return direction_gradients(sel, group_grads, sync_axes)

    value, group_grads = ascend(deltas, evaluate, directions_of, scale, rho, ascent)
    out = mean_over_groups(group_grads, sel.dtype)
    if ascent.second_order:
        if sync_axes is not None:
            v = [_axes.pmean([out[i] for i in sel.indices], sync_axes)] * objective.n_groups
        else:
            v = [[g[i].astype(sel.dtype) for i in sel.indices] for g in group_grads]
        term = second_order_term(objective, sel, params, dir_grads, v, rho, ascent, manual)
        out = [o + t for o, t in zip(out, term)]
    return out, Info(perturbed_loss=value)
