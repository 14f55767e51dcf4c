"""What every factory of the SAM family shares: options, one update call, diagnostics.

A factory (``sam``, ``gsam``, ``looksam``, ...) validates its options once
(:func:`make_options`); each ``update`` turns its arguments into a checked
:class:`Call` (:func:`prepare_call`), takes the SAM branch with
:func:`sam_update` where it needs one, averages over the data-parallel axes
with :func:`finish` and records :class:`Diagnostics` with :func:`measure`.
"""

from __future__ import annotations

import dataclasses
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
from sam_optax._directions import Selection
from sam_optax._directions import select
from sam_optax._stages import Ascent
from sam_optax._stages import Info
from sam_optax._stages import Objective
from sam_optax._stages import sam_gradient

DIRECTIONS = ("gradient", "random")


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


class Diagnostics(NamedTuple):
    """Scalars every factory records in its state, free (no extra pass, nothing params-sized).

    Read them with ``optax.tree.get(opt_state, "sharpness")`` and so on.
    Averaged over the data-parallel axes. ``NaN`` means "not measured at
    this step" (no SAM branch taken, or no clean ``value`` passed).

    Attributes:
      sharpness: :math:`L(w + \\epsilon) - L(w)`, the first-order sharpness
        estimate; needs the clean loss passed as ``tx.update(..., value=loss)``.
      perturbed_loss: :math:`L(w + \\epsilon)`, computed by the SAM pass anyway.
      grad_norm: :math:`\\|g\\|` of the incoming (clean) gradient.
      cosine: :math:`\\cos(g, g_{SAM})` between the clean gradient and the
        gradient handed on.
      sam_step: whether this step took the SAM branch (always for ``sam``).
    """

    sharpness: jax.Array
    perturbed_loss: jax.Array
    grad_norm: jax.Array
    cosine: jax.Array
    sam_step: jax.Array


def initial_diagnostics() -> Diagnostics:
    nan = jnp.full([], jnp.nan, jnp.float32)
    return Diagnostics(nan, nan, nan, nan, jnp.zeros([], jnp.bool_))


@dataclasses.dataclass(frozen=True)
class Options:
    """The perturbation options a factory shares with ``sam``, validated."""

    ascent: Ascent
    axis_name: Any
    axes: tuple[Hashable, ...]
    sync_axes: tuple[Hashable, ...] | None
    has_aux: bool
    seed: int


def make_options(
    *,
    norm: Any = 2,
    adaptive: bool = False,
    eta: Any = 0.01,
    ascent_steps: Any = 1,
    second_order: bool = False,
    mask: Any = None,
    axis_name: Any = None,
    sync_perturbation: bool | Hashable | tuple[Hashable, ...] = False,
    eps: Any = 1e-12,
    has_aux: bool = False,
    direction: str = "gradient",
    seed: int = 0,
) -> Options:
    """Validates ``sam``'s perturbation arguments (concrete values only) into :class:`Options`."""
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
    ascent = Ascent(norm, adaptive, eta, steps, second_order, mask, direction, eps)
    axes = _axes.axis_names(axis_name)
    return Options(ascent, axis_name, axes, sync_axes(sync_perturbation, axes), has_aux, seed)


def sync_axes(sync_perturbation: Any, axes: tuple[Hashable, ...]) -> tuple[Hashable, ...] | None:
    """The axes the perturbation is shared over: ``None`` (per device), all, or a subset.

    ``True`` syncs over every axis of ``axis_name``; a name or tuple of names
    (a subset of ``axis_name``) gives one perturbation per group of devices
    along those axes, the paper's ``inner_group_size``.
    """
    if sync_perturbation is False or sync_perturbation is None:
        return None
    if not axes:
        raise ValueError(
            f"sync_perturbation={sync_perturbation!r} needs axis_name (the axes to "
            "average the gradient over)."
        )
    if sync_perturbation is True:
        return axes
    names = _axes.axis_names(sync_perturbation)
    unknown = [n for n in names if n not in axes]
    if unknown or not names:
        raise ValueError(
            f"sync_perturbation must be a bool or a subset of axis_name={axes!r}, "
            f"got sync_perturbation={sync_perturbation!r}."
        )
    return names


# --------------------------------------------------------------------------
# One update call.
# --------------------------------------------------------------------------


class Call(NamedTuple):
    """The checked arguments of one ``update`` call."""

    objective: Objective
    params: Any
    updates: Any
    sel: Selection
    value: jax.Array | None


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


def prepare_call(
    options: Options,
    updates: Any,
    params: Any,
    value_fn: Any,
    grouped_objective: Any,
    value: Any,
    owner: str = "sam",
) -> Call:
    """Checks one call's arguments and the mapped axes; selects the perturbed leaves."""
    objective = objective_from_args(
        updates, params, value_fn, grouped_objective, options.has_aux, owner
    )
    _axes.check_bound(options.axes, owner)
    sel = select(params, options.ascent.mask, *objective.grads)
    return Call(objective, params, updates, sel, value)


def check_local_gradients(call: Call, options: Options, manual: tuple[Hashable, ...]) -> None:
    """Refuses, inside ``shard_map``, a gradient that is the same on every device.

    A gradient taken with respect to replicated params inside ``shard_map`` is
    already summed over the devices (the gradient-sum trap): per-device
    perturbation would silently become a synced one, with an update
    n_devices times too large.
    """
    synced = set(options.sync_axes or ())
    if not manual or synced >= set(manual) or not _axes.vma_checked(manual):
        return
    leaves = [jax.tree.leaves(g) for g in call.objective.grads]
    name = call.objective.name
    for b, g in enumerate(leaves):
        for i in call.sel.indices:
            if not set(manual) <= _axes.varying_axes(g[i]):
                which = name if len(leaves) == 1 else f"{name}[{b}]"
                raise ValueError(
                    f"sam(axis_name={options.axis_name!r}): the incoming gradient ({which}) "
                    f"is the same on every device of axis {manual}: it was "
                    "taken with respect to replicated params, and shard_map "
                    "has already summed it over the devices. Differentiate "
                    f"with respect to jax.lax.pcast(params, {manual!r}, "
                    "to='varying') to keep each device's own gradient, or "
                    "pass sync_perturbation=True."
                )


def check_no_complex_second_order(call: Call, options: Options) -> None:
    if not options.ascent.second_order:
        return
    leaves = jax.tree.leaves(call.params)
    for i in call.sel.indices:
        if jnp.iscomplexobj(leaves[i]):
            raise TypeError(
                f"sam(second_order=True) does not support complex params; leaf {i} "
                f"has dtype {leaves[i].dtype}. Use second_order=False, or mask that leaf out."
            )


def sam_update(
    call: Call,
    options: Options,
    rho: Any,
    key: jax.Array | None = None,
    directions: Sequence[Any] | None = None,
) -> tuple[list[jax.Array], Info]:
    """The local (per-device) SAM gradient of the call, all leaves, in the compute dtype."""
    check_local_gradients(call, options, _axes.manual_axes(options.axes))
    check_no_complex_second_order(call, options)
    return sam_gradient(
        call.objective,
        call.params,
        call.sel,
        rho,
        options.ascent,
        axes=options.axes,
        sync_axes=options.sync_axes,
        key=key,
        directions=directions,
    )


def local_gradient(call: Call) -> list[jax.Array]:
    """The incoming (clean) gradient's leaves, as the caller passed them."""
    return jax.tree.leaves(call.updates)


def finish(call: Call, options: Options, local: Sequence[jax.Array]) -> Any:
    """Averages local gradients over the data-parallel axes; each leaf in the updates' dtype."""
    out = _axes.pmean(list(local), options.axes)
    like = jax.tree.leaves(call.updates)
    return jax.tree.unflatten(
        jax.tree.structure(call.updates), [o.astype(u.dtype) for o, u in zip(out, like)]
    )


def base_step(call: Call, options: Options) -> tuple[Any, Diagnostics]:
    """The base optimizer's step: the clean gradient averaged over the devices.

    What every factory hands on when nothing is perturbed (ρ = 0, no leaf
    selected) and what the switching variants take on their cheap branch.
    """
    return _axes.pmean(call.updates, options.axes), measure(call, options, None, None, False)


def skips_perturbation(rho: Any, call: Call) -> bool:
    """Whether the step is the base step at trace time: a constant ρ of 0, or no leaf selected."""
    return (not callable(rho) and _checks.concrete_float(rho) == 0.0) or not call.sel.indices


Step = Callable[[Call, Any], tuple[Any, Any]]


def transformation(
    owner: str, options: Options, init_fn: Callable[[Any], Any], step: Step
) -> optax.GradientTransformationExtraArgs:
    """``sam``'s update contract around ``step(call, state) -> (updates, state)``.

    The update takes ``(grads, state, params, *, value_fn=None,
    grouped_objective=None, value=None, **extra_args)``, checks them (errors
    name ``owner``) and hands ``step`` the :class:`Call`; other extra
    arguments of an optax chain are ignored.
    """

    def update_fn(
        updates: optax.Updates,
        state: Any,
        params: optax.Params | None = None,
        *,
        value_fn: Callable[..., Any] | None = None,
        grouped_objective: GroupedObjective | None = None,
        value: jax.Array | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, Any]:
        del extra_args
        call = prepare_call(options, updates, params, value_fn, grouped_objective, value, owner)
        return step(call, state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------
# Diagnostics.
# --------------------------------------------------------------------------


def inner(a: Sequence[jax.Array], b: Sequence[jax.Array]) -> jax.Array:
    """:math:`\\mathrm{Re}\\langle a, b\\rangle` over all leaves, in float32 at least."""
    terms = []
    for x, y in zip(a, b):
        dtype = jnp.promote_types(jnp.finfo(jnp.result_type(x, y)).dtype, jnp.float32)
        terms.append(jnp.real(jnp.vdot(x, y)).astype(dtype))
    total = terms[0]
    for t in terms[1:]:
        total = total + t
    return total


def norm(leaves: Sequence[jax.Array]) -> jax.Array:
    """Global L2 norm (float32 at least; complex magnitudes)."""
    return jnp.sqrt(inner(leaves, leaves))


def cosine(a: Sequence[jax.Array], b: Sequence[jax.Array]) -> jax.Array:
    """:math:`\\cos(a, b)`, 0 when either is zero."""
    denom = norm(a) * norm(b)
    return jnp.where(denom > 0, inner(a, b) / jnp.where(denom > 0, denom, 1.0), 0.0)


def measure(
    call: Call,
    options: Options,
    handed_on: Sequence[jax.Array] | None,
    info: Info | None,
    sam_step: Any,
) -> Diagnostics:
    """The :class:`Diagnostics` of a step, averaged over the data-parallel axes.

    ``handed_on`` is the local gradient handed on (before the average over
    devices) and ``info`` what the SAM pass learnt; both ``None`` when no SAM
    pass ran (then only ``grad_norm`` is measured).
    """
    g = local_gradient(call)
    nan = jnp.full([], jnp.nan, jnp.float32)
    perturbed = nan if info is None else info.perturbed_loss.astype(jnp.float32)
    cos = nan if handed_on is None else cosine(g, handed_on)
    clean = nan if call.value is None else jnp.asarray(call.value, jnp.float32)
    out = Diagnostics(
        sharpness=perturbed - clean,
        perturbed_loss=perturbed,
        grad_norm=norm(g).astype(jnp.float32),
        cosine=jnp.asarray(cos, jnp.float32),
        sam_step=jnp.asarray(sam_step, jnp.bool_),
    )
    if not options.axes:
        return out
    floats = _axes.pmean(out[:4], options.axes)
    return Diagnostics(*floats, out.sam_step)


def schedule_value(value: optax.ScalarOrSchedule, count: jax.Array) -> Any:
    """A number, or a schedule evaluated at ``count``."""
    return value(count) if callable(value) else value


def next_key(key: jax.Array | None) -> jax.Array | None:
    """Advances a raw ``uint32`` key (``None`` stays ``None``)."""
    if key is None:
        return None
    return jax.random.key_data(jax.random.split(jax.random.wrap_key_data(key))[0])
