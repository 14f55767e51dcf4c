"""Float64 numpy re-expression of the authors' VaSSO code (Li and Giannakis, NeurIPS 2023).

Source read (re-expressed, not copied): github.com/BingcongLi/VaSSO at commit
3524bad45d63bb687120708abfef4d5842b7bf36:

- ``solver/vasso.py``: class ``VASSO``: ``first_step`` (EMA of the clean gradient, perturbation
  along the EMA), ``second_step`` (restore, base step), ``step`` (closure), ``_avg_grad_norm``.
- ``solver/build.py``: base optimizer ``torch.optim.SGD(lr, weight_decay, nesterov, momentum)``
  for ``--opt vasso-sgd``; ``vasso-adamw`` builds ``torch.optim.AdamW`` with the same kwargs,
  which include ``momentum`` and ``nesterov`` (AdamW rejects them: only SGD runs as scripted).
- ``utils/engine.py`` ``train_one_epoch``: forward, ``zero_grad``, backward at w, then
  ``optimizer.step(closure)`` where the closure redoes forward+backward on the same batch.
- ``configs/defaulf_cfg.py`` defaults: ``lr=0.05, weight_decay=5e-4, momentum=0.9,
  nesterov=False, rho=0.05, theta=0.9``, cosine schedule per epoch (``eta_min=0``, no
  warmup); ``train.sh``: ``lr=0.1, weight_decay=1e-3, rho=0.2, theta=0.9`` (WRN-28-10).

One step, as the code computes it:

1. ``g = grad of the mean loss at w``.
2. ``ema = g`` (a copy) on the first step, else ``ema = (1 - theta) * ema + theta * g``.
3. ``norm = || [ ||ema_i|| over tensors ] ||``; ``e_i = ema_i * rho / (norm + 1e-7)``;
   ``w <- w + e``.
4. ``g2 = grad of the mean loss at w + e`` (same batch).
5. ``w <- (w + e) - e`` (in place, so rounding as torch), then the base step on ``g2``:
   SGD: ``d = g2 + weight_decay * w``; ``buf = d`` on the first step else
   ``momentum * buf + (1 - dampening) * d``; ``d = d + momentum * buf`` if nesterov else
   ``buf``; ``w <- w - lr * d``.
   AdamW: ``w <- w * (1 - lr * weight_decay)``; ``m <- m + (1 - b1) * (g2 - m)``;
   ``v <- b2 * v + (1 - b2) * g2**2``; ``w <- w - lr / (1 - b1**t) * m /
   (sqrt(v) / sqrt(1 - b2**t) + eps)``.

Interface: ``loss_and_grad(params, batch) -> (float, list[np.ndarray])``. ``lr`` may be a float
or a per-step sequence. Base optimizers supported: ``base="sgd"`` (torch.optim.SGD) and
``base="adamw"`` (torch.optim.AdamW without amsgrad).
"""

import numpy as np

from references.torch_optim import at
from references.torch_optim import base_init
from references.torch_optim import base_step
from references.torch_optim import global_norm

PERTURB_EPS = 1e-7
BASES = ("sgd", "adamw")


def update_ema(ema, grads, theta):
    if ema is None:
        return [g.copy() for g in grads]
    return [(1 - theta) * m + theta * g for m, g in zip(ema, grads)]


def ema_perturbation(ema, rho):
    scale = rho / (global_norm(ema) + PERTURB_EPS)
    return [m * scale for m in ema]


def vasso_step(params, batch, ema, theta, rho, loss_and_grad):
    """Returns the restored params, the gradient for the base step and the new EMA."""
    _, grads = loss_and_grad(params, batch)
    ema = update_ema(ema, grads, theta)
    perturbation = ema_perturbation(ema, rho)
    perturbed = [w + e for w, e in zip(params, perturbation)]
    _, grads_perturbed = loss_and_grad(perturbed, batch)
    restored = [w - e for w, e in zip(perturbed, perturbation)]
    return restored, grads_perturbed, ema


def trajectory(
    params0,
    batches,
    loss_and_grad,
    *,
    lr=0.05,
    rho=0.05,
    theta=0.9,
    base="sgd",
    momentum=0.9,
    dampening=0.0,
    weight_decay=5e-4,
    nesterov=False,
    betas=(0.9, 0.999),
    eps=1e-8,
):
    """Params after each VaSSO step (base ``"sgd"`` or ``"adamw"``)."""
    if base not in BASES:
        raise ValueError(f"base must be 'sgd' or 'adamw', got {base!r}")
    hyper = dict(momentum=momentum, dampening=dampening, weight_decay=weight_decay)
    hyper.update(nesterov=nesterov, betas=betas, eps=eps)
    params = [np.array(w, dtype=np.float64) for w in params0]
    ema, state = None, base_init(base, params)
    out = []
    for t, batch in enumerate(batches):
        params, grads, ema = vasso_step(params, batch, ema, theta, rho, loss_and_grad)
        params, state = base_step(base, params, grads, state, lr=at(lr, t), **hyper)
        out.append([w.copy() for w in params])
    return out
