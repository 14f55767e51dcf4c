"""F-SAM (Friendly SAM, Li et al. 2024) as its authors' code computes it, in float64 numpy.

Source: github.com/nblt/F-SAM, commit 2e2f9899ab473880430640fa5def4ad8f5aa2401. Re-expressed:
``utils.py`` (``FriendlySAM.__init__``, ``first_step``, ``second_step``, ``_grad_norm``) and the
loop and set-up of ``train.py`` (``FriendlySAM`` over ``torch.optim.SGD`` or
``torch.optim.AdamW``; ``first_step``, second backward, ``second_step``, then the per-step
``LambdaLR`` cosine schedule ``_cosine_annealing``).

Step t, per tensor unless a norm is named (norms global: the 2-norm of the per-tensor norms):
  g = grad L(w)
  t = 0:  m = g;  d = g                          (the first step is SAM's)
  t > 0:  d = g - m * sigma;  m = m * lmbda + g * (1 - lmbda)   (m_{t-1} in d; m from raw g)
  n = ||(|w| if adaptive else 1) * d||;  e = (w^2 if adaptive else 1) * d * (rho / (n + 1e-12))
  gs = grad L(w + e);  w restored exactly (the saved copy, not a subtraction)
  base step on gs at w:
    sgd (torch.optim.SGD): gs += weight_decay * w; buf = gs (first step) else momentum*buf + gs;
      gs = gs + momentum * buf (nesterov) else buf;  w = w - lr_t * gs
    adamw (torch.optim.AdamW): w = w * (1 - lr_t * weight_decay); m1 = lerp(m1, gs, 1 - b1);
      m2 = m2 * b2 + (1 - b2) gs^2;  w = w - (lr_t / (1 - b1^k)) * m1 / (sqrt(m2)/sqrt(1 - b2^k) + eps)
Weight decay enters only in the base step (never in d, m or e); m is the F-SAM state, kept
apart from the base optimizer's buffers.

Defaults: class rho 0.05, sigma 1, lmbda 0.9, adaptive False; train.py arguments rho 0.1,
sigma 1, lmbda 0.95, lr 0.1, momentum 0.9, weight_decay 1e-4; run.sh (the paper's CIFAR
setting): lr 0.05, rho 0.2, sigma 1, lmbda 0.6, weight_decay 1e-3, batch 128, cosine schedule.
The script always passes adaptive=0 and nesterov=False; the AdamW variant passes only lr and
weight_decay (betas (0.9, 0.999), eps 1e-8). ``cosine_lrs`` gives their per-step schedule:
lr_t = lr * 0.5 * (1 + cos(pi * t / total_steps)), total_steps = epochs * batches per epoch.
"""

from collections.abc import Sequence
from typing import Any

import numpy as np

from references.torch_optim import LossAndGrad
from references.torch_optim import Params
from references.torch_optim import at
from references.torch_optim import base_init
from references.torch_optim import base_step
from references.torch_optim import global_norm

EPS = 1e-12


def cosine_lrs(n_steps: int, *, lr: float, total_steps: int) -> list[float]:
    """Their ``get_cosine_annealing_scheduler`` (lr_min 0), per step, from step 0."""
    return [lr * (0.5 * (1 + np.cos(t / total_steps * np.pi))) for t in range(n_steps)]


def friendly_direction(
    grads: Params, average: Params | None, *, sigma: float, lmbda: float
) -> tuple[Params, Params]:
    """``first_step``'s first loop: (the direction d, the updated running mean m)."""
    if average is None:
        return grads, [g.copy() for g in grads]
    direction = [g - m * sigma for g, m in zip(grads, average)]
    updated = [m * lmbda + g * (1 - lmbda) for g, m in zip(grads, average)]
    return direction, updated


def perturbation(params: Params, direction: Params, rho: float, *, adaptive: bool) -> Params:
    """``first_step``'s second loop: e = (w^2 or 1) * d * rho / (||(|w| or 1) d|| + 1e-12)."""
    scaled = [np.abs(w) * d for w, d in zip(params, direction)] if adaptive else direction
    scale = rho / (global_norm(scaled) + EPS)
    if adaptive:
        return [w**2 * d * scale for w, d in zip(params, direction)]
    return [1.0 * d * scale for d in direction]


def trajectory(
    params0: Params,
    batches: Sequence[Any],
    loss_and_grad: LossAndGrad,
    *,
    lr: float | Sequence[float] = 0.05,
    rho: float | Sequence[float] = 0.2,
    sigma: float = 1.0,
    lmbda: float = 0.6,
    adaptive: bool = False,
    base: str = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 1e-3,
    nesterov: bool = False,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> list[Params]:
    """The params after each step of ``FriendlySAM`` over ``base`` ('sgd' or 'adamw').

    ``lr`` and ``rho`` are constants or per-step sequences (``cosine_lrs``); ``momentum`` and
    ``nesterov`` serve 'sgd', ``betas`` and ``eps`` serve 'adamw'.
    """
    if base not in ("sgd", "adamw"):
        raise ValueError(f"base must be 'sgd' or 'adamw', got {base!r}")
    hyper = dict(momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    hyper.update(betas=betas, eps=eps)
    params = [np.array(w, dtype=np.float64) for w in params0]
    average = None
    state = base_init(base, params)
    out = []
    for t, batch in enumerate(batches):
        _, grads = loss_and_grad(params, batch)
        direction, average = friendly_direction(grads, average, sigma=sigma, lmbda=lmbda)
        e = perturbation(params, direction, at(rho, t), adaptive=adaptive)
        _, perturbed = loss_and_grad([w + x for w, x in zip(params, e)], batch)
        params, state = base_step(base, params, perturbed, state, lr=at(lr, t), **hyper)
        out.append([w.copy() for w in params])
    return out
