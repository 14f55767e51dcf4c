"""Float64 numpy re-expression of the authors' ESAM code (Du et al., ICLR 2022).

Source read (re-expressed, not copied): github.com/dydjw9/Efficient_SAM at commit
1e06840c466beaebfafb049096d6a1733cb77a8c:

- ``utils/Esam.py``: class ``ESAM``: ``step`` (first forward/backward, per-example losses before
  and after the perturbation, top-k selection, second forward/backward on the subset),
  ``first_step`` (perturbation), ``second_step`` (restore, per-tensor random drop of
  ``requires_grad`` for the next step, base step), ``_grad_norm``.
- ``train.py`` lines 36-44: ``CrossEntropyLoss(reduction="none")``, base optimizer
  ``torch.optim.SGD(lr, momentum=0.9, weight_decay)``, ``CosineAnnealingLR(T_max=epochs)``
  stepped once per epoch; no ``zero_grad`` in the loop (ESAM clears grads itself).
- ``utils/options.py`` defaults: ``rho=0.05, beta=1.0, gamma=1.0, learning_rate=0.1,
  weight_decay=5e-4, momentum=0.9`` (SGD momentum is hard-coded to 0.9 in train.py),
  ``isASAM=False``; ``run.sh`` uses ``beta=0.5, gamma=0.5, lr=0.05, weight_decay=1e-3,
  rho=0.1`` (WRN, batch 1024) and ``beta=0.6, gamma=0.5, rho=0.05`` (ResNet18, batch 64).

One step, as the code computes it (w: params, n: batch size):

1. ``l_before = per_example_losses(w, batch)``; ``g = grad of mean(l_before)`` (one pass).
   Tensors dropped by SWP (``mask[i]`` false) get no gradient in this pass.
2. ``norm = || [ ||T_i g_i|| for kept tensors i ] ||`` with ``T_i = |w_i|`` if ``adaptive``
   (ASAM) else 1. ``scale = rho / (norm + 1e-7) / beta``.
3. ``e_i = (w_i**2 if adaptive else 1) * g_i * scale`` for kept tensors, ``e_i = 0`` for dropped
   ones; ``w <- w + e``. The perturbation norm is ``rho / beta``, not ``rho``.
4. If ``gamma >= 0.99``: every example is used. Otherwise
   ``sharpness = per_example_losses(w + e, batch) - l_before``, ``k = int(n * gamma)``,
   ``cutoff`` = the k-th largest sharpness, selected = examples with ``sharpness > cutoff``
   (strict): k - 1 examples without ties, fewer with ties at the cutoff, none if all are equal
   (the mean of nothing is NaN in torch; here a ValueError). ``k == 0`` fails in torch
   (``topk(.., 0)[-1]``); here a ValueError.
5. ``g2 = grad of the mean loss over the selected examples at w + e`` (all tensors).
6. ``w <- (w + e) - e`` (in place, so rounding as torch), then torch SGD on ``g2``:
   ``d = g2 + weight_decay * w``; ``buf = d`` on the first step else
   ``momentum * buf + (1 - dampening) * d``; ``d = d + momentum * buf`` if nesterov else ``buf``;
   ``w <- w - lr * d``.
7. SWP draw for the NEXT step: per parameter tensor, in ``parameters()`` order, the tensor is
   dropped next step when ``random.random() > beta``. Step 0 therefore perturbs every tensor
   (still divided by beta). Use :func:`masks_from_uniforms` to build ``masks`` from those draws.

Interface of the problem callables:

- ``loss_and_grad(params, batch, index=None) -> (float, list[np.ndarray])``: the mean loss over
  the examples ``index`` (an integer array into the batch; ``None`` = all) and its gradient.
- ``per_example_losses(params, batch) -> np.ndarray`` of shape ``[n]``.

Base optimizer supported: torch.optim.SGD (lr, momentum, dampening, weight_decay, nesterov).
``lr`` may be a float or a per-step sequence (the authors step a per-epoch cosine schedule).
"""

import numpy as np

from references.torch_optim import at
from references.torch_optim import global_norm
from references.torch_optim import sgd_init
from references.torch_optim import sgd_step

PERTURB_EPS = 1e-7
ALL_EXAMPLES_GAMMA = 0.99


def masks_from_uniforms(uniforms, beta, n_steps):
    """Per-step per-tensor keep masks from the authors' ``random.random()`` draws.

    ``uniforms[t]`` are the draws made at the end of step t (one per tensor); they decide the
    tensors perturbed at step t + 1. Step 0 keeps every tensor.
    """
    n_tensors = len(uniforms[0])
    masks = [[True] * n_tensors]
    for t in range(1, n_steps):
        masks.append([u <= beta for u in uniforms[t - 1]])
    return masks


def swp_perturbation(params, grads, mask, rho, beta, adaptive):
    kept = [i for i, keep in enumerate(mask) if keep]
    if adaptive:
        norm = global_norm([np.abs(params[i]) * grads[i] for i in kept]) if kept else 0.0
    else:
        norm = global_norm([grads[i] for i in kept]) if kept else 0.0
    scale = rho / (norm + PERTURB_EPS) / beta
    perturbation = []
    for i, (w, g) in enumerate(zip(params, grads)):
        if not mask[i]:
            perturbation.append(np.zeros_like(w))
        elif adaptive:
            perturbation.append(w**2 * g * scale)
        else:
            perturbation.append(g * scale)
    return perturbation


def sds_index(sharpness, gamma):
    """Indices of the selected examples, or None for the whole batch."""
    if gamma >= ALL_EXAMPLES_GAMMA:
        return None
    k = int(len(sharpness) * gamma)
    if k == 0:
        raise ValueError("int(batch_size * gamma) is 0: the authors' top-k fails")
    cutoff = np.sort(sharpness)[::-1][k - 1]
    index = np.flatnonzero(sharpness > cutoff)
    if index.size == 0:
        raise ValueError("no example has sharpness above the cutoff (the authors' mean is NaN)")
    return index


def esam_step(params, batch, mask, hyper, loss_and_grad, per_example_losses):
    """Returns the restored params and the gradient the base optimizer receives."""
    losses_before = per_example_losses(params, batch)
    _, grads = loss_and_grad(params, batch)
    perturbation = swp_perturbation(
        params, grads, mask, hyper["rho"], hyper["beta"], hyper["adaptive"]
    )
    perturbed = [w + e for w, e in zip(params, perturbation)]
    index = None
    if hyper["gamma"] < ALL_EXAMPLES_GAMMA:
        sharpness = per_example_losses(perturbed, batch) - losses_before
        index = sds_index(sharpness, hyper["gamma"])
    _, grads_perturbed = loss_and_grad(perturbed, batch, index)
    restored = [w - e for w, e in zip(perturbed, perturbation)]
    return restored, grads_perturbed


def trajectory(
    params0,
    batches,
    loss_and_grad,
    per_example_losses,
    *,
    masks=None,
    lr=0.1,
    rho=0.05,
    beta=1.0,
    gamma=1.0,
    adaptive=False,
    momentum=0.9,
    dampening=0.0,
    weight_decay=5e-4,
    nesterov=False,
):
    """Params after each ESAM step; ``masks[t]`` = per-tensor keep flags of step t."""
    n_steps = len(batches)
    if masks is None:
        masks = [[True] * len(params0)] * n_steps
    hyper = {"rho": rho, "beta": beta, "gamma": gamma, "adaptive": adaptive}
    sgd = dict(momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov)
    params = [np.array(w, dtype=np.float64) for w in params0]
    bufs = sgd_init(params)
    out = []
    for t, batch in enumerate(batches):
        params, grads = esam_step(params, batch, masks[t], hyper, loss_and_grad, per_example_losses)
        params, bufs = sgd_step(params, grads, bufs, lr=at(lr, t), **sgd)
        out.append([w.copy() for w in params])
    return out
