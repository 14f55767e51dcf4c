"""WSAM: SAM's sharpness as a weighted regularizer, with a decoupled sharpness step."""

from __future__ import annotations

from typing import Any
from typing import Unpack

import jax
import optax

from sam_optax import _axes
from sam_optax import _checks
from sam_optax import _family
from sam_optax._family import SAMOptionKeywords

__all__ = ["wsam"]


def wsam(
    inner: optax.GradientTransformation,
    rho: optax.ScalarOrSchedule = 0.05,
    gamma: float = 0.9,
    *,
    learning_rate: optax.ScalarOrSchedule | None = None,
    **options: Unpack[SAMOptionKeywords],
) -> optax.GradientTransformationExtraArgs:
    r"""Weighted SAM: the loss plus :math:`\frac{\gamma}{1-\gamma}` times SAM's sharpness.

    WSAM minimizes :math:`L(w) + \alpha\,[L(w + \hat\epsilon) - L(w)]` with
    :math:`\alpha = \gamma / (1 - \gamma)` (:math:`\gamma = 1/2` is SAM), so
    its gradient is :math:`g_0 + \alpha (g_1 - g_0)`, :math:`g_0 = \nabla
    L(w)` the clean gradient and :math:`g_1` the gradient at
    :math:`w + \hat\epsilon`. ``wsam`` wraps the base optimizer ``inner``:

    * with ``learning_rate`` (the authors' default, ``decouple=True``),
      ``inner`` steps on :math:`g_0` alone (its momentum, adaptive scaling
      and weight decay see only the loss) and the sharpness term is a
      separate step, :math:`-\eta_t \alpha (g_1 - g_0)`, with
      :math:`\eta_t` the learning rate (a number or the same schedule
      ``inner`` uses, evaluated at the step count);
    * without it, ``inner`` steps on :math:`g_0 + \alpha (g_1 - g_0)`.

    Two gradients per step; :math:`g_0` and :math:`g_1` are alive together
    (the maths needs both), so the cosine diagnostic is always recorded. The
    authors' code (intelligent-machine-learning/dlrover,
    ``atorch/atorch/optimizers/wsam.py``) is reproduced by
    ``wsam(chain(add_decayed_weights(wd), sgd(lr, momentum)), rho, gamma,
    learning_rate=lr, adaptive=..., eta=0.0)`` (``tests/test_authors.py``);
    its optional ``max_norm`` clips :math:`g_0` and :math:`g_1` separately,
    which ``wsam`` does not (a clip in ``inner`` clips what ``inner``
    sees). Their CIFAR demo uses ``rho=0.2``, ``gamma=0.9``.

    Args:
      inner: the base optimizer.
      rho: radius, or a schedule of the step count.
      gamma: :math:`\gamma` in [0, 1), the weight of the sharpness (injectable).
      learning_rate: the learning rate of the decoupled sharpness step (a
        number or a schedule of the step count); ``None`` folds the sharpness
        into the gradient ``inner`` sees.
      **options: the family's options (:class:`~sam_optax.SAMOptions`).

    References:
      Yue et al, `Sharpness-Aware Minimization Revisited: Weighted Sharpness as
      a Regularization Term <https://arxiv.org/abs/2305.15817>`_, 2023.
    """
    _checks.check_base_optimizer(
        "wsam", inner, "sam_optax.wsam(optax.sgd(learning_rate, momentum=0.9), rho=0.05)"
    )
    opts = _family.options_from("wsam", options)
    _family.check_hyper("wsam", "gamma", gamma, low=0.0)
    if _checks.concrete_float(gamma) is not None and not gamma < 1:
        raise ValueError(f"wsam: gamma must be in [0, 1), got gamma={gamma!r}.")
    if learning_rate is not None:
        _family.check_hyper("wsam", "learning_rate", learning_rate, low=0.0)
    alpha = gamma / (1 - gamma)
    inner = optax.with_extra_args_support(inner)

    def descend(step: _family.Step, grads: Any, memory: Any) -> tuple[Any, Any]:
        return inner.update(grads, memory, step.call.params, **step.call.extra_args)

    def base(step: _family.Step, memory: Any) -> tuple[Any, Any, _family.Diagnostics]:
        out, memory = descend(step, _axes.pmean(step.call.updates, opts.axes), memory)
        return out, memory, _family.measure(step)

    def rule(step: _family.Step, memory: Any) -> tuple[Any, Any, _family.Diagnostics]:
        g1, info = _family.sam_gradient(step)
        g0 = _family.clean_leaves(step)
        diagnostics = _family.measure(step, info, g1, clean=g0)
        sharp = [alpha * (a - b.astype(a.dtype)) for a, b in zip(g1, g0)]
        if learning_rate is None:
            mixed = [b.astype(s.dtype) + s for b, s in zip(g0, sharp)]
            out, memory = descend(step, _family.finish(step, mixed), memory)
            return out, memory, diagnostics
        out, memory = descend(step, _axes.pmean(step.call.updates, opts.axes), memory)
        lr = learning_rate(step.count) if callable(learning_rate) else learning_rate
        extra = _family.finish(step, sharp)
        return (
            jax.tree.map(lambda u, s: u - (lr * s).astype(u.dtype), out, extra),
            memory,
            diagnostics,
        )

    return _family.transformation("wsam", rho, opts, rule, init_memory=inner.init, base=base)
