"""F-SAM and VaSSO: perturbations that come from a running mean of the gradients.

Both keep :math:`m`, an exponential moving average of the clean gradients
(averaged over the devices, so it is the same on every device), in the
state's ``memory`` (:class:`GradientAverage`, one params-sized buffer in at
least float32), starting from the first gradient. F-SAM perturbs along
:math:`g - \\sigma m_{t-1}`, VaSSO along :math:`m_t` itself.
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

__all__ = ["GradientAverage", "fsam", "vasso"]


class GradientAverage(NamedTuple):
    """The memory of F-SAM and VaSSO: the running mean of the (device-averaged) gradients."""

    average: Any


def _updated(step: _family.Step, memory: GradientAverage, new: Any) -> GradientAverage:
    """``m_t``: the first gradient at step 0, then ``(1 - new) m + new g`` (``g`` device-averaged)."""
    first = step.count == 0
    mean_grad = _axes.pmean(step.call.updates, step.options.axes)
    return GradientAverage(
        jax.tree.map(
            lambda m, g: jnp.where(
                first, g.astype(m.dtype), (1 - new) * m + new * g.astype(m.dtype)
            ),
            memory.average,
            mean_grad,
        )
    )


def _init_memory(params: Any) -> GradientAverage:
    return GradientAverage(_family.zeros_f32(params))


def fsam(
    rho: optax.ScalarOrSchedule = 0.05,
    sigma: jax.typing.ArrayLike = 1.0,
    *,
    decay: float = 0.6,
    **options: Unpack[SAMOptionKeywords],
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

    The authors' code (nblt/F-SAM, ``FriendlySAM``) is reproduced by
    ``chain(fsam(rho, sigma, decay=lmbda, eta=0.0), add_decayed_weights(wd),
    sgd(lr, momentum))`` with SGD and ``chain(fsam(...), adamw(...))`` with
    AdamW (``tests/test_authors.py``); their ``run.sh`` uses ``rho=0.2``,
    ``decay=0.6``.

    Args:
      rho: radius, or a schedule of the step count.
      sigma: :math:`\sigma`, the weight of the running mean removed (injectable).
      decay: :math:`\lambda` of the running mean, in [0, 1].
      **options: the family's options (:class:`~sam_optax.SAMOptions`).

    References:
      Li et al, `Friendly Sharpness-Aware Minimization
      <https://arxiv.org/abs/2403.12350>`_, 2024.
    """
    opts = _family.options_from("fsam", options)
    _family.check_hyper("fsam", "sigma", sigma)
    _family.check_hyper("fsam", "decay", decay, low=0.0, high=1.0)

    def rule(step: _family.Step, memory: GradientAverage) -> tuple[Any, Any, _family.Diagnostics]:
        first = step.count == 0
        directions = [
            jax.tree.map(
                lambda x, m: jnp.where(first, x, x - sigma * m.astype(x.dtype)), g, memory.average
            )
            for g in step.call.objective.grads
        ]
        memory = _updated(step, memory, 1 - decay)  # now: g is not needed after the perturbation
        local, info = _family.sam_gradient(step, directions)
        diagnostics = _family.measure(step, info, local if opts.cosine else None)
        return _family.finish(step, local), memory, diagnostics

    return _family.transformation("fsam", rho, opts, rule, init_memory=_init_memory)


def vasso(
    rho: optax.ScalarOrSchedule = 0.05,
    theta: jax.typing.ArrayLike = 0.9,
    **options: Unpack[SAMOptionKeywords],
) -> optax.GradientTransformationExtraArgs:
    r"""VaSSO: variance-suppressed SAM, the perturbation along a running mean of the gradients.

    .. math::

      d_t = (1 - \theta)\, d_{t-1} + \theta\, g_t, \qquad
      \hat\epsilon = \rho\, d_t / \|d_t\|

    (:math:`d_0 = g_0`, so the first step is SAM's). Averaging the
    stochastic gradients suppresses the variance of the perturbation, which
    the authors show makes the adversary "friendlier" to generalization. Two
    gradients per step, like SAM; ``theta=1`` is :func:`sam`. With
    ``axis_name`` each device perturbs along :math:`(1-\theta) d_{t-1} +
    \theta g_i` (its own gradient), and :math:`d` follows the device-averaged
    gradient, so it is the same on every device (the authors' code runs on
    one device).

    The authors' code (BingcongLi/VaSSO, ``solver/vasso.py``) adds 1e-7 to
    the norm: ``chain(vasso(rho, theta, eps=1e-7), add_decayed_weights(wd),
    sgd(lr, momentum))`` reproduces it (``tests/test_authors.py``); their
    defaults are ``rho=0.05``, ``theta=0.9`` (``train.sh``: ``rho=0.2``).

    Args:
      rho: radius, or a schedule of the step count.
      theta: :math:`\theta` in (0, 1], the weight of the newest gradient
        (injectable).
      **options: the family's options (:class:`~sam_optax.SAMOptions`).

    References:
      Li and Giannakis, `Enhancing Sharpness-Aware Optimization Through
      Variance Suppression <https://arxiv.org/abs/2309.15639>`_, 2023.
    """
    opts = _family.options_from("vasso", options)
    # theta = 0 would keep the first step's gradient as the direction forever.
    _family.check_hyper("vasso", "theta", theta, low=0.0, high=1.0, open_low=True)

    def rule(step: _family.Step, memory: GradientAverage) -> tuple[Any, Any, _family.Diagnostics]:
        first = step.count == 0
        directions = [
            jax.tree.map(
                lambda x, m: jnp.where(first, x, (1 - theta) * m.astype(x.dtype) + theta * x),
                g,
                memory.average,
            )
            for g in step.call.objective.grads
        ]
        local, info = _family.sam_gradient(step, directions)
        diagnostics = _family.measure(step, info, local if opts.cosine else None)
        return _family.finish(step, local), _updated(step, memory, theta), diagnostics

    return _family.transformation("vasso", rho, opts, rule, init_memory=_init_memory)
