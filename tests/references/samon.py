"""SAM-ON (Mueller et al., NeurIPS 2023) re-expressed in float64 numpy from the authors' code.

Source read: repository mueller-mp/SAM-ON, commit 8b8869ad1e03a83cc9e71bf4bca605ecc9f89080:

* ``sam_on.py``: classes ``ASAM_ON`` (``ascent_step``, ``descent_step``) and ``SAM_ON``
  (``ascent_step``), re-expressed as :func:`asam_on_perturbation`, :func:`sam_on_perturbation`
  and :func:`samon_step`;
* ``train.py``: the step loop (mean loss, ascent, second forward/backward, descent), the base
  optimizers (``SGD(lr, momentum, weight_decay)``, ``AdamW(lr, weight_decay)``), the
  ``start_sam``/``end_sam`` epochs that use a plain base step, and the defaults: minimizer
  ASAM_ON, p "2", rho 0.5, eta 0.0, elementwise/layerwise/normalize_bias/only_norm off, SGD with
  lr 0.1, momentum 0.9, weight_decay 5e-4 (cosine schedule per epoch, label smoothing 0.1).
  The README's CIFAR-100 WRN-28-10 command: ASAM_ON, p 2, elementwise, normalize_bias, rho 10,
  only_norm.

Which tensors are perturbed is chosen by name in their code: ``only_norm`` perturbs the tensors
whose name contains ``"norm"`` or ``"bn"``, ``no_norm`` all the others; here that choice is the
``mask`` argument (one bool per tensor, True = perturbed; :func:`name_mask` builds it from names).
Every tensor (masked or not) is updated by the base optimizer with the gradient taken at the
perturbed point; perturbed tensors are restored by copy, not by subtraction.

SAM_ON: ``e_i = g_i * rho / (||(||g_j||)_{j in mask}|| + 1e-16)`` on masked tensors.
ASAM_ON, p "2": ``s_i`` is ``|w_i| + eta`` (elementwise), else ``||w_i||_2 * (1 + eta)``
(layerwise), else ``w_i`` itself; only for tensors whose name contains ``"weight"`` unless
``normalize_bias`` (others use 1); ``h_i = s_i g_i``,
``e_i = s_i h_i * rho / (||(||h_j||)_j|| + 1e-16)``.
ASAM_ON, p "infinity": ``e_i = rho * sign(g_i) * s_i`` (``rho * sign(g_i)`` for unscaled tensors),
no normalisation.
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
from references.torch_optim import global_norm

NORM_EPS = 1e-16


def is_norm_name(name: str) -> bool:
    """Their selection rule for normalization tensors (case-sensitive substrings)."""
    return "norm" in name or "bn" in name


def name_mask(names: Sequence[str], only_norm: bool = True, no_norm: bool = False) -> list[bool]:
    """Mask (True = perturbed) that their only_norm / no_norm flags select from tensor names."""
    if only_norm and no_norm:
        raise ValueError("only_norm and no_norm exclude each other")
    if only_norm:
        return [is_norm_name(n) for n in names]
    if no_norm:
        return [not is_norm_name(n) for n in names]
    return [True] * len(names)


def weight_flags(names: Sequence[str]) -> list[bool]:
    """ASAM_ON scales only tensors whose name contains 'weight' (unless normalize_bias)."""
    return ["weight" in n for n in names]


def stacked_norm(tensors: Sequence[np.ndarray]) -> float:
    """2-norm of the per-tensor 2-norms, plus their 1e-16."""
    return global_norm(tensors) + NORM_EPS


def sam_on_perturbation(grads: Params, mask: Sequence[bool], rho: float) -> Params:
    """SAM_ON.ascent_step: e on masked tensors, zeros elsewhere."""
    scale = rho / stacked_norm([g for g, m in zip(grads, mask) if m])
    return [g * scale if m else np.zeros_like(g) for g, m in zip(grads, mask)]


def asam_scale(w: np.ndarray, eta: float, elementwise: bool, layerwise: bool) -> np.ndarray:
    """ASAM_ON's normalization operator t_w for one tensor."""
    if elementwise:
        return np.abs(w) + eta
    if layerwise:
        return np.linalg.norm(w.ravel()) * (np.ones_like(w) + eta)
    return w.copy()


def asam_on_perturbation(params, grads, mask, rho, eta, p, elementwise, layerwise, scaled):
    """ASAM_ON.ascent_step: e on masked tensors, zeros elsewhere."""
    ts = [asam_scale(w, eta, elementwise, layerwise) for w in params]
    if p == "infinity":
        heads = [np.sign(g) * t if s else np.sign(g) for g, t, s in zip(grads, ts, scaled)]
        return [h * rho if m else np.zeros_like(h) for h, m in zip(heads, mask)]
    if p != "2":
        raise NotImplementedError(p)
    heads = [g * t if s else g for g, t, s in zip(grads, ts, scaled)]
    factor = rho / stacked_norm([h for h, m in zip(heads, mask) if m])
    twice = [h * t if s else h for h, t, s in zip(heads, ts, scaled)]
    return [h * factor if m else np.zeros_like(h) for h, m in zip(twice, mask)]


# Their train.py's base optimizers: SGD(lr, momentum, weight_decay) and AdamW(lr, weight_decay),
# no nesterov, no dampening (torch's SGD and AdamW steps in torch_optim).
BASE_NAMES = {"SGD": "sgd", "AdamW": "adamw"}


def perturbation(params, grads, mask, ascent: dict) -> Params:
    """The ascent step of SAM_ON or ASAM_ON."""
    if ascent["minimizer"] == "SAM_ON":
        return sam_on_perturbation(grads, mask, ascent["rho"])
    scaled = [ascent["normalize_bias"] or f for f in ascent["is_weight"]]
    return asam_on_perturbation(
        params,
        grads,
        mask,
        ascent["rho"],
        ascent["eta"],
        ascent["p"],
        ascent["elementwise"],
        ascent["layerwise"],
        scaled,
    )


def samon_step(params, batch, loss_and_grad, mask, state, lr, ascent, sam, base, hyper):
    """One iteration of their train loop (sam=False: a plain base step, as outside SAM epochs).

    ``base``: 'sgd' or 'adamw' (torch_optim's names).
    """
    _, g0 = loss_and_grad(params, batch)
    if not sam:
        return base_step(base, params, g0, state, lr=lr, **hyper)
    e = perturbation(params, g0, mask, ascent)
    perturbed = [w + d if m else w for w, d, m in zip(params, e, mask)]
    _, g1 = loss_and_grad(perturbed, batch)
    return base_step(base, params, g1, state, lr=lr, **hyper)


def trajectory(
    params0: Params,
    batches: Sequence[Any],
    loss_and_grad: LossAndGrad,
    mask: Sequence[bool],
    *,
    minimizer: str = "ASAM_ON",
    lr: float | Sequence[float] = 0.1,
    rho: float = 0.5,
    eta: float = 0.0,
    p: str = "2",
    elementwise: bool = False,
    layerwise: bool = False,
    normalize_bias: bool = False,
    is_weight: Sequence[bool] | None = None,
    sam_active: Sequence[bool] | None = None,
    base_minimizer: str = "SGD",
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> list[Params]:
    """Params after each of ``len(batches)`` steps of SAM_ON / ASAM_ON (one batch per step).

    ``mask``: True for perturbed tensors. ``is_weight``: ASAM_ON's "'weight' in name" per tensor
    (default: all True). ``lr``: a number or one per step. ``sam_active``: per step, False for a
    plain base step (their start_sam/end_sam epochs); default all True.
    """
    if base_minimizer not in BASE_NAMES:
        raise ValueError(f"unsupported base optimizer {base_minimizer!r}")
    base = BASE_NAMES[base_minimizer]
    n = len(batches)
    active = [True] * n if sam_active is None else list(sam_active)
    flags = [True] * len(params0) if is_weight is None else list(is_weight)
    ascent = dict(minimizer=minimizer, rho=rho, eta=eta, p=p, elementwise=elementwise)
    ascent.update(layerwise=layerwise, normalize_bias=normalize_bias, is_weight=flags)
    hyper = dict(momentum=momentum, weight_decay=weight_decay, betas=betas, eps=eps)
    params = [np.asarray(w, dtype=np.float64).copy() for w in params0]
    state = base_init(base, params)
    out = []
    for t, (batch, sam) in enumerate(zip(batches, active)):
        params, state = samon_step(
            params, batch, loss_and_grad, mask, state, at(lr, t), ascent, sam, base, hyper
        )
        out.append([w.copy() for w in params])
    return out
