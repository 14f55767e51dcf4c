"""``sam``: Sharpness-Aware Minimization as an optax transformation.

:func:`sam` validates its arguments and wires the stages of
:mod:`sam_optax._stages` through the shared machinery of
:mod:`sam_optax._family` (also used by the efficient variants).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax import _axes
from sam_optax import _checks
from sam_optax import _family
from sam_optax._family import Diagnostics
from sam_optax._family import GroupedObjective

__all__ = ["GroupedObjective", "SAMState", "sam"]


class SAMState(NamedTuple):
    """State of :func:`sam`: no copy of the params, only a few scalars.

    Attributes:
      count: number of updates taken (indexes a ``rho`` schedule), int32.
      key: raw ``uint32`` PRNG key data for ``direction='random'``, else ``None``.
      diagnostics: the last step's :class:`~sam_optax.Diagnostics` (scalars).
    """

    count: jax.Array
    key: jax.Array | None
    diagnostics: Diagnostics


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
    sync_perturbation: bool | Hashable | tuple[Hashable, ...] = False,
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
    holds a step count, a few scalar :class:`~sam_optax.Diagnostics` (and a
    PRNG key for random directions), never a copy of the params.

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

    Complex params follow optax's convention: pass the conjugate of
    ``jax.grad`` (``optax.tree.conj``); norms use :math:`|x|^2` and the
    gradient at the perturbed point is conjugated the same way
    (``second_order=True`` refuses complex leaves).

    Diagnostics: pass the clean loss too, ``tx.update(grads, state, params,
    value_fn=loss_fn, value=loss)``, and ``optax.tree.get(state, "sharpness")``
    is :math:`L(w+\hat\epsilon) - L(w)` of the last step; ``grad_norm``,
    ``cosine`` (between :math:`g` and :math:`g_{SAM}`) and ``perturbed_loss``
    are recorded the same way, at no extra pass.

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
        before computing the perturbation (the paper does not); a name or
        tuple of names among ``axis_name`` averages over those axes only: one
        perturbation per group of devices (the paper code's
        ``inner_group_size``, e.g. a ``('data', 'sync')`` mesh with
        ``sync_perturbation='sync'``).
      eps: added to the gradient's dual norm (zero gradient -> zero
        perturbation, never NaN).
      has_aux: ``value_fn`` returns ``(loss, aux)``; ``aux`` is ignored.
      direction: ``'gradient'`` (SAM) or ``'random'`` (the C.5 ablation).
      seed: seed of the random directions (``direction='random'``).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` is
      ``update(updates, state, params, *, value_fn, value=None, **extra_args)``.

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
    _checks.check_nonnegative("rho", rho)
    options = _family.make_options(
        norm=norm,
        adaptive=adaptive,
        eta=eta,
        ascent_steps=ascent_steps,
        second_order=second_order,
        mask=mask,
        axis_name=axis_name,
        sync_perturbation=sync_perturbation,
        eps=eps,
        has_aux=has_aux,
        direction=direction,
        seed=seed,
    )
    rho_static = None if callable(rho) else _checks.concrete_float(rho)

    def init_fn(params: optax.Params) -> SAMState:
        del params
        key = jax.random.key_data(jax.random.key(seed)) if direction == "random" else None
        return SAMState(jnp.zeros([], jnp.int32), key, _family.initial_diagnostics())

    def step(call: _family.Call, state: SAMState) -> tuple[optax.Updates, SAMState]:
        count, key = optax.safe_increment(state.count), _family.next_key(state.key)
        if _family.skips_perturbation(rho, call):
            # Nothing is perturbed: the gradient at w + 0 is the gradient at w.
            out, diagnostics = _family.base_step(call, options)
            return out, SAMState(count, key, diagnostics)
        rho_t = _family.schedule_value(rho, state.count)
        wrapped = None if state.key is None else jax.random.wrap_key_data(state.key)
        local, info = _family.sam_update(call, options, rho_t, wrapped)
        out = _family.finish(call, options, local)
        if rho_static is None:  # a schedule or a traced rho may be 0 at this step
            baseline = _axes.pmean(call.updates, options.axes)
            out = jax.tree.map(lambda b, o: jnp.where(rho_t == 0, b, o), baseline, out)
        diagnostics = _family.measure(call, options, local, info, True)
        return out, SAMState(count, key, diagnostics)

    return _family.transformation("sam", options, init_fn, step)
