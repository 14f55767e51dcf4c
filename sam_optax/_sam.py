"""``sam``: Sharpness-Aware Minimization as an optax transformation.

:func:`sam` is the family's plainest rule on the shared machinery of
:mod:`sam_optax._family`: the SAM gradient, averaged over the data-parallel
axes.
"""

from __future__ import annotations

from typing import Any
from typing import Unpack

import optax

from sam_optax import _family
from sam_optax._family import SAMOptionKeywords

__all__ = ["sam"]


def sam(
    rho: optax.ScalarOrSchedule = 0.05,
    **options: Unpack[SAMOptionKeywords],
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
    holds a step count, a few scalar :class:`~sam_optax.Diagnostics` (and a
    PRNG key for random directions), never a copy of the params.

    The paper's variants are options (:class:`~sam_optax.SAMOptions`, given
    as keywords; every method of the family takes the same ones):

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

    With a constant ``rho == 0`` the incoming gradient is handed on unchanged
    (averaged over ``axis_name`` if given): the chain is then exactly its
    base optimizer, bit for bit. A scheduled or injected radius that is 0 at a
    step evaluates the gradient at :math:`w + 0`, the base step up to the
    rounding of that second evaluation.

    Complex params follow optax's convention: pass the conjugate of
    ``jax.grad`` (``optax.tree.conj``); norms use :math:`|x|^2` and the
    gradient at the perturbed point is conjugated the same way
    (``second_order=True`` refuses complex leaves).

    Diagnostics: pass the clean loss too, ``tx.update(grads, state, params,
    value_fn=loss_fn, value=loss)``, and ``optax.tree.get(state, "sharpness")``
    is :math:`L(w+\hat\epsilon) - L(w)` of the last step; ``grad_norm`` and
    ``perturbed_loss`` are recorded the same way, free in passes and memory;
    ``cosine=True`` also records :math:`\cos(g, g_{SAM})`, which keeps
    :math:`g` alive through the second pass (one params-sized buffer).

    ``optax.inject_hyperparams(sam)(rho=...)`` injects ``rho`` (a number
    becomes a hyperparameter in the state, a schedule stays one); the options
    stay static, so the compiled step is the same as without it.

    Args:
      rho: radius :math:`\rho \ge 0` of the neighbourhood, or a schedule of the
        step count.
      **options: the options of :class:`~sam_optax.SAMOptions` (``norm``,
        ``adaptive``, ``eta``, ``ascent_steps``, ``second_order``, ``mask``,
        ``axis_name``, ``sync_perturbation``, ``eps``, ``has_aux``,
        ``direction``, ``seed``, ``cosine``), or ``options=SAMOptions(...)``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` is
      ``update(updates, state, params, *, value_fn, value=None, **extra_args)``
      and whose state is a :class:`~sam_optax.SAMState`.

    Raises:
      ValueError: a bad ``rho`` or option (the message names it).
      TypeError: an unknown option.

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
    opts = _family.options_from("sam", options)

    def rule(step: _family.Step, memory: None) -> tuple[Any, None, _family.Diagnostics]:
        out, diagnostics = _family.sam_branch(step)
        return out, memory, diagnostics

    def grouped(step: _family.Step, memory: None) -> tuple[Any, None, _family.Diagnostics]:
        out, diagnostics = _family.grouped_sam(step)
        return out, memory, diagnostics

    # Synced perturbations average every group's gradient first: no group-by-group pass.
    sequential = grouped if opts.sync_axes is None else None
    return _family.transformation("sam", rho, opts, rule, grouped_rule=sequential)
