"""LookSAM (Liu et al. 2022) as MSAM's whole-vector re-implementation computes it, in float64 numpy.

No code from LookSAM's authors is public; the reference is the re-implementation in
github.com/MarlonBecker/MSAM, commit 780fa4f623fe0c99760fd7cfb1a94d14f00179ee. Re-expressed:
``optimizer/looksam.py`` (``LookSAM.__init__``, ``step``, ``move_up``, ``move_back``,
``update_gradient``, ``_grad_norm``, ``_calc_norm``, ``_scalar_product``, ``SGD_step``, ``sgd``)
and how ``main.py`` and ``optimizer/__init__.py`` drive it (schedulers set ``lr`` and ``rho``
before each step; no gradient clipping on this path).

All norms and inner products run over the whole parameter vector (global over tensors: the
2-norm of the per-tensor 2-norms). A counter starts at k, so step 0 is a SAM step; step t is
a SAM step when t % k == 0. With clean gradient g = grad L(w):

SAM step:
  e = g * (rho_t / (||g|| + 1e-12));  gs = grad L(w + e);  w = (w + e) - e
  v = gs - (<gs, g> / (||g||^2 + 1e-12)) * g;  v_hat = v / ||v||   (no eps: NaN if v = 0)
  d = gs
other steps (v_hat from the last SAM step):
  d = g + (alpha * ||g||) * v_hat      (||g|| of the current clean gradient)
then their SGD copy on d: d += weight_decay * w;  buf = momentum * buf + d (buf starts at
zeros, so the first buf is d); d = d + momentum * buf (nesterov) else buf;  w = w - lr_t * d.

Weight decay enters only in the SGD step, after the direction (not in e, g, v or v_hat).
Defaults: the class has lr 0.1, momentum 0.9, weight_decay 1e-2, nesterov False, rho 0.3,
alpha 0.2, k 5. ``getOptimizer`` passes lr, weight_decay, momentum, nesterov and rho from the
config (configs: lr 0.5 WRN / 0.1 ResNet-50, momentum 0.9, weight_decay 5e-4 / 1e-3, rho 3 in
the ini files, 0.2 in the README's SAM runs, nesterov False) but not ``lookSAMk`` /
``lookSAMalpha`` (10 and 0.7 in the ini files): the class defaults k = 5, alpha = 0.2 apply.
Under DistributedDataParallel every backward averages the gradients over the workers, so g
and gs (hence e and v) are the global-batch ones.
"""

from collections.abc import Sequence
from typing import Any

import numpy as np

from references.torch_optim import LossAndGrad
from references.torch_optim import Params
from references.torch_optim import at
from references.torch_optim import global_norm
from references.torch_optim import inner
from references.torch_optim import sgd_step

EPS = 1e-12


def orthogonal_unit(perturbed: Params, clean: Params) -> Params:
    """``move_back``: the unit component of gs orthogonal to g (eps in the projection only)."""
    coef = inner(perturbed, clean) / (global_norm(clean) ** 2 + EPS)
    v = [s - coef * g for s, g in zip(perturbed, clean)]
    norm = global_norm(v)
    return [x / norm for x in v]


def trajectory(
    params0: Params,
    batches: Sequence[Any],
    loss_and_grad: LossAndGrad,
    *,
    lr: float | Sequence[float] = 0.1,
    rho: float | Sequence[float] = 0.3,
    alpha: float = 0.2,
    k: int = 5,
    momentum: float = 0.9,
    weight_decay: float = 1e-2,
    nesterov: bool = False,
) -> list[Params]:
    """The params after each ``LookSAM.step``; ``lr`` and ``rho`` constants or per-step sequences."""
    params = [np.array(w, dtype=np.float64) for w in params0]
    # Their buffers start at zeros (not torch's None): the first one is momentum * 0 + d = d.
    buffers = [np.zeros_like(w) for w in params]
    sgd = dict(momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    unit = None
    counter = k
    out = []
    for t, batch in enumerate(batches):
        _, grads = loss_and_grad(params, batch)
        if counter == k:
            counter = 0
            scale = at(rho, t) / (global_norm(grads) + EPS)
            e = [g * scale for g in grads]
            moved = [w + x for w, x in zip(params, e)]
            _, direction = loss_and_grad(moved, batch)
            params = [w - x for w, x in zip(moved, e)]
            unit = orthogonal_unit(direction, grads)
        else:
            step = alpha * global_norm(grads)
            direction = [g + step * u for g, u in zip(grads, unit)]
        params, buffers = sgd_step(params, direction, buffers, lr=at(lr, t), **sgd)
        counter += 1
        out.append([w.copy() for w in params])
    return out
