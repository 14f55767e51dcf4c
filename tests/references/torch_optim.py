"""The PyTorch pieces the re-expressions share, in float64 numpy.

The authors' code runs its SAM variant over PyTorch's own optimizers and utilities; this module
re-expresses them once, as PyTorch computes them (per tensor unless a norm is named; ``w`` a
parameter, ``g`` its gradient, ``k`` the step count from 1):

- the global norm that ``clip_grad_norm_`` and the authors' ``_grad_norm`` take,
  ``torch.norm(torch.stack([t.norm(p=2) for t in tensors]), p=2)``: the 2-norm of the
  per-tensor 2-norms (:func:`global_norm`); the inner product over all tensors,
  ``torch.sum(torch.stack([(a * b).sum() for a, b in ...]))`` (:func:`inner`);
- ``torch.nn.utils.clip_grad_norm_(max_norm)`` (:func:`clip_grad_norm`):
  ``coef = max_norm / (global_norm(g) + 1e-6)``, clamped at 1; ``g <- g * coef``;
- ``torch.optim.SGD.step`` (:func:`sgd_step`): ``d = g + weight_decay * w`` (if weight_decay);
  if momentum: ``buf = d`` (a copy) on the first step, else
  ``buf = momentum * buf + (1 - dampening) * d`` (dampening never applies on the first step);
  ``d = d + momentum * buf`` if nesterov else ``buf``; ``w <- w - lr * d``;
- ``torch.optim.Adam.step`` and ``torch.optim.AdamW.step`` without amsgrad (:func:`adam_step`):
  Adam adds ``weight_decay * w`` to g (L2), AdamW first does ``w <- w * (1 - lr * weight_decay)``
  (decoupled); then ``m <- m.lerp(g, 1 - b1) = m + (1 - b1) * (g - m)``,
  ``v <- v * b2 + (1 - b2) * g * g``, ``denom = sqrt(v) / sqrt(1 - b2**k) + eps`` and
  ``w <- w.addcdiv(m, denom, value=-lr / (1 - b1**k))``, whose CPU kernel computes
  ``w + (value * m) / denom``.

State conventions: SGD keeps one momentum buffer per tensor, ``None`` until the first step
(:func:`sgd_init`); Adam keeps ``(k, m, v)`` with ``k`` the steps taken so far
(:func:`adam_init`). :func:`base_init` and :func:`base_step` choose by name ('sgd', 'adam',
'adamw'). Each module's own code (its SAM maths, and any optimizer its authors wrote
themselves) stays in that module.
"""

from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import numpy as np

Params = list[np.ndarray]
LossAndGrad = Callable[[Params, Any], tuple[float, Params]]
SGDState = list[np.ndarray | None]
AdamState = tuple[int, Params, Params]

CLIP_EPS = 1e-6


def at(value: float | Sequence[float], t: int) -> float:
    """A hyperparameter at step t: a constant, or the t-th entry of a per-step sequence."""
    if np.ndim(value) == 0:
        return float(value)
    return float(value[t])


def global_norm(tensors: Sequence[np.ndarray]) -> float:
    """torch's global norm: the 2-norm of the per-tensor 2-norms."""
    return float(np.linalg.norm([np.linalg.norm(x) for x in tensors]))


def inner(a: Params, b: Params) -> float:
    """The inner product over all tensors: the sum of the per-tensor sums of a * b."""
    return float(np.sum([np.sum(x * y) for x, y in zip(a, b)]))


def clip_grad_norm(grads: Params, max_norm: float) -> Params:
    """``torch.nn.utils.clip_grad_norm_``: scale by min(1, max_norm / (norm + 1e-6))."""
    coef = min(max_norm / (global_norm(grads) + CLIP_EPS), 1.0)
    return [g * coef for g in grads]


def sgd_init(params: Params) -> SGDState:
    """No momentum buffer yet (torch creates it from the first step's d)."""
    return [None] * len(params)


def sgd_step(
    params: Params,
    grads: Params,
    buffers: SGDState,
    *,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
) -> tuple[Params, SGDState]:
    """``torch.optim.SGD.step``: returns the new params and momentum buffers."""
    new_params, new_buffers = [], []
    for w, g, buf in zip(params, grads, buffers):
        d = g + weight_decay * w if weight_decay != 0 else g
        if momentum != 0:
            buf = d.copy() if buf is None else momentum * buf + (1 - dampening) * d
            d = d + momentum * buf if nesterov else buf
        new_params.append(w - lr * d)
        new_buffers.append(buf)
    return new_params, new_buffers


def adam_init(params: Params) -> AdamState:
    """No step taken, both moments zero."""
    return (0, [np.zeros_like(w) for w in params], [np.zeros_like(w) for w in params])


def adam_step(
    params: Params,
    grads: Params,
    state: AdamState,
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled: bool = False,
) -> tuple[Params, AdamState]:
    """``torch.optim.Adam.step`` (decoupled=False) or ``AdamW.step`` (decoupled=True)."""
    k, first, second = state
    k += 1
    b1, b2 = betas
    step_size = lr / (1 - b1**k)
    root = np.sqrt(1 - b2**k)
    new_params, new_first, new_second = [], [], []
    for w, g, m, v in zip(params, grads, first, second):
        if decoupled:
            w = w * (1 - lr * weight_decay)
        elif weight_decay != 0:
            g = g + weight_decay * w
        m = m + (1 - b1) * (g - m)
        v = v * b2 + (1 - b2) * g * g
        new_params.append(w - (step_size * m) / (np.sqrt(v) / root + eps))
        new_first.append(m)
        new_second.append(v)
    return new_params, (k, new_first, new_second)


def base_init(base: str, params: Params) -> SGDState | AdamState:
    """The empty state of the base optimizer ``base`` ('sgd', 'adam' or 'adamw')."""
    if base == "sgd":
        return sgd_init(params)
    if base in ("adam", "adamw"):
        return adam_init(params)
    raise ValueError(f"unsupported base optimizer {base!r}")


def base_step(
    base: str,
    params: Params,
    grads: Params,
    state: Any,
    *,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> tuple[Params, Any]:
    """One step of ``base``: torch.optim.SGD, Adam or AdamW with these hyperparameters."""
    if base == "sgd":
        return sgd_step(
            params,
            grads,
            state,
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
        )
    if base in ("adam", "adamw"):
        return adam_step(
            params,
            grads,
            state,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            decoupled=base == "adamw",
        )
    raise ValueError(f"unsupported base optimizer {base!r}")
