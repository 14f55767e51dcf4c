"""ESAM: SAM on a random subset of the weights and the examples whose loss rises most."""

from __future__ import annotations

from typing import Any
from typing import Unpack

import jax
import jax.numpy as jnp
import optax

from sam_optax import _checks
from sam_optax import _family
from sam_optax._directions import Selection
from sam_optax._family import SAMOptionKeywords

__all__ = ["esam"]

# The authors' rule: from gamma >= 0.99 on, every example is kept.
ALL_EXAMPLES = 0.99


def esam(
    rho: optax.ScalarOrSchedule = 0.05,
    beta: float = 1.0,
    gamma: float = 1.0,
    **options: Unpack[SAMOptionKeywords],
) -> optax.GradientTransformationExtraArgs:
    r"""ESAM: stochastic weight perturbation and sharpness-sensitive data selection.

    Two changes to SAM's step, as the authors' code (dydjw9/Efficient_SAM,
    ``utils/Esam.py``) computes them:

    * **Stochastic weight perturbation**: each step keeps each perturbed
      leaf (tensor) with probability :math:`\beta` (the first step keeps
      all); the norm runs over the kept leaves and the radius is
      :math:`\rho/\beta`, so :math:`\hat\epsilon = (\rho/\beta)\, g_K /
      \|g_K\|` on the kept leaves K, 0 on the others.
    * **Sharpness-sensitive data selection**: with per-example losses
      :math:`\ell_i` at :math:`w` and at :math:`w + \hat\epsilon`, the
      gradient handed on is that of the mean loss over the examples whose
      :math:`\ell_i(w + \hat\epsilon) - \ell_i(w)` is strictly above the
      k-th largest, :math:`k = \lfloor \gamma n \rfloor` (the authors'
      rule: k - 1 examples when there are no ties; all of them from
      :math:`\gamma \ge 0.99` on). When the rule selects no example
      (:math:`k = 1`, or every rise tied at the cutoff) the authors' code
      has a NaN loss and a zero gradient; this library's fallback takes
      the whole batch instead.

    Diagnostics: ``sharpness`` and ``perturbed_loss`` are the whole batch's
    (:math:`L(w + \hat\epsilon) - L(w)` and :math:`L(w + \hat\epsilon)`,
    from the same forward pass), not the selected examples'.

    ``esam`` extends the family's contract: ``value_fn(params)`` returns the
    **per-example** losses of the batch (a vector whose mean is the loss the
    incoming gradient is of), and ``value=`` may pass those losses at
    :math:`w` (the caller's first pass computes them anyway); without it
    they cost one more forward pass. The selection and the selected loss come
    from the same forward pass at :math:`w + \hat\epsilon`. With JAX's static
    shapes that pass and its backward run over the whole batch (the
    unselected examples get a zero weight), so a step costs what a SAM step
    costs: the efficiency the authors measure in PyTorch comes from
    dropping examples and tensors from the backward passes, which XLA cannot
    do with shapes fixed at compile time.

    ``chain(esam(rho, beta, gamma, eps=1e-7), add_decayed_weights(wd),
    sgd(lr, momentum))`` reproduces the authors' code given the same weight
    subsets (``tests/test_authors.py``); their ``run.sh`` uses ``rho=0.1``
    (the radius before the division by :math:`\beta`), ``beta=0.5``,
    ``gamma=0.5``. With ``axis_name`` the subsets of weights are the same on
    every device (one key), the perturbation and the selection per device,
    as in the authors' multi-GPU code.

    Args:
      rho: radius before the division by :math:`\beta`, or a schedule.
      beta: probability of keeping a leaf in the perturbation, in (0, 1]
        (injectable).
      gamma: fraction of the examples selected, in (0, 1] (injectable: a
        traced value picks the k-th largest rise at a traced index).
      **options: the family's options (:class:`~sam_optax.SAMOptions`;
        ``seed`` seeds the weight subsets) but ``ascent_steps``,
        ``second_order`` and ``direction``.

    References:
      Du et al, `Efficient Sharpness-aware Minimization for Improved Training
      of Neural Networks <https://arxiv.org/abs/2110.03141>`_, 2022.
    """
    opts = _family.options_from(
        "esam", options, refused=("ascent_steps", "second_order", "direction")
    )
    _family.check_hyper("esam", "beta", beta, low=0.0, high=1.0)
    _family.check_hyper("esam", "gamma", gamma, low=0.0, high=1.0)
    for name, value in (("beta", beta), ("gamma", gamma)):
        v = _checks.concrete_float(value)
        if v is not None and not 0 < v <= 1:
            raise ValueError(f"esam: {name} must be a number in (0, 1], got {name}={value!r}.")
    # Whether the state holds a key must not depend on whether beta is traced:
    # optax.inject_hyperparams passes it as an array to init (concrete) and to
    # update (traced). Only a Python 1.0 draws nothing.
    subsets = not (isinstance(beta, (int, float)) and beta == 1.0)

    def rule(step: _family.Step, memory: None) -> tuple[Any, None, _family.Diagnostics]:
        call = step.call
        before = call.value
        if before is None or jnp.ndim(before) != 1:
            before = call.objective.loss((call.params,))
        before = jax.lax.stop_gradient(before)
        sel = _kept(step, beta) if subsets else call.sel
        objective = call.objective._replace(loss=_selected_loss(call.objective.loss, before, gamma))
        call = call._replace(objective=objective, sel=sel, value=jnp.mean(before))
        step = step._replace(call=call, rho=step.rho / beta)
        out, diagnostics = _family.sam_branch(step)
        return out, memory, diagnostics

    return _family.transformation("esam", rho, opts, rule, draws=subsets, per_example=True)


def _kept(step: _family.Step, beta: float) -> Selection:
    """The selection with each leaf kept with probability ``beta`` (every leaf at the first step)."""
    sel = step.call.sel
    draw = jax.random.bernoulli(
        jax.random.fold_in(step.key, _family.SUBSET), beta, (len(sel.indices),)
    )
    keep = draw | (step.count == 0)
    masks = tuple(k if m is True else m & k for m, k in zip(sel.masks, keep))
    return sel._replace(masks=masks)


def _selected_loss(per_example: Any, before: jax.Array, gamma: Any) -> Any:
    """``points -> mean loss over the examples selected by their rise from ``before``.

    ``gamma`` may be traced (``optax.inject_hyperparams``): the k-th largest
    rise is then read from the sorted rises at a traced index.
    """
    n = before.shape[0]
    static = _checks.concrete_float(gamma)
    if static is not None:
        if static >= ALL_EXAMPLES:
            return lambda points: jnp.mean(per_example(points))
        if int(n * static) < 1:
            raise ValueError(
                f"esam: gamma={gamma} selects no example of a batch of {n} (gamma * batch < 1)."
            )

    def loss(points: tuple[Any, ...]) -> jax.Array:
        losses = per_example(points)
        rise = jax.lax.stop_gradient(losses - before)
        if static is not None:
            cutoff = jax.lax.top_k(rise, int(n * static))[0][-1]
            every = False
        else:
            k = jnp.floor(n * gamma).astype(jnp.int32)
            cutoff = jnp.sort(rise)[jnp.clip(n - k, 0, n - 1)]
            every = (gamma >= ALL_EXAMPLES) | (k < 1)
        chosen = rise > cutoff
        count = jnp.sum(chosen)
        mean_chosen = jnp.sum(jnp.where(chosen, losses, 0.0)) / jnp.maximum(count, 1)
        # None chosen (k = 1, or ties at the cutoff): the authors' code then has a
        # NaN loss and a zero gradient; this library takes the whole batch.
        selected = jnp.where(every | (count == 0), jnp.mean(losses), mean_chosen)
        # The value is the whole batch's L(w + eps) (the diagnostics' sharpness
        # and perturbed_loss), the gradient the selected examples'.
        stop = jax.lax.stop_gradient
        return stop(jnp.mean(losses)) + (selected - stop(selected))

    return loss
