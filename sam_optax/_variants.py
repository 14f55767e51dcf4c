"""The efficient (and friendlier) SAM family, under ``sam``'s contract.

Every factory here returns an ``optax.GradientTransformationExtraArgs`` with
``update(grads, state, params, *, value_fn, value=None, ...)``, takes ``sam``'s
perturbation options (``norm``, ``adaptive``, ``mask``, ``axis_name``, ...)
and records the same :class:`~sam_optax.Diagnostics`. Each is a few stages
of :mod:`sam_optax._family` composed:

* :func:`gsam`: the SAM gradient minus :math:`\\alpha` times the clean
  gradient's component orthogonal to it (Zhuang et al., 2022);
* :func:`looksam`: a full SAM step every k steps, in between the clean
  gradient plus the stored orthogonal direction (Liu et al., 2022);
* :func:`msam`: the gradient at :math:`w - \\rho\\,\\hat d` with :math:`d`
  the momentum, one gradient per step (Becker et al., 2024);
* :func:`rst`, :func:`aesam`: SAM with probability :math:`p_t` (Zhao et
  al., 2022) or when :math:`\\|g\\|^2` is high against its running
  statistics (Jiang et al., 2023); the other steps are the base step, and the
  branch not taken does not run (``lax.cond``);
* :func:`fsam`: the perturbation from :math:`g - \\sigma m`, :math:`m` a
  running mean of gradients (Li et al., 2024).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax import _axes
from sam_optax import _checks
from sam_optax import _family
from sam_optax._family import Call
from sam_optax._family import Diagnostics
from sam_optax._family import Options

__all__ = [
    "AESAMState",
    "FSAMState",
    "GSAMState",
    "LookSAMState",
    "MSAMState",
    "RSTState",
    "aesam",
    "fsam",
    "gsam",
    "looksam",
    "msam",
    "rho_from_learning_rate",
    "rst",
]

Leaves = list[jax.Array]


# --------------------------------------------------------------------------
# Shared pieces.
# --------------------------------------------------------------------------


def _float_leaves(tree: Any) -> Leaves:
    """Leaves in at least float32 (complex stays complex)."""
    return [x.astype(jnp.promote_types(x.dtype, jnp.float32)) for x in jax.tree.leaves(tree)]


def _scaled_sum(a: Leaves, b: Leaves, beta: Any) -> Leaves:
    """``a + beta * b`` leafwise."""
    return [x + beta * y for x, y in zip(a, b)]


def _projection_coefficient(x: Leaves, onto: Leaves) -> jax.Array:
    r""":math:`\langle x, u\rangle / \|u\|^2` (0 when :math:`u = 0`)."""
    sq = _family.inner(onto, onto)
    return jnp.where(sq > 0, _family.inner(x, onto) / jnp.where(sq > 0, sq, 1.0), 0.0)


def _unit(x: Leaves) -> Leaves:
    n = _family.norm(x)
    return [v / jnp.where(n > 0, n, 1.0) for v in x]


def _zeros_f32(params: Any) -> Any:
    """A params-shaped buffer of zeros in at least float32."""
    return jax.tree.map(
        lambda w: jnp.zeros_like(w, jnp.promote_types(w.dtype, jnp.float32)), params
    )


def _options(kwargs: dict[str, Any]) -> Options:
    return _family.make_options(**kwargs)


def _takes_sam_options(factory: Callable[..., Any]) -> Callable[..., Any]:
    """Lists ``sam``'s perturbation options in the factory's signature.

    The factories take them as ``**options``; ``optax.inject_hyperparams``
    (and ``help``) read the signature, so it names each one with its default.
    """
    sig = inspect.signature(factory)
    own = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
    shared = list(inspect.signature(_family.make_options).parameters.values())
    factory.__signature__ = sig.replace(parameters=own + shared)
    return factory


def _sam_branch(call: Call, options: Options, rho: Any, key: Any = None) -> tuple[Any, Diagnostics]:
    """The SAM step: the averaged SAM gradient and its diagnostics."""
    local, info = _family.sam_update(call, options, rho, key)
    return _family.finish(call, options, local), _family.measure(call, options, local, info, True)


def _random_key(options: Options, key: jax.Array | None) -> jax.Array | None:
    """The key of random directions, when ``direction='random'``."""
    if options.ascent.direction != "random" or key is None:
        return None
    return jax.random.fold_in(jax.random.wrap_key_data(key), 1)


# --------------------------------------------------------------------------
# GSAM.
# --------------------------------------------------------------------------


def rho_from_learning_rate(
    learning_rate: optax.Schedule,
    rho_max: float,
    rho_min: float = 0.0,
    *,
    lr_max: float | None = None,
    lr_min: float = 0.0,
) -> optax.Schedule:
    r"""GSAM's radius tied to the learning rate, as a schedule of the step count.

    :math:`\rho_t = \rho_{min} + (\rho_{max} - \rho_{min})\,(\eta_t - \eta_{min})
    / (\eta_{max} - \eta_{min})`, clipped at 0 (a warm-up would otherwise make
    it negative). ``lr_max`` defaults to ``learning_rate(0)``; pass the peak
    when the schedule warms up. Give the result as ``rho=`` to any factory.

    Examples:
      >>> import optax, sam_optax
      >>> lr = optax.cosine_decay_schedule(0.1, 100)
      >>> rho = sam_optax.rho_from_learning_rate(lr, rho_max=0.1, rho_min=0.02)
      >>> print(round(float(rho(0)), 3), round(float(rho(100)), 3))
      0.1 0.02
    """
    peak = float(learning_rate(0)) if lr_max is None else float(lr_max)
    if not peak > lr_min:
        raise ValueError(f"lr_max must be > lr_min, got lr_max={peak}, lr_min={lr_min}.")
    _checks.check_nonnegative("rho_max", rho_max)
    _checks.check_nonnegative("rho_min", rho_min)

    def schedule(count: jax.Array) -> jax.Array:
        frac = (learning_rate(count) - lr_min) / (peak - lr_min)
        return jnp.maximum(rho_min + (rho_max - rho_min) * frac, 0.0)

    return schedule


@_takes_sam_options
def gsam(
    rho: optax.ScalarOrSchedule = 0.05,
    alpha: jax.typing.ArrayLike = 0.1,
    **options: Any,
) -> optax.GradientTransformationExtraArgs:
    r"""GSAM: the SAM gradient minus :math:`\alpha` times the clean gradient's orthogonal part.

    .. math::

      g_\perp = g - \frac{\langle g, g_{SAM}\rangle}{\|g_{SAM}\|^2} g_{SAM},
      \qquad g_{GSAM} = g_{SAM} - \alpha\, g_\perp

    Descending along :math:`-g_{SAM}` minimizes the perturbed loss; the
    :math:`+\alpha g_\perp` move lowers the surrogate gap :math:`L(w+\epsilon)
    - L(w)` without changing the perturbed loss to first order. ``alpha=0``
    is :func:`sam` exactly. GSAM ties :math:`\rho` to the learning rate: pass
    ``rho=rho_from_learning_rate(lr_schedule, rho_max, rho_min)``. With
    ``axis_name`` the decomposition is per device (each device's own
    :math:`g` and :math:`g_{SAM}`) and the results are averaged, as in the
    authors' JAX code. Two gradients per step.

    Args:
      rho: radius, or a schedule of the step count.
      alpha: weight of the orthogonal correction.
      **options: ``sam``'s perturbation options (``norm``, ``adaptive``,
        ``mask``, ``axis_name``, ...).

    References:
      Zhuang et al, `Surrogate Gap Guided Sharpness-Aware Minimization
      <https://arxiv.org/abs/2203.08065>`_, 2022.
    """
    _checks.check_nonnegative("rho", rho)
    _checks.check_nonnegative("alpha", alpha)
    opts = _options(options)
    alpha_zero = _checks.concrete_float(alpha) == 0.0

    def init_fn(params: Any) -> GSAMState:
        del params
        return GSAMState(*_fresh(opts))

    def step(call: Call, state: GSAMState) -> tuple[Any, GSAMState]:
        count, key = _advance(state)
        if _family.skips_perturbation(rho, call):
            out, diagnostics = _family.base_step(call, opts)
            return out, GSAMState(count, key, diagnostics)
        rho_t = _family.schedule_value(rho, state.count)
        local, info = _family.sam_update(call, opts, rho_t, _random_key(opts, state.key))
        if not alpha_zero:
            g = _float_leaves(call.updates)
            coef = _projection_coefficient(g, local)
            perp = [x - coef * s.astype(x.dtype) for x, s in zip(g, local)]
            local = [s - alpha * p.astype(s.dtype) for s, p in zip(local, perp)]
        diagnostics = _family.measure(call, opts, local, info, True)
        return _family.finish(call, opts, local), GSAMState(count, key, diagnostics)

    return _family.transformation("gsam", opts, init_fn, step)


class GSAMState(NamedTuple):
    """State of :func:`gsam`: a count, a key (random directions), diagnostics."""

    count: jax.Array
    key: jax.Array
    diagnostics: Diagnostics


class RSTState(NamedTuple):
    """State of :func:`rst`: a count, the key of the draws, diagnostics."""

    count: jax.Array
    key: jax.Array
    diagnostics: Diagnostics


def _fresh(opts: Options) -> tuple[jax.Array, jax.Array, Diagnostics]:
    """``(count, key, diagnostics)`` of a new state."""
    key = jax.random.key_data(jax.random.key(opts.seed))
    return jnp.zeros([], jnp.int32), key, _family.initial_diagnostics()


def _advance(state: Any) -> tuple[jax.Array, jax.Array]:
    """The next ``(count, key)``."""
    return optax.safe_increment(state.count), _family.next_key(state.key)


# --------------------------------------------------------------------------
# LookSAM.
# --------------------------------------------------------------------------


class LookSAMState(NamedTuple):
    """State of :func:`looksam`: the stored unit direction :math:`\\hat g_v` (params-sized)."""

    count: jax.Array
    key: jax.Array
    direction: Any
    diagnostics: Diagnostics


@_takes_sam_options
def looksam(
    rho: optax.ScalarOrSchedule = 0.05,
    every: int = 5,
    alpha: jax.typing.ArrayLike = 0.7,
    **options: Any,
) -> optax.GradientTransformationExtraArgs:
    r"""LookSAM: the full SAM step every k steps, the stored ascent direction in between.

    On steps :math:`t \equiv 0 \pmod k` it takes the SAM gradient
    :math:`g_s` and stores the unit direction of its component orthogonal to
    the clean gradient, :math:`g_v = g_s - \frac{\langle g_s, g\rangle}{\|g\|^2} g`;
    on the other steps it hands on :math:`g + \alpha\,\|g\|\,\hat g_v`: one
    gradient, since the branch is a ``lax.cond``. ``every=1`` is :func:`sam`.
    The state holds :math:`\hat g_v`, one params-sized buffer (what LookSAM
    reuses). With ``axis_name`` each device perturbs with its own gradient on
    SAM steps; :math:`g_v` comes from the device-averaged gradients, so the
    stored direction is the same on every device.

    Args:
      rho: radius, or a schedule of the step count.
      every: k, the period of the full SAM step.
      alpha: weight of the reused direction.
      **options: ``sam``'s perturbation options.

    References:
      Liu et al, `Towards Efficient and Scalable Sharpness-Aware Minimization
      <https://arxiv.org/abs/2203.02714>`_, 2022.
    """
    _checks.check_nonnegative("rho", rho)
    _checks.check_nonnegative("alpha", alpha)
    every = _checks.check_positive_int("every", every)
    opts = _options(options)

    def init_fn(params: Any) -> LookSAMState:
        count, key, diagnostics = _fresh(opts)
        return LookSAMState(count, key, jax.tree.map(jnp.zeros_like, params), diagnostics)

    def step(call: Call, state: LookSAMState) -> tuple[Any, LookSAMState]:
        count, key = _advance(state)
        if _family.skips_perturbation(rho, call):
            out, diagnostics = _family.base_step(call, opts)
            return out, LookSAMState(count, key, state.direction, diagnostics)
        rho_t = _family.schedule_value(rho, state.count)
        g = _float_leaves(_axes.pmean(call.updates, opts.axes))
        treedef = jax.tree.structure(call.updates)

        def full(stored):
            out, diagnostics = _sam_branch(call, opts, rho_t, _random_key(opts, state.key))
            g_s = _float_leaves(out)
            coef = _projection_coefficient(g_s, g)
            unit = _unit([s - coef * x for s, x in zip(g_s, g)])
            return out, _cast_like(unit, stored), diagnostics

        def reuse(stored):
            step = alpha * _family.norm(g)
            leaves = _scaled_sum(g, _float_leaves(stored), step)
            out = jax.tree.unflatten(
                treedef, [x.astype(u.dtype) for x, u in zip(leaves, jax.tree.leaves(call.updates))]
            )
            return out, stored, _family.measure(call, opts, jax.tree.leaves(out), None, False)

        out, direction, diagnostics = jax.lax.cond(
            state.count % every == 0, full, reuse, state.direction
        )
        return out, LookSAMState(count, key, direction, diagnostics)

    return _family.transformation("looksam", opts, init_fn, step)


def _cast_like(leaves: Leaves, like: Any) -> Any:
    return jax.tree.unflatten(
        jax.tree.structure(like), [x.astype(y.dtype) for x, y in zip(leaves, jax.tree.leaves(like))]
    )


# --------------------------------------------------------------------------
# MSAM.
# --------------------------------------------------------------------------


class MSAMState(NamedTuple):
    """State of :func:`msam`: the momentum :math:`d` (params-sized) and the diagnostics."""

    count: jax.Array
    momentum: Any
    diagnostics: Diagnostics


def msam(
    rho: optax.ScalarOrSchedule = 0.3,
    *,
    momentum: float = 0.9,
    mask: Any = None,
    axis_name: Any = None,
    has_aux: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""Momentum-SAM: the gradient at :math:`w - \rho\, \hat d`, one gradient per step.

    :math:`d` is a momentum of the gradients handed on,
    :math:`d \leftarrow \mu d + g_{MSAM}` (the direction SGD's trace and
    Adam's first moment share), and the perturbation goes along
    :math:`-d`, where the base optimizer is about to move:

    .. math::

      g_{MSAM} = \nabla L(w - \rho\, d / \|d\|)

    (the first step, with :math:`d = 0`, is unperturbed). ``msam`` takes
    that gradient through ``value_fn`` and never reads the incoming one:
    under ``jit`` the caller's clean gradient is then dead code and XLA drops
    it, so a step costs one gradient (``benchmarks/efficient.py`` measures
    it). The params stay unperturbed (no shifting back before evaluation).
    ``rho`` is not scaled by the learning rate; the paper uses a much larger
    radius than SAM's. With ``axis_name`` the perturbation comes from the
    replicated momentum (the same on every device) and the gradients are
    averaged. The diagnostics hold ``perturbed_loss`` and (with ``value=``)
    ``sharpness``; ``grad_norm`` and ``cosine`` would need the clean gradient,
    so they are NaN.

    Args:
      rho: radius, or a schedule of the step count.
      momentum: :math:`\mu` of the direction's momentum (that of the base optimizer).
      mask: which leaves are perturbed (as in :func:`sam`).
      axis_name: the data-parallel axis.
      has_aux: ``value_fn`` returns ``(loss, aux)``.

    References:
      Becker et al, `Momentum-SAM: Sharpness Aware Minimization without
      Computational Overhead <https://arxiv.org/abs/2401.12033>`_, 2024.
    """
    _checks.check_nonnegative("rho", rho)
    _checks.check_in_range("momentum", momentum, 0.0, 1.0)
    opts = _options({"mask": mask, "axis_name": axis_name, "has_aux": has_aux})

    def init_fn(params: Any) -> MSAMState:
        return MSAMState(
            jnp.zeros([], jnp.int32), _zeros_f32(params), _family.initial_diagnostics()
        )

    def step(call: Call, state: MSAMState) -> tuple[Any, MSAMState]:
        if _family.skips_perturbation(rho, call):
            out, diagnostics = _family.base_step(call, opts)
        else:
            out, diagnostics = _msam_gradient(
                call, opts, _family.schedule_value(rho, state.count), state.momentum
            )
        d = jax.tree.map(lambda m, u: momentum * m + u.astype(m.dtype), state.momentum, out)
        return out, MSAMState(optax.safe_increment(state.count), d, diagnostics)

    return _family.transformation("msam", opts, init_fn, step)


def _msam_gradient(call: Call, opts: Options, rho: Any, d: Any) -> tuple[Any, Diagnostics]:
    sel = call.sel
    unit = _unit(sel.take(d))
    leaves = jax.tree.leaves(call.params)
    moved = [
        (leaves[i].astype(sel.dtype) - rho * u).astype(leaves[i].dtype)
        for i, u in zip(sel.indices, unit)
    ]
    point = _axes.as_varying(
        jax.tree.unflatten(sel.treedef, sel.place(moved, leaves)), _axes.manual_axes(opts.axes)
    )
    loss, grads = jax.value_and_grad(call.objective.loss)((point,) * call.objective.n_groups)
    local = [sum(g) for g in zip(*[jax.tree.leaves(gi) for gi in grads])]
    local = [jnp.conj(g) if jnp.iscomplexobj(g) else g for g in local]
    out = _family.finish(call, opts, local)
    perturbed = _axes.pmean(loss.astype(jnp.float32), opts.axes)
    clean = (
        jnp.nan
        if call.value is None
        else _axes.pmean(jnp.asarray(call.value, jnp.float32), opts.axes)
    )
    nan = jnp.full([], jnp.nan, jnp.float32)
    return out, Diagnostics(perturbed - clean, perturbed, nan, nan, jnp.asarray(True))


# --------------------------------------------------------------------------
# Switching between SAM and the base step: RST and AE-SAM.
# --------------------------------------------------------------------------


def _switch(
    call: Call, opts: Options, rho: Any, take: jax.Array, key: Any
) -> tuple[Any, Diagnostics]:
    """``lax.cond(take, SAM step, base step)``: the branch not taken does not run."""
    return jax.lax.cond(
        take,
        lambda: _sam_branch(call, opts, rho, key),
        lambda: _family.base_step(call, opts),
    )


@_takes_sam_options
def rst(
    rho: optax.ScalarOrSchedule = 0.05,
    probability: optax.ScalarOrSchedule = 0.5,
    **options: Any,
) -> optax.GradientTransformationExtraArgs:
    r"""Randomized sharpness-aware training: a SAM step with probability :math:`p_t`, else the base step.

    Each step draws :math:`X_t \sim \mathrm{Bernoulli}(p_t)` from a key in
    the state (``seed``); on :math:`X_t = 1` it hands on the SAM gradient,
    otherwise the clean one. The expected cost is :math:`1 + \bar p`
    gradients a step: the branch not taken does not run (``lax.cond``).
    ``probability`` may be a schedule of the step count (the paper studies
    constant, linear and cosine ones). ``probability=1`` is :func:`sam`,
    ``probability=0`` the base optimizer. With ``axis_name`` one draw serves
    every device (the key is replicated), so all devices take the same
    branch; each perturbs with its own gradient.

    Args:
      rho: radius, or a schedule of the step count.
      probability: :math:`p_t` in [0, 1], or a schedule.
      **options: ``sam``'s perturbation options (``seed`` seeds the draws).

    References:
      Zhao et al, `Randomized Sharpness-Aware Training for Boosting
      Computational Efficiency in Deep Learning <https://arxiv.org/abs/2203.09962>`_, 2022.
    """
    _checks.check_nonnegative("rho", rho)
    _checks.check_in_range("probability", probability, 0.0, 1.0)
    opts = _options(options)

    def init_fn(params: Any) -> RSTState:
        del params
        return RSTState(*_fresh(opts))

    def step(call: Call, state: RSTState) -> tuple[Any, RSTState]:
        count, key = _advance(state)
        if _family.skips_perturbation(rho, call):
            out, diagnostics = _family.base_step(call, opts)
            return out, RSTState(count, key, diagnostics)
        draw = jax.random.fold_in(jax.random.wrap_key_data(state.key), 0)
        take = jax.random.bernoulli(draw, _family.schedule_value(probability, state.count))
        rho_t = _family.schedule_value(rho, state.count)
        out, diagnostics = _switch(call, opts, rho_t, take, _random_key(opts, state.key))
        return out, RSTState(count, key, diagnostics)

    return _family.transformation("rst", opts, init_fn, step)


class AESAMState(NamedTuple):
    """State of :func:`aesam`: running mean and variance of :math:`\\|g\\|^2` (scalars)."""

    count: jax.Array
    key: jax.Array
    mean: jax.Array
    variance: jax.Array
    diagnostics: Diagnostics


@_takes_sam_options
def aesam(
    rho: optax.ScalarOrSchedule = 0.05,
    threshold: optax.ScalarOrSchedule = 0.0,
    *,
    decay: float = 0.9,
    **options: Any,
) -> optax.GradientTransformationExtraArgs:
    r"""AE-SAM: a SAM step when :math:`\|g\|^2` is high against its running statistics.

    With :math:`q_t = \|g_t\|^2` (the incoming gradient, free), running
    statistics :math:`\mu_t = \delta\mu_{t-1} + (1-\delta) q_t` and
    :math:`\sigma^2_t = \delta\sigma^2_{t-1} + \delta(1-\delta)(q_t - \mu_{t-1})^2`
    (the exponentially weighted variance)
    (:math:`\mu_0 = q_0`, :math:`\sigma_0 = 0`), the step is SAM's when
    :math:`q_t \ge \mu_t + c_t \sigma_t`, the base step otherwise; the
    branch not taken does not run (``lax.cond``). ``threshold`` is
    :math:`c_t`, a number or a schedule; the paper moves it linearly from 1 to
    -1 over training (``optax.linear_schedule(1.0, -1.0, total_steps)``), so
    SAM steps grow more frequent. With ``axis_name``, :math:`q_t` is the
    device mean of each device's :math:`\|g_i\|^2`, so every device takes the
    same branch.

    Args:
      rho: radius, or a schedule of the step count.
      threshold: :math:`c_t`, or a schedule.
      decay: :math:`\delta` of the running statistics.
      **options: ``sam``'s perturbation options.

    References:
      Jiang et al, `An Adaptive Policy to Employ Sharpness-Aware Minimization
      <https://arxiv.org/abs/2304.14647>`_, 2023.
    """
    _checks.check_nonnegative("rho", rho)
    _checks.check_in_range("decay", decay, 0.0, 1.0)
    opts = _options(options)

    def init_fn(params: Any) -> AESAMState:
        del params
        count, key, diagnostics = _fresh(opts)
        zero = jnp.zeros([], jnp.float32)
        return AESAMState(count, key, zero, zero, diagnostics)

    def step(call: Call, state: AESAMState) -> tuple[Any, AESAMState]:
        q = _axes.pmean(_family.norm(jax.tree.leaves(call.updates)) ** 2, opts.axes)
        first = state.count == 0
        mean = jnp.where(first, q, decay * state.mean + (1 - decay) * q)
        variance = jnp.where(
            first, 0.0, decay * state.variance + decay * (1 - decay) * (q - state.mean) ** 2
        )
        count, key = _advance(state)
        if _family.skips_perturbation(rho, call):
            out, diagnostics = _family.base_step(call, opts)
        else:
            c = _family.schedule_value(threshold, state.count)
            take = q >= mean + c * jnp.sqrt(variance)
            rho_t = _family.schedule_value(rho, state.count)
            out, diagnostics = _switch(call, opts, rho_t, take, _random_key(opts, state.key))
        return out, AESAMState(count, key, mean, variance, diagnostics)

    return _family.transformation("aesam", opts, init_fn, step)


# --------------------------------------------------------------------------
# F-SAM.
# --------------------------------------------------------------------------


class FSAMState(NamedTuple):
    """State of :func:`fsam`: :math:`m`, the running mean of the gradients (params-sized)."""

    count: jax.Array
    key: jax.Array
    average: Any
    diagnostics: Diagnostics


@_takes_sam_options
def fsam(
    rho: optax.ScalarOrSchedule = 0.05,
    sigma: jax.typing.ArrayLike = 1.0,
    *,
    decay: float = 0.6,
    **options: Any,
) -> optax.GradientTransformationExtraArgs:
    r"""Friendly SAM: the perturbation from :math:`g - \sigma m`, :math:`m` a running mean of gradients.

    :math:`m` estimates the full-batch gradient; removing it leaves the
    batch-specific part of :math:`g`, which the authors find to be what helps
    generalization:

    .. math::

      d_t = g_t - \sigma m_{t-1}, \qquad \hat\epsilon = \rho\, d_t / \|d_t\|,
      \qquad m_t = \lambda m_{t-1} + (1 - \lambda) g_t

    (:math:`m_0 = g_0`, so the first step is SAM's; the official code's
    order). Two gradients per step, like SAM. ``sigma=0`` is :func:`sam`.
    With ``axis_name`` each device's direction is its own :math:`g_i -
    \sigma m` and :math:`m` is the running mean of the device-averaged
    gradient (one more all-reduce of the gradient per step), so it is the same
    on every device.

    Args:
      rho: radius, or a schedule of the step count.
      sigma: :math:`\sigma`, the weight of the running mean removed.
      decay: :math:`\lambda` of the running mean.
      **options: ``sam``'s perturbation options.

    References:
      Li et al, `Friendly Sharpness-Aware Minimization
      <https://arxiv.org/abs/2403.12350>`_, 2024.
    """
    _checks.check_nonnegative("rho", rho)
    _checks.check_in_range("decay", decay, 0.0, 1.0)
    opts = _options(options)

    def init_fn(params: Any) -> FSAMState:
        count, key, diagnostics = _fresh(opts)
        return FSAMState(count, key, _zeros_f32(params), diagnostics)

    def step(call: Call, state: FSAMState) -> tuple[Any, FSAMState]:
        count, key = _advance(state)
        first = state.count == 0
        mean_grad = _axes.pmean(call.updates, opts.axes)
        average = jax.tree.map(
            lambda m, g: jnp.where(
                first, g.astype(m.dtype), decay * m + (1 - decay) * g.astype(m.dtype)
            ),
            state.average,
            mean_grad,
        )
        if _family.skips_perturbation(rho, call):
            out, diagnostics = _family.base_step(call, opts)
            return out, FSAMState(count, key, average, diagnostics)
        directions = [_friendly(g, state.average, sigma, first) for g in call.objective.grads]
        rho_t = _family.schedule_value(rho, state.count)
        local, info = _family.sam_update(
            call, opts, rho_t, _random_key(opts, state.key), directions
        )
        diagnostics = _family.measure(call, opts, local, info, True)
        return _family.finish(call, opts, local), FSAMState(count, key, average, diagnostics)

    return _family.transformation("fsam", opts, init_fn, step)


def _friendly(g: Any, average: Any, sigma: Any, first: jax.Array) -> Any:
    """``g - sigma * m`` (``g`` itself on the first step)."""
    return jax.tree.map(lambda x, m: jnp.where(first, x, x - sigma * m.astype(x.dtype)), g, average)
