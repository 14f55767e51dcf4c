"""MSAM: the gradient at :math:`w - \\rho\\,\\hat m`, :math:`m` the base optimizer's own momentum."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from typing import Unpack

import jax
import jax.numpy as jnp
import optax

from sam_optax import _axes
from sam_optax import _checks
from sam_optax import _family
from sam_optax._family import SAMOptionKeywords

__all__ = ["msam"]

MOMENT_FIELDS = ("mu", "trace")  # optax's Adam-family first moment, SGD's momentum trace
SEES = ("clean", "perturbed")


def _moment_reader(owner: str, moment: str | Callable[[Any], Any] | None) -> Callable[[Any], Any]:
    """``state -> moment`` from a field name, a function, or ``None`` (the first of ``mu``, ``trace``)."""
    if callable(moment):
        return moment
    if moment is not None and not isinstance(moment, str):
        raise ValueError(
            f"{owner}: moment must be a field name of the base optimizer's state or a "
            f"function state -> moment, got moment={moment!r}."
        )
    names = MOMENT_FIELDS if moment is None else (moment,)

    def read(state: Any) -> Any:
        for name in names:
            found = optax.tree.get_all_with_path(state, name)
            if len(found) == 1:
                return found[0][1]
            if len(found) > 1:
                raise ValueError(
                    f"{owner}: the base optimizer's state has {len(found)} fields named "
                    f"{name!r}; pass moment=lambda state: ... to say which is the momentum."
                )
        raise ValueError(
            f"{owner}: found no first moment named {' or '.join(map(repr, names))} in the "
            "base optimizer's state (optax.sgd(..., momentum=...) keeps 'trace', the Adam "
            "family 'mu'); give the base optimizer a momentum, or pass moment=<field name> "
            "or moment=lambda state: ...."
        )

    return read


def msam(
    inner: optax.GradientTransformation,
    rho: optax.ScalarOrSchedule = 3.0,
    *,
    moment: str | Callable[[Any], Any] | None = None,
    sees: str = "clean",
    **options: Unpack[SAMOptionKeywords],
) -> optax.GradientTransformationExtraArgs:
    r"""Momentum-SAM: the base optimizer's step on the gradient at :math:`w - \rho\, m / \|m\|`.

    ``msam`` wraps the base optimizer ``inner`` and reads its own first
    moment :math:`m` (``optax.sgd``'s momentum trace, ``optax.adam``'s and
    ``optax.adamw``'s ``mu``: whatever clipping and weight decay the base
    chain feeds into it enter the direction too), then hands ``inner`` the
    gradient at the point the base optimizer is moving towards:

    .. math::

      g_{MSAM} = \nabla L\big(w - \rho\, m_{t-1} / (\|m_{t-1}\| + \epsilon)\big)

    (the first step, with :math:`m = 0`, is unperturbed). The gradient comes
    from ``value_fn``; the incoming gradient is never read, so under ``jit``
    the caller's clean gradient is dead code and XLA drops it: a step costs
    one gradient (``benchmarks/efficient.py``). ``rho`` is not scaled by the
    learning rate; the authors use :math:`\rho = 3`.

    ``sees`` chooses the params ``inner`` is handed (where its
    ``add_decayed_weights`` reads them): ``'clean'`` (:math:`w`) or
    ``'perturbed'`` (the point the gradient was taken at). The authors'
    SGD-MSAM (MarlonBecker/MSAM ``optimizer/msam.py``) decays the weights the
    model holds, the perturbed point, and their training script clips the
    gradient before the step:
    ``msam(chain(clip, add_decayed_weights(wd), sgd(lr, momentum)), rho,
    sees='perturbed')`` reproduces it; their AdamW-MSAM decays the clean
    weights after the Adam step
    (``msam(chain(clip, scale_by_adam(), scale(-lr), <decay of w + u>), rho)``).
    Both to 1e-12 with torch's clipping formula
    (``tests/test_authors.py``); ``optax.clip_by_global_norm`` divides by
    :math:`\|g\|` where torch divides by :math:`\|g\| + 10^{-6}`, and
    ``optax.adamw`` decays before the Adam step.

    With ``axis_name`` the direction comes from the replicated moment (the
    same on every device) and the gradients are averaged before ``inner``
    sees them. The diagnostics hold ``perturbed_loss`` and (with ``value=``)
    ``sharpness``, here :math:`L(w - \rho\hat m) - L(w)`; ``grad_norm`` and
    ``cosine`` would need the clean gradient, so they are NaN.

    Args:
      inner: the base optimizer (an optax transformation with a first moment).
      rho: radius, or a schedule of the step count.
      moment: the field of ``inner``'s state that holds the moment, or a
        function ``state -> moment``; default the one field named ``mu``, else
        ``trace``.
      sees: ``'clean'`` or ``'perturbed'``: the params handed to ``inner``.
      **options: ``mask``, ``axis_name``, ``eps`` (added to
        :math:`\|m\|`, 1e-12 as the authors) and ``has_aux`` of
        :class:`~sam_optax.SAMOptions`; the options about a gradient-based
        perturbation do not apply.

    References:
      Becker et al, `Momentum-SAM: Sharpness Aware Minimization without
      Computational Overhead <https://arxiv.org/abs/2401.12033>`_, 2024.
    """
    _checks.check_base_optimizer(
        "msam", inner, "sam_optax.msam(optax.sgd(learning_rate, momentum=0.9), rho=3.0)"
    )
    opts = _family.options_from(
        "msam", options, refused=(*_family.GRADIENT_OPTIONS, "norm", "cosine", "seed")
    )
    read_moment = _moment_reader("msam", moment)
    _checks.check_choice("sees", sees, SEES)
    inner = optax.with_extra_args_support(inner)

    def descend(step: _family.Step, grads: Any, memory: Any, at: Any) -> tuple[Any, Any]:
        params = at if sees == "perturbed" else step.call.params
        return inner.update(grads, memory, params, **step.call.extra_args)

    def base(step: _family.Step, memory: Any) -> tuple[Any, Any, _family.Diagnostics]:
        grads = _axes.pmean(step.call.updates, opts.axes)
        out, memory = descend(step, grads, memory, step.call.params)
        return out, memory, _family.measure(step, sam_step=False)

    def rule(step: _family.Step, memory: Any) -> tuple[Any, Any, _family.Diagnostics]:
        m = read_moment(memory)
        _checks.check_tree_matches(m, step.call.params, "the base optimizer's moment", "msam")
        point = _shifted(step, m)
        objective = step.call.objective
        varying = _axes.as_varying(point, _axes.manual_axes(opts.axes))  # per-device gradients
        loss, grads = jax.value_and_grad(objective.loss)((varying,) * objective.n_groups)
        local = [sum(g) for g in zip(*[jax.tree.leaves(gi) for gi in grads])]
        local = [jnp.conj(g) if jnp.iscomplexobj(g) else g for g in local]
        out, memory = descend(step, _family.finish(step, local), memory, point)
        diagnostics = _family.measure(step, _family.Info(loss))
        nan = jnp.full([], jnp.nan, jnp.float32)
        return out, memory, diagnostics._replace(grad_norm=nan)

    def init_memory(params: Any) -> Any:
        state = inner.init(params)
        _checks.check_tree_matches(
            read_moment(state), params, "the base optimizer's moment", "msam"
        )
        return state

    return _family.transformation("msam", rho, opts, rule, init_memory=init_memory, base=base)


def _shifted(step: _family.Step, moment: Any) -> Any:
    """:math:`w - \\rho\\, m / (\\|m\\| + \\epsilon)` on the selected leaves (the same on every device)."""
    unit = _family.unit(step.call.sel.take(moment), step.options.eps)
    return _family.moved(step, [-step.rho * u for u in unit])
