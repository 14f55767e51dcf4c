"""``sam``: Sharpness-Aware Minimization as an optax transformation."""

from __future__ import annotations

import math
from collections.abc import Callable
from collections.abc import Hashable
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax import _directions as dirs

__all__ = ["GroupedObjective", "SAMState", "sam"]

_DIRECTIONS = ("gradient", "random")


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
    :func:`sam_optax.parallel.grouped_sam_step` builds one for you.

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


# --------------------------------------------------------------------------
# Mapped axes (shard_map / pmap / vmap).
# --------------------------------------------------------------------------


def _axis_names(axis_name: Hashable | tuple[Hashable, ...] | None) -> tuple[Hashable, ...]:
    if axis_name is None:
        return ()
    return tuple(axis_name) if isinstance(axis_name, tuple) else (axis_name,)


def _check_axes_bound(names: tuple[Hashable, ...]) -> None:
    for name in names:
        try:
            jax.lax.axis_size(name)
        except NameError:
            raise ValueError(
                f"sam(axis_name={name!r}) is used where no mapped axis {name!r} "
                "exists. Call tx.update inside jax.shard_map over a mesh with "
                f"that axis, jax.pmap(..., axis_name={name!r}) or "
                f"jax.vmap(..., axis_name={name!r}); on one device leave "
                "axis_name=None."
            ) from None


def _manual_axes(names: tuple[Hashable, ...]) -> tuple[Hashable, ...]:
    """The names among ``names`` that are shard_map (manual) mesh axes here."""
    manual = set(jax.sharding.get_abstract_mesh().manual_axes)
    return tuple(n for n in names if n in manual)


def _varying_axes(x: jax.Array) -> frozenset:
    aval = jax.typeof(x)
    vma = getattr(aval, "vma", None)
    if vma is None:
        vma = getattr(getattr(aval, "mat", None), "varying", frozenset())
    return frozenset(vma)


def _vma_checked(manual: tuple[Hashable, ...]) -> bool:
    """Whether shard_map tracks varying axes here (``check_vma=True``)."""
    return bool(manual) and manual[0] in _varying_axes(jax.lax.axis_index(manual[0]))


def _as_varying(leaves: Sequence[jax.Array], manual: tuple[Hashable, ...]) -> list[jax.Array]:
    """Marks leaves as varying over the shard_map axes before differentiation.

    Inside ``jax.shard_map`` a gradient taken with respect to a replicated
    (invariant) value comes back already summed over the axis; making the
    input varying keeps the per-device gradient.
    """
    if not manual:
        return list(leaves)
    out = []
    for x in leaves:
        missing = tuple(n for n in manual if n not in _varying_axes(x))
        out.append(jax.lax.pcast(x, missing, to="varying") if missing else x)
    return out


def _pmean(leaves: Sequence[jax.Array], names: tuple[Hashable, ...]) -> list[jax.Array]:
    if not names:
        return list(leaves)
    return list(jax.lax.pmean(list(leaves), names))


# --------------------------------------------------------------------------
# Argument checks.
# --------------------------------------------------------------------------


def _check_match(tree: Any, params: Any, name: str) -> list[jax.Array]:
    leaves, treedef = jax.tree.flatten(tree)
    p_leaves, p_def = jax.tree.flatten(params)
    if treedef != p_def:
        raise ValueError(
            f"sam: {name} must have the tree structure of params; got\n"
            f"  {name}: {treedef}\n  params: {p_def}"
        )
    for i, (g, w) in enumerate(zip(leaves, p_leaves)):
        if jnp.shape(g) != jnp.shape(w):
            raise ValueError(
                f"sam: leaf {i} of {name} has shape {jnp.shape(g)} but the "
                f"matching params leaf has shape {jnp.shape(w)}."
            )
    return leaves


def _checked_objective(fn: Callable[..., Any], has_aux: bool, name: str) -> Callable[..., Any]:
    """Wraps the loss closure with trace-time checks of what it returns."""

    def wrapped(arg: Any) -> Any:
        out = fn(arg)
        if has_aux:
            if not (isinstance(out, tuple) and len(out) == 2):
                raise TypeError(
                    f"sam(has_aux=True): {name} must return (loss, aux), got {type(out).__name__}."
                )
            loss = out[0]
        else:
            if isinstance(out, (tuple, list)):
                raise TypeError(
                    f"sam: {name} returned a {type(out).__name__}; it must "
                    "return a scalar loss. If it returns (loss, aux), pass "
                    "has_aux=True to sam."
                )
            loss = out
        if jnp.shape(loss) != ():
            raise TypeError(
                f"sam: {name} must return a scalar loss, got an array of shape {jnp.shape(loss)}."
            )
        return out

    return wrapped


def _check_nonnegative(name: str, value: Any) -> None:
    v = dirs.concrete_float(value) if not callable(value) else None
    if v is not None and (math.isnan(v) or v < 0):
        raise ValueError(f"{name} must be >= 0, got {name}={value!r}.")


# --------------------------------------------------------------------------
# The transformation.
# --------------------------------------------------------------------------


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
    # ---- construction-time validation (only of concrete values) ----
    if not callable(rho):
        _check_nonnegative("rho", rho)
    p = dirs.check_norm(norm)
    steps = dirs.concrete_float(ascent_steps)
    if steps is not None:
        if steps != int(steps) or steps < 1:
            raise ValueError(
                f"ascent_steps must be an integer >= 1, got ascent_steps={ascent_steps!r}."
            )
        ascent_steps = int(steps)
    _check_nonnegative("eta", eta)
    _check_nonnegative("eps", eps)
    if direction not in _DIRECTIONS:
        raise ValueError(f"direction must be one of {_DIRECTIONS}, got direction={direction!r}.")
    if (second_order or direction == "random") and steps is None:
        raise ValueError(
            "second_order=True and direction='random' need a concrete "
            "ascent_steps=1; with optax.inject_hyperparams pass "
            "static_args=('ascent_steps',)."
        )
    if second_order and ascent_steps != 1:
        raise ValueError(
            f"second_order=True supports ascent_steps=1 only (appendix C.4), got ascent_steps={ascent_steps}."
        )
    if direction == "random" and (second_order or ascent_steps != 1):
        raise ValueError("direction='random' takes neither second_order=True nor ascent_steps > 1.")
    if sync_perturbation and axis_name is None:
        raise ValueError("sync_perturbation=True needs axis_name (the axis to average over).")
    if mask is not None and not callable(mask) and not jax.tree.leaves(mask):
        raise ValueError(f"mask must be a pytree of bools or a callable, got {mask!r}.")
    names = _axis_names(axis_name)
    rho_static = None if callable(rho) else dirs.concrete_float(rho)

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
        if params is None:
            raise ValueError(
                "sam: update needs params (tx.update(grads, state, params, value_fn=...))."
            )
        if grouped_objective is None:
            if value_fn is None:
                raise TypeError(
                    "sam: update needs the loss closure: call "
                    "tx.update(grads, state, params, value_fn=loss_fn) with "
                    "loss_fn(params) -> scalar."
                )
            if not callable(value_fn):
                raise TypeError(f"sam: value_fn must be callable, got {type(value_fn).__name__}.")
            user_fn = value_fn

            def objective(ps: tuple[Any, ...]) -> Any:
                return user_fn(ps[0])

            block_grads = [updates]
            fn_name = "value_fn"
        else:
            if not isinstance(grouped_objective, GroupedObjective):
                raise TypeError("sam: grouped_objective must be a sam_optax.GroupedObjective.")
            objective = grouped_objective.value_fn
            block_grads = list(grouped_objective.grads)
            if not block_grads:
                raise ValueError("sam: grouped_objective.grads is empty.")
            fn_name = "grouped_objective.value_fn"
        up_leaves = _check_match(updates, params, "updates")
        block_leaves = [
            _check_match(
                g,
                params,
                "updates" if grouped_objective is None else f"grouped_objective.grads[{i}]",
            )
            for i, g in enumerate(block_grads)
        ]
        objective = _checked_objective(objective, has_aux, fn_name)
        if names:
            _check_axes_bound(names)

        count = state.count
        new_state = SAMState(
            count=optax.safe_increment(count),
            key=None
            if state.key is None
            else jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state.key))[0]),
        )

        # rho == 0: SAM is the identity, only the average over devices remains.
        def baseline() -> list[jax.Array]:
            return _pmean(up_leaves, names)

        if rho_static == 0.0:
            return jax.tree.unflatten(jax.tree.structure(updates), baseline()), new_state

        rho_t = rho(count) if callable(rho) else rho
        w_leaves, treedef = jax.tree.flatten(params)
        masks = dirs.mask_leaves(mask, params)
        active = [i for i, m in enumerate(masks) if m is not False]
        if not active:
            # Nothing is perturbed: the gradient at w + 0 is the gradient at w.
            return jax.tree.unflatten(treedef, baseline()), new_state
        act_masks = [masks[i] for i in active]
        n_blocks = len(block_leaves)
        cdt = dirs.compute_dtype(
            jnp.result_type(*[block_leaves[0][i] for i in active], *[w_leaves[i] for i in active])
        )
        rho_c = jnp.asarray(rho_t, cdt)
        manual = _manual_axes(names)

        w_act = [w_leaves[i] for i in active]
        w_act_c = [w.astype(cdt) for w in w_act]

        # ---- the direction, as a function of (gradient, params) ----
        def scale_of(ws: Sequence[jax.Array]) -> list[jax.Array] | None:
            return dirs.adaptive_scale(ws, eta) if adaptive else None

        def unit_step(g_act: Sequence[jax.Array], scale: list[jax.Array] | None) -> list[jax.Array]:
            xs = dirs.apply_mask([g.astype(cdt) for g in g_act], act_masks)
            if scale is not None:
                xs = [t * x for t, x in zip(scale, xs)]
            return dirs.dual_unit(xs, p, eps)

        def to_eps(delta: Sequence[jax.Array], scale: list[jax.Array] | None) -> list[jax.Array]:
            return list(delta) if scale is None else [t * d for t, d in zip(scale, delta)]

        def eps_of(g_act: Sequence[jax.Array], ws: Sequence[jax.Array]) -> list[jax.Array]:
            scale = scale_of(ws)
            return to_eps([rho_c * d for d in unit_step(g_act, scale)], scale)

        def perturbed_blocks(eps_blocks: Sequence[Sequence[jax.Array]]) -> tuple[Any, ...]:
            blocks = []
            for eps_act in eps_blocks:
                leaves = list(w_leaves)
                for i, e in zip(active, eps_act):
                    leaves[i] = (w_leaves[i].astype(cdt) + e).astype(w_leaves[i].dtype)
                blocks.append(jax.tree.unflatten(treedef, _as_varying(leaves, manual)))
            return tuple(blocks)

        def loss_only(ps: tuple[Any, ...]) -> Any:
            out = objective(ps)
            return out[0] if has_aux else out

        def block_gradients(ps: tuple[Any, ...]) -> list[list[jax.Array]]:
            """Each group's gradient of its own loss, grad L_i(ps[i]).

            The objective is the mean over the G groups, so its gradient with
            respect to ``ps[i]`` is grad L_i / G.
            """
            grads = jax.grad(loss_only)(ps)
            if n_blocks == 1:
                return [jax.tree.leaves(grads[0])]
            return [[g * n_blocks for g in jax.tree.leaves(gb)] for gb in grads]

        def direction_grads(g_blocks: Sequence[Sequence[jax.Array]]) -> list[list[jax.Array]]:
            """Active leaves of the gradients the directions are computed from."""
            act = [[g[i] for i in active] for g in g_blocks]
            if not sync_perturbation:
                return act
            mean = [sum(g[j].astype(cdt) for g in act) / n_blocks for j in range(len(active))]
            mean = _pmean(mean, names)
            return [mean] * n_blocks

        # Guard against the shard_map trap: a gradient of replicated params is
        # already summed over the devices, so per-device perturbation is lost.
        if manual and not sync_perturbation and _vma_checked(manual):
            for b, g in enumerate(block_leaves):
                for i in active:
                    if not set(manual) <= _varying_axes(g[i]):
                        raise ValueError(
                            f"sam(axis_name={axis_name!r}): the incoming gradient "
                            f"({'updates' if grouped_objective is None else f'grouped_objective.grads[{b}]'}) "
                            f"is the same on every device of axis {manual}: it was "
                            "taken with respect to replicated params, and shard_map "
                            "has already summed it over the devices. Differentiate "
                            f"with respect to jax.lax.pcast(params, {manual!r}, "
                            "to='varying') to keep each device's own gradient, or "
                            "pass sync_perturbation=True."
                        )

        dir_grads = direction_grads(block_leaves)
        scale = scale_of(w_act_c)

        # ---- first step (eq. 2) ----
        if direction == "random":
            key = jax.random.wrap_key_data(state.key)
            if names and not sync_perturbation:
                for n in names:
                    key = jax.random.fold_in(key, jax.lax.axis_index(n))
            deltas = [
                [
                    rho_c * d
                    for d in dirs.random_unit(jax.random.fold_in(key, b), w_act, act_masks, p, cdt)
                ]
                for b in range(n_blocks)
            ]
        else:
            deltas = [[rho_c * d for d in unit_step(g, scale)] for g in dir_grads]

        # ---- further projected ascent steps (appendix C.6) ----
        def ascent_step(deltas: list[list[jax.Array]]) -> list[list[jax.Array]]:
            g_blocks = block_gradients(perturbed_blocks([to_eps(d, scale) for d in deltas]))
            return [
                dirs.project([d + rho_c * u for d, u in zip(delta, unit_step(g, scale))], p, rho_c)
                for delta, g in zip(deltas, direction_grads(g_blocks))
            ]

        if isinstance(ascent_steps, int):
            for _ in range(ascent_steps - 1):
                deltas = ascent_step(deltas)
        else:
            deltas = jax.lax.fori_loop(1, ascent_steps, lambda _, d: ascent_step(d), deltas)

        eps_blocks = [to_eps(d, scale) for d in deltas]

        # ---- the SAM gradient (eq. 3) ----
        v_blocks = block_gradients(perturbed_blocks(eps_blocks))
        if n_blocks == 1:
            out = [v.astype(cdt) for v in v_blocks[0]]
        else:
            out = [
                sum(vb[i].astype(cdt) for vb in v_blocks) / n_blocks for i in range(len(w_leaves))
            ]

        # ---- second-order term (appendix C.4) ----
        if second_order:
            if sync_perturbation:
                v_mean = _pmean([out[i] for i in active], names)
                v_eff = [v_mean] * n_blocks
            else:
                v_eff = [[vb[i].astype(cdt) for i in active] for vb in v_blocks]
            tangents, w_terms = [], []
            for g, v in zip(dir_grads, v_eff):
                _, pullback = jax.vjp(eps_of, [x.astype(cdt) for x in g], w_act_c)
                u_g, u_w = pullback(v)
                leaves = [jnp.zeros_like(w) for w in w_leaves]
                for i, u in zip(active, u_g):
                    leaves[i] = u.astype(w_leaves[i].dtype)
                tangents.append(jax.tree.unflatten(treedef, leaves))
                w_terms.append(u_w)
            at_w = tuple(
                jax.tree.unflatten(treedef, _as_varying(w_leaves, manual)) for _ in range(n_blocks)
            )
            _, hvp = jax.jvp(jax.grad(loss_only), (at_w,), (tuple(tangents),))
            hvp_leaves = [jax.tree.leaves(h) for h in hvp]
            for i in range(len(w_leaves)):
                # The objective is a mean over groups: each block's HVP is already / G.
                out[i] = out[i] + sum(h[i].astype(cdt) for h in hvp_leaves)
            if adaptive:
                for j, i in enumerate(active):
                    out[i] = out[i] + sum(wt[j] for wt in w_terms) / n_blocks

        out = _pmean(out, names)
        out = [o.astype(u.dtype) for o, u in zip(out, up_leaves)]
        if rho_static is None:
            zero = rho_c == 0
            out = [jnp.where(zero, b, o) for b, o in zip(baseline(), out)]
        return jax.tree.unflatten(jax.tree.structure(updates), out), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
