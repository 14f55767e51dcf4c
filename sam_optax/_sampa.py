r"""SAMPa: SAM's two gradients made independent, so that two device groups take them at once."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Hashable
from typing import Any
from typing import NamedTuple
from typing import Unpack

import jax
import jax.numpy as jnp
import optax

from sam_optax import _axes
from sam_optax import _checks
from sam_optax import _family
from sam_optax._directions import dual_unit
from sam_optax._family import SAMOptionKeywords

__all__ = ["SAMPaMemory", "sampa"]

# The arguments of update that sampa keeps to itself (not the base optimizer's).
_OWN_ARGS = ("_previous_loss", "_pair_axis")


class SAMPaMemory(NamedTuple):
    """SAMPa's memory: the base optimizer's state and :math:`\\nabla f(y_t)` (params-sized)."""

    base: Any
    direction: Any


def sampa(
    inner: optax.GradientTransformation,
    rho: optax.ScalarOrSchedule = 0.1,
    lam: jax.typing.ArrayLike = 0.2,
    **options: Unpack[SAMOptionKeywords],
) -> optax.GradientTransformationExtraArgs:
    r"""SAMPa: SAM parallelized, the perturbation taken from a second sequence's last gradient.

    SAM's second gradient is taken where the first points, so the two run one
    after the other. SAMPa (Xie, Pethick and Cevher, 2024) takes the
    perturbation from the gradient at a second point :math:`y_t`, computed
    the step before, so that both of a step's gradients depend only on
    :math:`x_t` and :math:`\nabla f(y_t)`:

    .. math::

      \tilde x_t = x_t + \rho\, \nabla f(y_t) / (\|\nabla f(y_t)\| + 10^{-12}),
      \qquad y_{t+1} = x_t + u_{\mathrm{base}}(\nabla f(y_t)),

      g_t = (1 - \lambda)\, \nabla f(\tilde x_t) + \lambda\, \nabla f(y_{t+1}),

    and the base optimizer steps on :math:`g_t`; :math:`u_{\mathrm{base}}(g)`
    is the step the base optimizer *would* take from :math:`x_t` with
    gradient :math:`g` (its state is not advanced). On two device groups
    the two gradients take one gradient's time
    (:func:`sam_optax.parallel.sampa_step`, ``pair_axis``); on one device this
    transformation takes them in sequence (two gradients a step, for
    correctness and small runs).

    As the authors' code (LIONS-EPFL/SAMPa, ``train.py``) computes it, which
    ``tests/test_authors.py`` reproduces to 1e-10 in float64 with
    ``sampa(chain(add_decayed_weights(wd), sgd(lr, momentum)), rho, lam)``:

    * :math:`y_{t+1}` is torch SGD's step with momentum buffer and weight
      decay (the base's would-be update); the first step has no previous
      gradient, :math:`\nabla f(y_0) = 0`, so :math:`\tilde x_0 = y_1 = x_0`
      and the first step is the base's step on :math:`\nabla f(x_0)`.
    * :math:`\nabla f(\tilde x_t)` is taken on the *previous* batch (the one
      :math:`\nabla f(y_t)` was taken on), :math:`\nabla f(y_{t+1})` on the
      current one: pass ``previous_value_fn`` (the previous batch's loss;
      the step builders do when given ``previous_batch=``, and
      :func:`sam_optax.parallel.sampa_step` always); without it both are
      taken on ``value_fn``'s.
    * the paper's :math:`y_{t+1} = x_t - \eta_t \nabla f(y_t)` and plain step
      on :math:`g_t` are ``sampa(optax.sgd(lr), ...)``, with the first step
      as the authors' code takes it (above).
    * one difference kept on purpose: with momentum 0 and weight decay, the
      authors' y omits the decay (their code adds it only once SGD has a
      momentum buffer); here y is always the base's step, decay included.

    Any base optimizer works (its would-be update is the y step: Adam's for
    ``optax.adam``); the authors run torch SGD with momentum and decay. One
    that accumulates gradients (``optax.MultiSteps``) is refused: its
    would-be update is zero on every micro-batch but the last.
    The state holds :math:`\nabla f(y_t)` (one params-sized buffer) besides
    the base's. With ``axis_name`` each device takes both gradients on its
    shard and they are averaged. With ``update(..., pair_axis=name)`` (inside
    ``shard_map`` over a mesh axis of even size 2k, as
    :func:`sam_optax.parallel.sampa_step` calls it) the first k devices take
    :math:`\nabla f(\tilde x_t)` on their shards of the previous batch, the
    last k :math:`\nabla f(y_{t+1})` on their shards of the current one,
    each device one gradient, and one all-reduce gives both means (two
    params-sized buffers: the authors send one and divide :math:`\nabla f(y)`
    back out of the sum, which leaves the two ranks' states apart by the
    rounding; here every device's state stays the same).

    Diagnostics: ``perturbed_loss`` is :math:`f(\tilde x_t)` (on the previous
    batch when it is given), ``grad_norm`` :math:`\|\nabla f(y_{t+1})\|`, the
    next step's direction's norm; ``sharpness`` (with ``value=``) only when both
    gradients are taken on one batch.

    Args:
      inner: the base optimizer.
      rho: radius :math:`\rho` (the authors' default 0.1), or a schedule.
      lam: :math:`\lambda` (the authors' ``og``, default 0.2), the weight of
        :math:`\nabla f(y_{t+1})` in the step, in [0, 1]; injectable.
      **options: ``norm``, ``mask``, ``axis_name``, ``eps`` (1e-12, the
        authors') and ``has_aux`` of :class:`~sam_optax.SAMOptions`.

    Returns:
      A transformation whose ``update(updates, state, params, *, value_fn,
      previous_value_fn=None, pair_axis=None, value=None)`` does not read
      ``updates`` (the clean gradient at :math:`x_t` is not used: under
      ``jit`` XLA drops it); ``pair_axis`` names the mesh axis whose two
      halves take the two gradients.

    References:
      Xie, Pethick and Cevher, `SAMPa: Sharpness-aware Minimization
      Parallelized <https://arxiv.org/abs/2410.10683>`_, 2024.
    """
    _checks.check_base_optimizer(
        "sampa", inner, "sam_optax.sampa(optax.sgd(0.1, momentum=0.9), rho=0.1, lam=0.2)"
    )
    opts = _family.options_from(
        "sampa", options, refused=(*_family.GRADIENT_OPTIONS, "cosine", "seed")
    )
    _family.check_hyper("sampa", "lam", lam, low=0.0, high=1.0)
    inner = optax.with_extra_args_support(inner)

    def would_be(step: _family.Step, grads: Any, memory: SAMPaMemory) -> Any:
        """:math:`y = x + u_{base}(g)` (the base's state not advanced) on the selected leaves.

        ``x`` at the first step (no previous gradient), and on the leaves the
        mask leaves out (they are never moved from ``x``).
        """
        sel, params = step.call.sel, step.call.params
        update, _ = inner.update(grads, memory.base, params, **_base_args(step))
        moved = jax.tree.leaves(optax.apply_updates(params, update))
        first = step.count == 0
        leaves = jax.tree.leaves(params)
        kept = [jnp.where(first, leaves[i], moved[i]) for i in sel.indices]
        return jax.tree.unflatten(sel.treedef, sel.place(kept, leaves))

    def perturbed(step: _family.Step, direction: Any) -> Any:
        """:math:`\\tilde x = x + \\rho\\, d_p(\\nabla f(y_t))` on the selected leaves."""
        unit = dual_unit(step.call.sel.take(direction), opts.norm, opts.eps)
        return _family.moved(step, [step.rho * u for u in unit])

    def rule(step: _family.Step, memory: SAMPaMemory) -> tuple[Any, SAMPaMemory, Any]:
        call = step.call
        if call.groups is not None:
            raise ValueError(
                "sampa takes no grouped_objective (m-sharpness groups): its perturbation "
                "comes from the last step's gradient at y, not from each group's own."
            )
        manual = _axes.manual_axes(opts.axes)
        x_tilde = perturbed(step, memory.direction)
        y = would_be(step, memory.direction, memory)
        current = call.objective.loss
        previous = call.extra_args.get("_previous_loss") or current
        pair_axis = call.extra_args.get("_pair_axis")
        if pair_axis is None:
            f_x, g_x = jax.value_and_grad(lambda p: previous((p,)))(
                _axes.as_varying(x_tilde, manual)
            )
            g_y = jax.grad(lambda p: current((p,)))(_axes.as_varying(y, manual))
            g_x, g_y = _axes.pmean(optax.tree.conj((g_x, g_y)), opts.axes)
            f_x = _axes.pmean(f_x, opts.axes)
        else:
            f_x, g_x, g_y = _pair_gradients(current, x_tilde, y, pair_axis)
        total = jax.tree.map(lambda a, b: ((1 - lam) * a + lam * b).astype(a.dtype), g_x, g_y)
        out, base_state = inner.update(
            optax.tree.cast_like(total, call.updates), memory.base, call.params, **_base_args(step)
        )
        direction = optax.tree.cast_like(g_y, memory.direction)
        same_batch = previous is current and pair_axis is None
        diagnostics = _family.Diagnostics(
            sharpness=(
                f_x - _axes.pmean(jnp.asarray(call.value, jnp.float32), opts.axes)
                if same_batch and call.value is not None
                else jnp.full([], jnp.nan, jnp.float32)
            ).astype(jnp.float32),
            perturbed_loss=jnp.asarray(f_x, jnp.float32),
            grad_norm=_family.norm(jax.tree.leaves(g_y)).astype(jnp.float32),
            cosine=jnp.full([], jnp.nan, jnp.float32),
            sam_step=jnp.asarray(True),
        )
        return out, SAMPaMemory(base_state, direction), diagnostics

    def base(step: _family.Step, memory: SAMPaMemory) -> tuple[Any, SAMPaMemory, Any]:
        grads = _axes.pmean(step.call.updates, opts.axes)
        out, base_state = inner.update(grads, memory.base, step.call.params, **_base_args(step))
        return out, memory._replace(base=base_state), _family.measure(step, sam_step=False)

    def init_memory(params: Any) -> SAMPaMemory:
        base_state = inner.init(params)
        accumulating = lambda x: isinstance(x, optax.MultiStepsState)  # noqa: E731
        if any(accumulating(x) for x in jax.tree.leaves(base_state, is_leaf=accumulating)):
            raise ValueError(
                "sampa: the base optimizer accumulates gradients (optax.MultiSteps inside "
                "sampa); SAMPa takes y's step from the base's would-be update, which "
                "MultiSteps makes zero on every micro-batch but the last, so the micro-batches "
                "would not take SAMPa's gradients. Gradient accumulation is not supported "
                "with sampa (nor MultiSteps(sampa(...)), which keeps the last micro-batch's "
                "gradients alone): take the whole batch in each step."
            )
        return SAMPaMemory(base_state, _family.zeros_f32(params))

    transformation = _family.transformation(
        "sampa", rho, opts, rule, init_memory=init_memory, base=base
    )

    def update(
        updates: optax.Updates,
        state: _family.SAMState,
        params: optax.Params | None = None,
        *,
        value_fn: Callable[..., Any] | None = None,
        previous_value_fn: Callable[..., Any] | None = None,
        pair_axis: Hashable | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, _family.SAMState]:
        if pair_axis is not None:
            if pair_axis in opts.axes:
                raise ValueError(
                    f"sampa: pair_axis={pair_axis!r} is also in axis_name={opts.axis_name!r}; "
                    "the pair axis averages its halves itself: leave it out of axis_name."
                )
            _axes.check_bound((pair_axis,), "sampa(pair_axis)")
            extra_args["_pair_axis"] = pair_axis
        if previous_value_fn is not None:
            fn = _checks.check_value_fn(previous_value_fn, "sampa")
            checked = _checks.checked_loss(fn, opts.has_aux, "previous_value_fn", "sampa")
            extra_args["_previous_loss"] = lambda points: checked(points[0])
        return transformation.update(updates, state, params, value_fn=value_fn, **extra_args)

    return optax.GradientTransformationExtraArgs(transformation.init, update)


def _base_args(step: _family.Step) -> dict[str, Any]:
    """The extra arguments of the call that go on to the base optimizer."""
    return {k: v for k, v in step.call.extra_args.items() if k not in _OWN_ARGS}


def _pair_gradients(
    loss: Callable[[tuple[Any, ...]], jax.Array], x_tilde: Any, y: Any, axis: Hashable
) -> tuple[jax.Array, Any, Any]:
    """Each device one gradient: the first half at ``x_tilde``, the second at ``y``.

    Each device's ``loss`` is its own shard's (the first half holds the
    previous batch, the second the current one). One ``psum`` over ``axis``
    of the two halves' contributions gives each half's mean gradient, and
    the first half's mean loss, on every device.
    """
    size = jax.lax.axis_size(axis)
    if size % 2:
        raise ValueError(
            f"sampa(pair_axis={axis!r}): the axis has {size} devices; its two halves take the "
            "two gradients, so it needs an even size."
        )
    half = size // 2
    first = jax.lax.axis_index(axis) < half
    point = jax.tree.map(lambda a, b: jnp.where(first, a, b), x_tilde, y)
    point = _axes.as_varying(point, _axes.manual_axes((axis,)))
    value, grads = jax.value_and_grad(lambda p: loss((p,)))(point)
    grads = optax.tree.conj(grads)
    zero = jax.tree.map(jnp.zeros_like, grads)
    mine = (
        jax.tree.map(lambda g, z: jnp.where(first, g, z) / half, grads, zero),
        jax.tree.map(lambda g, z: jnp.where(first, z, g) / half, grads, zero),
        jnp.where(first, value, 0.0) / half,
    )
    g_x, g_y, f_x = jax.lax.psum(mine, axis)
    return f_x, g_x, g_y
