"""WSAM (Yue et al., KDD 2023) re-expressed in float64 numpy from the authors' code.

Source read: repository intelligent-machine-learning/dlrover, commit
458484308b32aed8590cc5d5c0011c25dae0f6f2 (last commit touching the file before atorch left the
repository; its content equals 19e5d79036f93a4d71cd34382e39667fed3b64ca):

* ``atorch/atorch/optimizers/wsam.py``: class ``WeightedSAM`` (``__init__``, ``first_step``,
  ``second_step``, ``step``, ``_grad_norm``), re-expressed as :func:`wsam_step`;
* ``atorch/examples/optimizer/main.py`` and ``train_wsam_entry.sh``: base optimizers and the
  defaults of their CIFAR demo (SGD, momentum 0.9, no nesterov, weight_decay 5e-4, lr 0.1 with a
  per-iteration cosine schedule, rho 0.2, gamma 0.9, decouple).

One step, with ``alpha = gamma / (1 - gamma)`` and ``T = |w|`` if ``adaptive`` else 1:

1. ``g0 = grad(w)``; ``n = ||(||T_i g0_i||)_i||_2`` over all tensors;
   ``e_i = T_i**2 * g0_i * rho / (n + sam_eps)`` (the perturbation uses the *unclipped* g0).
2. If ``max_norm``: clip g0 with torch's ``clip_grad_norm_`` (coefficient
   ``min(1, max_norm / (total_norm + 1e-6))``), after e was computed.
3. ``g1 = grad(w + e)``; params go back by subtraction, ``w <- (w + e) - e``; if ``max_norm``,
   clip g1 the same way.
4. ``decouple=False``: the base optimizer gets ``alpha * g1 + (1 - alpha) * g0``.
   ``decouple=True``: the base optimizer gets ``g0``; after its step,
   ``w <- w - lr * alpha * (g1 - g0)`` (lr: the step's current learning rate).

Base optimizers (torch semantics): ``"sgd"`` (L2 weight decay added to the gradient, momentum
buffer initialised to the first d_p, dampening, nesterov), ``"adam"`` (L2 weight decay added to
the gradient) and ``"adamw"`` (decoupled decay ``w *= 1 - lr * weight_decay`` first); both Adams
with bias corrections and ``eps`` added after dividing ``sqrt(v)`` by ``sqrt(1 - beta2**t)``.
Class defaults: rho 0.05, gamma 0.9, sam_eps 1e-12, adaptive False, decouple True,
max_norm None. ``lr`` is a number or one value per step (a scheduler's values).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from references.torch_optim import LossAndGrad
from references.torch_optim import Params
from references.torch_optim import at
from references.torch_optim import base_init
from references.torch_optim import base_step
from references.torch_optim import clip_grad_norm
from references.torch_optim import global_norm


def perturbation(params: Params, grads: Params, rho: float, sam_eps: float, adaptive: bool):
    """WSAM's ascent step e (from the unclipped clean gradient)."""
    weighted = [np.abs(w) * g for w, g in zip(params, grads)] if adaptive else grads
    scale = rho / (global_norm(weighted) + sam_eps)
    if adaptive:
        return [w**2 * g * scale for w, g in zip(params, grads)]
    return [g * scale for g in grads]


def wsam_step(params, batch, loss_and_grad, base_state, lr, wsam: dict, base: str, hyper: dict):
    """One call of WeightedSAM.step(closure): two gradients, one base step (torch_optim's)."""
    alpha = wsam["gamma"] / (1 - wsam["gamma"])
    max_norm = wsam["max_norm"]
    _, g0 = loss_and_grad(params, batch)
    e = perturbation(params, g0, wsam["rho"], wsam["sam_eps"], wsam["adaptive"])
    perturbed = [w + d for w, d in zip(params, e)]
    if max_norm is not None:
        g0 = clip_grad_norm(g0, max_norm)
    _, g1 = loss_and_grad(perturbed, batch)
    params = [w - d for w, d in zip(perturbed, e)]
    if max_norm is not None:
        g1 = clip_grad_norm(g1, max_norm)
    if not wsam["decouple"]:
        mixed = [alpha * b + (1 - alpha) * a for a, b in zip(g0, g1)]
        return base_step(base, params, mixed, base_state, lr=lr, **hyper)
    sharpness = [b - a for a, b in zip(g0, g1)]
    params, base_state = base_step(base, params, g0, base_state, lr=lr, **hyper)
    params = [w - lr * alpha * s for w, s in zip(params, sharpness)]
    return params, base_state


def trajectory(
    params0: Params,
    batches: Sequence[Any],
    loss_and_grad: LossAndGrad,
    *,
    lr: float | Sequence[float] = 0.1,
    rho: float = 0.05,
    gamma: float = 0.9,
    sam_eps: float = 1e-12,
    adaptive: bool = False,
    decouple: bool = True,
    max_norm: float | None = None,
    base: str = "sgd",
    momentum: float = 0.9,
    dampening: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 5e-4,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> list[Params]:
    """Params after each of ``len(batches)`` WeightedSAM steps (one batch per step)."""
    wsam = dict(rho=rho, gamma=gamma, sam_eps=sam_eps, adaptive=adaptive, decouple=decouple)
    wsam["max_norm"] = max_norm
    hyper = dict(momentum=momentum, dampening=dampening, nesterov=nesterov)
    hyper.update(weight_decay=weight_decay, betas=betas, eps=eps)
    params = [np.asarray(w, dtype=np.float64).copy() for w in params0]
    state = base_init(base, params)
    out = []
    for t, batch in enumerate(batches):
        params, state = wsam_step(params, batch, loss_and_grad, state, at(lr, t), wsam, base, hyper)
        out.append([w.copy() for w in params])
    return out
