"""GSAM: the surrogate gap guided SAM step, and its radius tied to the learning rate."""

from __future__ import annotations

from typing import Any
from typing import Unpack

import jax
import jax.numpy as jnp
import optax

from sam_optax import _checks
from sam_optax import _family
from sam_optax._family import SAMOptionKeywords

__all__ = ["gsam", "rho_from_learning_rate"]


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
    _checks.check_number("rho_max", rho_max, low=0.0)
    _checks.check_number("rho_min", rho_min, low=0.0)

    def schedule(count: jax.Array) -> jax.Array:
        frac = (learning_rate(count) - lr_min) / (peak - lr_min)
        return jnp.maximum(rho_min + (rho_max - rho_min) * frac, 0.0)

    return schedule


def gsam(
    rho: optax.ScalarOrSchedule = 0.05,
    alpha: jax.typing.ArrayLike = 0.1,
    **options: Unpack[SAMOptionKeywords],
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
    authors' JAX code. Two gradients per step; :math:`g` and :math:`g_{SAM}`
    are alive together (what the decomposition needs), so the cosine
    diagnostic is always recorded.

    The authors' PyTorch code (juntang-zhuang/GSAM) is reproduced by
    ``chain(gsam(rho, alpha, adaptive=True, eta=0.0), add_decayed_weights(wd),
    sgd(lr, momentum))`` up to the 1e-12 its decomposition adds to two
    denominators; their ASAM form has :math:`\eta = 0`
    (``tests/test_authors.py``).

    Args:
      rho: radius, or a schedule of the step count.
      alpha: weight of the orthogonal correction, a number >= 0 (injectable).
      **options: the family's options (:class:`~sam_optax.SAMOptions`).

    References:
      Zhuang et al, `Surrogate Gap Guided Sharpness-Aware Minimization
      <https://arxiv.org/abs/2203.08065>`_, 2022.
    """
    opts = _family.options_from("gsam", options)
    _family.check_hyper("gsam", "alpha", alpha, low=0.0)
    alpha_zero = _checks.concrete_float(alpha) == 0.0

    def rule(step: _family.Step, memory: None) -> tuple[Any, None, _family.Diagnostics]:
        local, info = _family.sam_gradient(step)
        g = _family.clean_leaves(step)
        diagnostics = _family.measure(step, info, local, clean=g)
        if not alpha_zero:
            coef = _family.projection_coefficient(g, local)
            local = [s - alpha * (x - coef * s).astype(s.dtype) for s, x in zip(local, g)]
        return _family.finish(step, local), memory, diagnostics

    return _family.transformation("gsam", rho, opts, rule)
