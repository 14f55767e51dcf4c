"""RST and AE-SAM: a SAM step on some steps, the base step on the others.

Both choose the branch per step with ``lax.cond``: the branch not taken does
not run, so a base step costs one gradient (the caller's).
"""

from __future__ import annotations

from typing import Any
from typing import NamedTuple
from typing import Unpack

import jax
import jax.numpy as jnp
import optax

from sam_optax import _axes
from sam_optax import _family
from sam_optax._family import SAMOptionKeywords

__all__ = ["AESAMMemory", "aesam", "rst"]


def _switch(step: _family.Step, take: jax.Array) -> tuple[Any, _family.Diagnostics]:
    """``lax.cond(take, SAM step, base step)``."""
    return jax.lax.cond(take, lambda: _family.sam_branch(step), lambda: _family.base_step(step))


def rst(
    rho: optax.ScalarOrSchedule = 0.05,
    probability: optax.ScalarOrSchedule = 0.5,
    **options: Unpack[SAMOptionKeywords],
) -> optax.GradientTransformationExtraArgs:
    r"""Randomized sharpness-aware training: a SAM step with probability :math:`p_t`, else the base step.

    Each step draws :math:`X_t \sim \mathrm{Bernoulli}(p_t)` from the key in
    the state (``seed``); on :math:`X_t = 1` it hands on the SAM gradient,
    otherwise the clean one. The expected cost is :math:`1 + \bar p`
    gradients a step: the branch not taken does not run (``lax.cond``).
    ``probability`` may be a schedule of the step count (the paper studies
    constant, linear and cosine ones). ``probability=1`` is :func:`sam`,
    ``probability=0`` the base optimizer. With ``axis_name`` one draw serves
    every device (the key is replicated), so all devices take the same
    branch; each perturbs with its own gradient. No code from the authors
    was found; the tests check the formula.

    Args:
      rho: radius, or a schedule of the step count.
      probability: :math:`p_t` in [0, 1], or a schedule.
      **options: the family's options (:class:`~sam_optax.SAMOptions`;
        ``seed`` seeds the draws).

    References:
      Zhao et al, `Randomized Sharpness-Aware Training for Boosting
      Computational Efficiency in Deep Learning <https://arxiv.org/abs/2203.09962>`_, 2022.
    """
    opts = _family.options_from("rst", options)
    _family.check_hyper("rst", "probability", probability, low=0.0, high=1.0)

    def take(step: _family.Step, memory: None) -> tuple[jax.Array, None]:
        p = probability(step.count) if callable(probability) else probability
        return jax.random.bernoulli(jax.random.fold_in(step.key, _family.DRAW), p), memory

    return _family.transformation("rst", rho, opts, _switching_rule(take), draws=True)


def _switching_rule(take_fn):
    """The rule of a switching method from ``take_fn(step, memory) -> (take, memory)``."""

    def rule(step: _family.Step, memory: Any) -> tuple[Any, Any, _family.Diagnostics]:
        take, memory = take_fn(step, memory)
        out, diagnostics = _switch(step, take)
        return out, memory, diagnostics

    return rule


class AESAMMemory(NamedTuple):
    """AE-SAM's memory: the running mean and variance of :math:`\\|g\\|^2` (scalars)."""

    mean: jax.Array
    variance: jax.Array


def aesam(
    rho: optax.ScalarOrSchedule = 0.05,
    threshold: optax.ScalarOrSchedule = 0.0,
    *,
    decay: float = 0.9,
    **options: Unpack[SAMOptionKeywords],
) -> optax.GradientTransformationExtraArgs:
    r"""AE-SAM: a SAM step when :math:`\|g\|^2` is high against its running statistics.

    With :math:`q_t = \|g_t\|^2` (the incoming gradient, free), running
    statistics :math:`\mu_t = \delta\mu_{t-1} + (1-\delta) q_t` and
    :math:`\sigma^2_t = \delta\sigma^2_{t-1} + \delta(1-\delta)(q_t - \mu_{t-1})^2`
    (the exponentially weighted variance; :math:`\mu_0 = q_0`,
    :math:`\sigma_0 = 0`), the step is SAM's when
    :math:`q_t \ge \mu_t + c_t \sigma_t`, the base step otherwise; the
    branch not taken does not run (``lax.cond``). ``threshold`` is
    :math:`c_t`, a number or a schedule; the paper moves it linearly from 1 to
    -1 over training (``optax.linear_schedule(1.0, -1.0, total_steps)``), so
    SAM steps grow more frequent. With ``axis_name``, :math:`q_t` is the
    device mean of each device's :math:`\|g_i\|^2`, so every device takes the
    same branch. No code from the authors was found; the tests check the
    formula.

    Args:
      rho: radius, or a schedule of the step count.
      threshold: :math:`c_t`, or a schedule.
      decay: :math:`\delta` of the running statistics, in [0, 1].
      **options: the family's options (:class:`~sam_optax.SAMOptions`).

    References:
      Jiang et al, `An Adaptive Policy to Employ Sharpness-Aware Minimization
      <https://arxiv.org/abs/2304.14647>`_, 2023.
    """
    opts = _family.options_from("aesam", options)
    _family.check_hyper("aesam", "threshold", threshold)
    _family.check_hyper("aesam", "decay", decay, low=0.0, high=1.0)

    def take(step: _family.Step, memory: AESAMMemory) -> tuple[jax.Array, AESAMMemory]:
        q = _axes.pmean(_family.norm(_family.clean_leaves(step)) ** 2, opts.axes)
        first = step.count == 0
        mean = jnp.where(first, q, decay * memory.mean + (1 - decay) * q)
        variance = jnp.where(
            first, 0.0, decay * memory.variance + decay * (1 - decay) * (q - memory.mean) ** 2
        )
        c = threshold(step.count) if callable(threshold) else threshold
        return q >= mean + c * jnp.sqrt(variance), AESAMMemory(mean, variance)

    def init_memory(params: Any) -> AESAMMemory:
        del params
        return AESAMMemory(jnp.zeros([], jnp.float32), jnp.zeros([], jnp.float32))

    return _family.transformation(
        "aesam", rho, opts, _switching_rule(take), init_memory=init_memory
    )
