"""LookSAM: the full SAM step every k steps, the stored ascent direction in between."""

from __future__ import annotations

from typing import Any
from typing import NamedTuple
from typing import Unpack

import jax
import optax

from sam_optax import _axes
from sam_optax import _checks
from sam_optax import _family
from sam_optax._family import SAMOptionKeywords

__all__ = ["LookSAMMemory", "looksam"]


class LookSAMMemory(NamedTuple):
    """LookSAM's memory: the stored unit direction :math:`\\hat g_v` (params-sized)."""

    direction: Any


def looksam(
    rho: optax.ScalarOrSchedule = 0.05,
    every: int = 5,
    alpha: jax.typing.ArrayLike = 0.7,
    **options: Unpack[SAMOptionKeywords],
) -> optax.GradientTransformationExtraArgs:
    r"""LookSAM: the full SAM step every k steps, the stored ascent direction in between.

    On steps :math:`t \equiv 0 \pmod k` it takes the SAM gradient
    :math:`g_s` and stores the unit direction of its component orthogonal to
    the clean gradient, :math:`g_v = g_s - \frac{\langle g_s, g\rangle}{\|g\|^2} g`;
    on the other steps it hands on :math:`g + \alpha\,\|g\|\,\hat g_v`: one
    gradient, since the branch is a ``lax.cond``. ``every=1`` is :func:`sam`.
    The state's ``memory`` holds :math:`\hat g_v`, one params-sized buffer
    (what LookSAM reuses). With ``axis_name`` each device perturbs with its
    own gradient on SAM steps; :math:`g_v` comes from the device-averaged
    gradients, so the stored direction is the same on every device (the
    authors' multi-GPU runs perturb with the averaged gradient:
    ``sync_perturbation=True``).

    No code from LookSAM's authors is public; the whole-vector form of
    MarlonBecker/MSAM (``optimizer/looksam.py``) is reproduced by
    ``chain(looksam(rho, every=k, alpha=alpha), add_decayed_weights(wd),
    sgd(lr, momentum))`` up to the 1e-12 it adds to the projection's
    denominator (``tests/test_authors.py``); that code runs with
    ``alpha=0.2``, ``every=5``.

    Args:
      rho: radius, or a schedule of the step count.
      every: k, the period of the full SAM step (an integer >= 1; injectable).
      alpha: weight of the reused direction (injectable).
      **options: the family's options (:class:`~sam_optax.SAMOptions`).

    References:
      Liu et al, `Towards Efficient and Scalable Sharpness-Aware Minimization
      <https://arxiv.org/abs/2203.02714>`_, 2022.
    """
    opts = _family.options_from("looksam", options)
    _family.check_hyper("looksam", "alpha", alpha, low=0.0)
    if _checks.concrete_float(every) is not None:  # injected, it is a traced integer
        every = _checks.check_positive_int("every", every)

    def rule(step: _family.Step, memory: LookSAMMemory) -> tuple[Any, Any, _family.Diagnostics]:
        g = _family.float_leaves(_axes.pmean(step.call.updates, opts.axes))
        like, stored = step.call.updates, memory.direction
        sam_step = step.count % every == 0

        def full() -> tuple[Any, _family.Diagnostics]:
            local, info = _family.sam_gradient(step)
            return _family.finish(step, local), _family.measure(step, info, local)

        def reuse() -> tuple[Any, _family.Diagnostics]:
            scale = alpha * _family.norm(g)
            leaves = [x + scale * v for x, v in zip(g, _family.float_leaves(stored))]
            out = optax.tree.cast_like(jax.tree.unflatten(jax.tree.structure(like), leaves), like)
            return out, _family.measure(step, sam_step=False)

        out, diagnostics = jax.lax.cond(sam_step, full, reuse)
        # On SAM steps, the new direction from g_s = out; the select writes the
        # state in place (no copy of the direction goes through the branches).
        g_s = _family.float_leaves(out)
        coef = _family.projection_coefficient(g_s, g)
        unit = _family.unit([s - coef * x for s, x in zip(g_s, g)])
        new = optax.tree.cast_like(jax.tree.unflatten(jax.tree.structure(stored), unit), stored)
        return out, LookSAMMemory(optax.tree.where(sam_step, new, stored)), diagnostics

    def init_memory(params: Any) -> LookSAMMemory:
        return LookSAMMemory(optax.tree.zeros_like(params))

    return _family.transformation("looksam", rho, opts, rule, init_memory=init_memory)
