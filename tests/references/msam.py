"""MSAM (Momentum-SAM, Becker et al. 2024) as the authors' code computes it, in float64 numpy.

Source: github.com/MarlonBecker/MSAM, commit 780fa4f623fe0c99760fd7cfb1a94d14f00179ee.
Re-expressed: ``optimizer/msam.py`` (``MSAM.__init__``, ``MSAM.step``,
``move_up_to_momentumAscent``), ``optimizer/adamW_msam.py`` (``AdamW_MSAM.step``,
``adamW_msam``, ``move_up_to_momentumAscent``) and the training loop of ``main.py`` (lines
91-111: the shift at the epoch start, schedules set before each step,
``torch.nn.utils.clip_grad_norm_`` between ``backward`` and ``optimizer.step``).

The model holds *shifted* weights between steps: after a step it holds
``x - s * b`` where ``x`` is the weight after the descent, ``b`` the direction buffer and
``s = rho / (||b|| + 1e-12)`` (global norm over all tensors). The next gradient is taken
there; the next ``step`` first adds ``s * b`` back, then descends, then shifts again.

SGD-MSAM (``trajectory_sgd``; the authors' defaults in their configs: lr 0.5 (WRN) / 0.1
(ResNet-50 CIFAR) / 1.0 (ImageNet), momentum 0.9, weight_decay 5e-4 / 1e-3 / 1e-4, rho 3,
no clipping; the class's own defaults are lr 0.1, momentum 0.9, weight_decay 1e-2, rho 0.3).
Nesterov is accepted by their class but never used, and their factory does not pass it.
Step t, with held weights ``p``, buffer ``b`` (zeros at the start) and ``c`` (0 at the start):
  g = clip(grad L(p));  d = g + wd * p   (decay from the *held, shifted* weights)
  x = p + rho_t * c * b;  b = momentum * b + d;  x = x - lr_t * b
  c = 1 / (||b|| + 1e-12);  p = x - rho_t * c * b
A schedule of rho therefore moves ``x`` by ``(rho_t - rho_{t-1}) * c * b`` at step t.

AdamW-MSAM (``trajectory_adamw``; ViT config: lr 1e-3 with warm-up/cosine, weight_decay 0.1,
clip 1.0, rho 3 (0 for the first 8 epochs), betas (0.9, 0.999), eps 1e-8; the class's own
defaults: lr 1e-3, weight_decay 1e-2, rho 1). Step t (k = t + 1), ``f`` = 0 at the start:
  g = clip(grad L(p));  x = p + f * m
  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
  x = x - lr/(1 - b1^k) * m / (sqrt(v)/sqrt(1 - b2^k) + eps);  x = x * (1 - lr * wd)
  f = rho_t / (||m|| + 1e-12)   (raw m, no bias correction);  p = x - f * m
(decay after the Adam step, unlike torch.optim.AdamW; decay never enters m).

``clip`` is torch's ``clip_grad_norm_``: g * min(1, max_norm / (||g|| + 1e-6)), global norm,
of the loss gradient only; ``max_norm`` None or 0 disables it (their ``grad_clip_norm != 0``).
``lr`` and ``rho`` are floats or per-step sequences (their schedulers set them before each
step). Each trajectory returns, per step, the weights ``x`` after the descent (what
``move_back_from_momentumAscent`` restores); ``held=True`` returns what the model holds
(``x`` shifted to the next gradient point) instead.
"""

from collections.abc import Sequence
from typing import Any

import numpy as np

from references.torch_optim import LossAndGrad
from references.torch_optim import Params
from references.torch_optim import at
from references.torch_optim import clip_grad_norm
from references.torch_optim import global_norm

NORM_EPS = 1e-12


def clip_like_torch(grads: Params, max_norm: float | None) -> Params:
    """Their ``main.py``: ``clip_grad_norm_`` only when ``grad_clip_norm != 0`` (None: never)."""
    grads = [np.asarray(g, np.float64) for g in grads]
    return clip_grad_norm(grads, max_norm) if max_norm else grads


def _shift(params: Params, direction: Params, alpha: float) -> Params:
    return [p + alpha * d for p, d in zip(params, direction)]


def _sgd_msam_step(held, buf, inv, grads, lr, rho, momentum, weight_decay):
    """One ``MSAM.step``; returns (descended x, next held weights, buffer, inverse norm)."""
    if weight_decay != 0:
        grads = [g + weight_decay * p for g, p in zip(grads, held)]
    x = _shift(held, buf, rho * inv)
    buf = [momentum * b + d for b, d in zip(buf, grads)]
    x = _shift(x, buf, -lr)
    inv = 1.0 / (global_norm(buf) + NORM_EPS)
    return x, _shift(x, buf, -rho * inv), buf, inv


def trajectory_sgd(
    params0: Params,
    batches: Sequence[Any],
    loss_and_grad: LossAndGrad,
    *,
    lr: float | Sequence[float] = 0.1,
    rho: float | Sequence[float] = 0.3,
    momentum: float = 0.9,
    weight_decay: float = 1e-2,
    max_norm: float | None = None,
    held: bool = False,
) -> list[Params]:
    """SGD-MSAM (``optimizer/msam.py``) under their training loop; see the module docstring."""
    weights = [np.array(p, dtype=np.float64) for p in params0]
    buf = [np.zeros_like(p) for p in weights]
    inv = 0.0
    out = []
    for t, batch in enumerate(batches):
        _, grads = loss_and_grad(weights, batch)
        grads = clip_like_torch(grads, max_norm)
        x, weights, buf, inv = _sgd_msam_step(
            weights, buf, inv, grads, at(lr, t), at(rho, t), momentum, weight_decay
        )
        out.append(weights if held else x)
    return out


def _adamw_msam_step(held, m, v, factor, grads, k, lr, rho, hyper):
    """One ``AdamW_MSAM.step`` (k counts from 1); returns (x, held, m, v, factor)."""
    (beta1, beta2), eps, weight_decay = hyper
    x = _shift(held, m, factor)
    m = [beta1 * mi + (1 - beta1) * g for mi, g in zip(m, grads)]
    v = [beta2 * vi + (1 - beta2) * g * g for vi, g in zip(v, grads)]
    step_size = lr / (1 - beta1**k)
    root_bc2 = np.sqrt(1 - beta2**k)
    x = [xi - step_size * (mi / (np.sqrt(vi) / root_bc2 + eps)) for xi, mi, vi in zip(x, m, v)]
    x = [xi * (1 - lr * weight_decay) for xi in x]
    factor = 1.0 / (global_norm(m) + NORM_EPS) * rho
    return x, _shift(x, m, -factor), m, v, factor


def trajectory_adamw(
    params0: Params,
    batches: Sequence[Any],
    loss_and_grad: LossAndGrad,
    *,
    lr: float | Sequence[float] = 1e-3,
    rho: float | Sequence[float] = 1.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    max_norm: float | None = None,
    held: bool = False,
) -> list[Params]:
    """AdamW-MSAM (``optimizer/adamW_msam.py``) under their loop; see the module docstring."""
    weights = [np.array(p, dtype=np.float64) for p in params0]
    m = [np.zeros_like(p) for p in weights]
    v = [np.zeros_like(p) for p in weights]
    factor = 0.0
    out = []
    for t, batch in enumerate(batches):
        _, grads = loss_and_grad(weights, batch)
        grads = clip_like_torch(grads, max_norm)
        x, weights, m, v, factor = _adamw_msam_step(
            weights,
            m,
            v,
            factor,
            grads,
            t + 1,
            at(lr, t),
            at(rho, t),
            (betas, eps, weight_decay),
        )
        out.append(weights if held else x)
    return out


trajectory = trajectory_sgd
