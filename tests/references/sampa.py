"""SAMPa (Xie, Pethick and Cevher, NeurIPS 2024) as its authors' code computes it, in float64 numpy.

Source: github.com/LIONS-EPFL/SAMPa, commit 01093ef6eb35af2eefa62b618bfcae16fb4a73d7 (the code
files are as in the first commit 9fd7534; every later commit edits the README only). There is no
optimizer class: the method is written into the training loop. Re-expressed: ``train.py``
``run`` (lines 30-104: ``torch.optim.SGD(lr, weight_decay, momentum)`` under Lightning Fabric's
DDP on two ranks, the flat buffers ``y_grads``, ``pert_grads`` and ``agg_grads`` (zeros at the
start), the per-rank step, ``fabric.all_reduce(..., reduce_op='sum')``, the restore,
``optimizer.step()``, ``data1`` as the previous batch, ``CosineAnnealingLR(optimizer, epochs)``
stepped once per epoch) and ``utility.py`` (``unflatten``). The loss (``smooth_crossentropy``,
label smoothing 0.1, mean over the batch) is the caller's ``loss_and_grad``.

Both ranks apply the same summed gradient, so each holds a copy of x. Each rank shifts its own
copy, takes one gradient, then adds the shift back, so the copies agree only up to that
rounding; both are kept here (``x`` is rank 0's, the model it validates and saves). Step t, with
B_t the t-th batch, B_{-1} = B_0, lr_t the epoch's learning rate, lam = ``og``, and every
tensor flattened into one vector:

rank 0 (the perturbed gradient, on the previous batch):
  d = (S_{t-1} - P_{t-1}) / (lam + 1e-15)          rank 1's last gradient recovered from the sum
                                                   (S_{-1} = P_{-1} = 0, so d = 0 at t = 0)
  scale = rho / (||d|| + 1e-12);  x~ = x - d * (-scale)     (||.|| the 2-norm of the flat vector)
  P_t = (1 - lam) * grad L(x~; B_{t-1})
rank 1 (the extrapolated gradient, on the current batch), g its own last gradient (0 at t = 0):
  s = lr_t * (g + (weight_decay * x + momentum * buf))   if SGD's momentum buffer exists
  s = lr_t * g                                           otherwise (t = 0, or momentum = 0)
  y = x - s;  g = grad L(y; B_t);  Q_t = lam * g
both: S_t = P_t + Q_t (the all-reduce); each rank adds its own shift back; then
``torch.optim.SGD.step`` on S_t: d = S_t + weight_decay * x; buf = d on the first step, else
momentum * buf + d; x = x - lr_t * buf (dampening 0, no Nesterov).

So rank 0 perturbs along the gradient rank 1 took at the previous step (recovered from the sum;
only the weighted sum travels) and evaluates it on that gradient's batch, while rank 1's y is the
step torch's SGD would take from x with gradient g: decay and momentum enter y only once torch
has a momentum buffer, and there is none for momentum 0 (absent, or None in older torch; their
check skips both): then y = x - lr_t * g, without decay even if weight_decay > 0. The first
step takes both gradients at x_0 on B_0, so it is an SGD step on grad L(x_0; B_0) (as
(1 - lam) g + lam g). With lam = 0 the recovered d is 0, x~ = x, and the run is SGD on
grad L(x_t; B_{t-1}). No gradient clipping. No special BatchNorm handling: both ranks forward in
train mode; DDP syncs buffers only before the first forward (under ``no_backward_sync`` it
stops), so each rank keeps its own running statistics (rank 0's from its forwards at x~ on the
previous batches).

Batches: both ranks iterate the same loader (no distributed sampler) from the same seed, but
rank 0's validation pass after each epoch draws from torch's global generator, so from the
second epoch on its ``SubsetRandomSampler`` order is in general not rank 1's. ``batches`` is
rank 1's order; ``rank0_batches`` (default: the same) is rank 0's, whose entry t - 1 step t
uses.

Defaults (their argparse): lr 0.1, rho 0.1, og (lam) 0.2, weight_decay 5e-4, momentum 0.9,
batch 128, epochs 5 (README command: 200, ResNet-56, CIFAR-10), seed 42; the schedule is per
epoch, lr_e = lr (1 + cos(pi e / epochs)) / 2 for epoch e = 0, 1, ... (``epoch_lrs``), one lr for
the y shift and the SGD step.

Validated against their ``run`` executed unchanged (train.py and utility.py at the commit above,
torch 2.13 CPU, lightning_fabric 2.6.6 standing in for ``lightning.fabric``): Fabric itself
launched two gloo processes on 127.0.0.1, with only ``accelerator="cuda"`` replaced by "cpu" and
a float64 4-5-3 tanh MLP and a small data set in place of ``get_model``/``get_dataset``; hooks
recorded the params at each forward and after each ``optimizer.step``. Over 6 steps (2 epochs of
3 batches of 8, cosine lr) the max abs difference of either rank's params, x~ and y was at most
1.1e-16 for momentum 0.9 / weight_decay 5e-4, momentum 0 / no decay, their defaults,
momentum 0 / decay 5e-2, and lam 0; over 9 shuffled steps (3 epochs, their sampler, per-rank
orders) 8.3e-17.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from references.torch_optim import LossAndGrad
from references.torch_optim import Params
from references.torch_optim import at
from references.torch_optim import sgd_init
from references.torch_optim import sgd_step

NORM_EPS = 1e-12  # added to ||d|| in rank 0's perturbation
SHARE_EPS = 1e-15  # added to lam when rank 0 divides rank 1's share out of the sum


@dataclass
class Step:
    """What one step of their loop computes (t counts from 0)."""

    x: Params  # rank 0's params after the step
    x_rank1: Params  # rank 1's copy (equal to x up to the rounding of the restores)
    perturbed: Params  # x~_t, where rank 0 took its gradient (on batch t - 1)
    y: Params  # y_{t+1}, where rank 1 took its gradient (on batch t)
    direction: Params  # d, rank 0's recovery of rank 1's previous gradient (zeros at t = 0)
    grad_perturbed: Params  # grad L(x~_t; B_{t-1})
    grad_y: Params  # grad L(y_{t+1}; B_t)
    total: Params  # (1 - lam) grad_perturbed + lam grad_y as summed, SGD's gradient


def flat_norm(tensors: Params) -> float:
    """``torch.cat([t.view(-1) ...]).norm(p=2)``: the 2-norm of the flattened concatenation."""
    return float(np.linalg.norm(np.concatenate([np.ravel(x) for x in tensors])))


def epoch_lrs(lr: float, epochs: int, steps_per_epoch: int) -> list[float]:
    """``CosineAnnealingLR(T_max=epochs)`` stepped per epoch, as one lr per step.

    The closed form; torch's own recursive update agrees to rounding (3.5e-18 over 3 epochs).
    """
    return [
        float(lr * (1 + np.cos(np.pi * e / epochs)) / 2)
        for e in range(epochs)
        for _ in range(steps_per_epoch)
    ]


def _rank1_shift(x, buffers, g, lr, momentum, weight_decay):
    """Rank 1's shift s (y = x - s): SGD's step from x with gradient g, once a buffer exists."""
    if any(b is None for b in buffers):
        return [lr * gi for gi in g]
    return [lr * (gi + (weight_decay * w + b * momentum)) for gi, w, b in zip(g, x, buffers)]


def steps(
    params0: Params,
    batches: Sequence[Any],
    loss_and_grad: LossAndGrad,
    *,
    lr: float | Sequence[float] = 0.1,
    rho: float = 0.1,
    lam: float = 0.2,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    rank0_batches: Sequence[Any] | None = None,
) -> list[Step]:
    """Their loop over ``batches`` (the loader's batches in order, across epochs); see above.

    ``rank0_batches``: the batches rank 0's own loader yields, where they differ from rank 1's
    (their script from the second epoch on); rank 0 takes step t's gradient on entry t - 1.
    """
    rank0_batches = batches if rank0_batches is None else rank0_batches
    x0 = [np.array(w, dtype=np.float64) for w in params0]
    x1 = [w.copy() for w in x0]
    buf0, buf1 = sgd_init(x0), sgd_init(x1)
    own = [np.zeros_like(w) for w in x0]  # rank 0's (1 - lam) * grad of the last step
    total = [np.zeros_like(w) for w in x0]  # the last all-reduced sum
    g = [np.zeros_like(w) for w in x0]  # rank 1's last gradient
    sgd = dict(momentum=momentum, weight_decay=weight_decay)
    out = []
    for t, batch in enumerate(batches):
        lr_t = at(lr, t)
        # rank 0
        direction = [(s - o) / (lam + SHARE_EPS) for s, o in zip(total, own)]
        scale = rho / (flat_norm(direction) + NORM_EPS)
        shift0 = [d * -scale for d in direction]
        perturbed = [w - s for w, s in zip(x0, shift0)]
        _, grad_perturbed = loss_and_grad(perturbed, rank0_batches[max(t - 1, 0)])
        own = [gp * (1 - lam) for gp in grad_perturbed]
        # rank 1
        shift1 = _rank1_shift(x1, buf1, g, lr_t, momentum, weight_decay)
        y = [w - s for w, s in zip(x1, shift1)]
        _, g = loss_and_grad(y, batch)
        # the all-reduce, the restores, torch.optim.SGD on each rank
        total = [o + lam * gi for o, gi in zip(own, g)]
        x0 = [w + s for w, s in zip(perturbed, shift0)]
        x1 = [w + s for w, s in zip(y, shift1)]
        x0, buf0 = sgd_step(x0, total, buf0, lr=lr_t, **sgd)
        x1, buf1 = sgd_step(x1, total, buf1, lr=lr_t, **sgd)
        out.append(Step(x0, x1, perturbed, y, direction, grad_perturbed, g, total))
    return out


def trajectory(
    params0: Params,
    batches: Sequence[Any],
    loss_and_grad: LossAndGrad,
    *,
    lr: float | Sequence[float] = 0.1,
    rho: float = 0.1,
    lam: float = 0.2,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    rank0_batches: Sequence[Any] | None = None,
) -> list[Params]:
    """Rank 0's params after each step of their loop (:func:`steps` has the rest)."""
    run = steps(
        params0,
        batches,
        loss_and_grad,
        lr=lr,
        rho=rho,
        lam=lam,
        momentum=momentum,
        weight_decay=weight_decay,
        rank0_batches=rank0_batches,
    )
    return [s.x for s in run]
