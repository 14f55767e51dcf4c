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

from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import numpy as np

Params = list[np.ndarray]
LossAndGrad = Callable[[Params, Any], tuple[float, Params]]

EPS = 1e-12


def _at(value: float | Sequence[float], t: int) -> float:
    """A hyperparameter at step t: a constant, or the t-th entry of a per-step sequence."""
    if np.ndim(value) == 0:
        return float(value)
    return float(value[t])


def stacked_norm(tensors: Params) -> float:
    """torch's global norm: the 2-norm of the per-tensor 2-norms."""
    return float(np.linalg.norm([np.linalg.norm(x) for x in tensors]))


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
    scale = rho / (stacked_norm(scaled) + EPS)
    if adaptive:
        return [w**2 * d * scale for w, d in zip(params, direction)]
    return [1.0 * d * scale for d in direction]


def sgd_step(
    params: Params, grads: Params, state: dict[str, Any], *, lr: float, hyper: dict[str, Any]
) -> Params:
    """``torch.optim.SGD.step`` (dampening 0); momentum buffers in ``state``."""
    momentum, weight_decay = hyper["momentum"], hyper["weight_decay"]
    buffers = state.get("buf")
    new_params, new_buffers = [], []
    for i, (w, g) in enumerate(zip(params, grads)):
        d = g + weight_decay * w if weight_decay != 0 else g
        if momentum != 0:
            buf = d.copy() if buffers is None else momentum * buffers[i] + d
            new_buffers.append(buf)
            d = d + momentum * buf if hyper["nesterov"] else buf
        new_params.append(w - lr * d)
    if momentum != 0:
        state["buf"] = new_buffers
    return new_params


def adamw_step(
    params: Params, grads: Params, state: dict[str, Any], *, lr: float, hyper: dict[str, Any]
) -> Params:
    """``torch.optim.AdamW.step`` (no amsgrad); moments and the step count in ``state``."""
    b1, b2 = hyper["betas"]
    eps, weight_decay = hyper["eps"], hyper["weight_decay"]
    k = state.get("step", 0) + 1
    first = state.get("m1", [np.zeros_like(w) for w in params])
    second = state.get("m2", [np.zeros_like(w) for w in params])
    step_size = lr / (1 - b1**k)
    root = (1 - b2**k) ** 0.5
    new_params, new_first, new_second = [], [], []
    for w, g, m1, m2 in zip(params, grads, first, second):
        w = w * (1 - lr * weight_decay) if weight_decay != 0 else w
        m1 = m1 + (1 - b1) * (g - m1)
        m2 = m2 * b2 + (1 - b2) * g * g
        new_params.append(w - step_size * (m1 / (np.sqrt(m2) / root + eps)))
        new_first.append(m1)
        new_second.append(m2)
    state.update(step=k, m1=new_first, m2=new_second)
    return new_params


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
    step_fn = sgd_step if base == "sgd" else adamw_step
    hyper = {
        "momentum": momentum,
        "weight_decay": weight_decay,
        "nesterov": nesterov,
        "betas": betas,
        "eps": eps,
    }
    params = [np.array(w, dtype=np.float64) for w in params0]
    average = None
    state: dict[str, Any] = {}
    out = []
    for t, batch in enumerate(batches):
        _, grads = loss_and_grad(params, batch)
        direction, average = friendly_direction(grads, average, sigma=sigma, lmbda=lmbda)
        e = perturbation(params, direction, _at(rho, t), adaptive=adaptive)
        _, perturbed = loss_and_grad([w + x for w, x in zip(params, e)], batch)
        params = step_fn(params, perturbed, state, lr=_at(lr, t), hyper=hyper)
        out.append([w.copy() for w in params])
    return out
