"""GSAM (Zhuang et al. 2022) as its authors' code computes it, in float64 numpy.

Two sources, two functions:

``trajectory``: the PyTorch class, github.com/juntang-zhuang/GSAM, commit
a770275b3324a3ed4bf4a1cddb976b2782ba852b. Re-expressed: ``gsam/gsam.py`` (``GSAM.step``,
``perturb_weights``, ``gradient_decompose``, ``unperturb``, ``_grad_norm``), ``gsam/scheduler.py``
(``SchedulerBase``, ``LinearScheduler``, ``CosineScheduler``, ``ProportionScheduler``) and the
loop of ``example/train.py`` (``torch.optim.SGD`` as the base optimizer; ``scheduler.step()`` and
``optimizer.update_rho_t()`` after each step). Step t, all norms global over the tensors
(the 2-norm of the per-tensor 2-norms), eps = ``perturb_eps`` = 1e-12:
  g = grad L(w)
  n = ||(|w| if adaptive else 1) * g||;  e = g * (rho_t / (n + eps)) * (w^2 if adaptive else 1)
  gs = grad L(w + e)
  cos = <g, gs> / (||gs|| ||g|| + eps);  v = g - cos * ||g|| * gs / (||gs|| + eps)
  d = gs - alpha * v;  w = (w + e) - e   (restored by subtraction)
  torch.optim.SGD on d: d += weight_decay * w;  buf = d (first step) else momentum * buf + d;
  d = d + momentum * buf (nesterov) else buf;  w = w - lr_t * d.
Weight decay enters only in the base step (not in e, not in the decomposition). Their example's
defaults: lr 0.1 cosine to 0 per step (their ``CosineScheduler``), momentum 0.9, weight_decay
5e-4, rho_max = rho_min = 2.0, alpha 0.4, adaptive True (the class default is False), no
nesterov. ``example_schedules`` gives the per-step (lr, rho) that loop produces, including its
first step: lr_0 is the SGD's own lr and rho_0 comes from the scheduler's ``init_value`` (0.0,
so rho_0 = rho_min); from step 1 on, lr_t = sched(t - 1) and rho_t is proportional to lr_t.

``trajectory_big_vision``: the JAX trainer, github.com/google-research/big_vision, commit
0127fb6b337ee2a27bf4e54dea79cff176527356. Re-expressed: ``big_vision/trainers/proj/gsam/gsam.py``
(``dual_vector``, ``gsam_gradient``), ``big_vision/trainers/proj/gsam/train.py`` (``update_fn``:
each device's ``gsam_gradient`` on its shard, ``lax.pmean``, then ``tx.update``),
``big_vision/optax.py`` (``make``: the chain clip, base, scale(lr), add_decayed_weights(wd),
scale_by_schedule, scale(-1)), ``big_vision/utils.py`` (``create_learning_rate_schedule``) and
``big_vision/configs/proj/gsam/vit_i1k_gsam_no_aug.py`` (defaults). Step t (optimizer count t;
their loop's ``step`` is t + 1), per device, norms plain global 2-norms, eps = 1e-12:
  rho = rho_max if lr_max == lr_min else rho_min + (rho_max - rho_min)(lr_rho - lr_min)/(lr_max - lr_min)
    with lr_rho = schedule(t + 1) * lr  (one step ahead of the lr the base step uses)
  g = grad L(w);  w' = w + (|w| if adaptive_perturbation else 1) * rho * g / (||g|| + eps)
  gs = grad L(w')
  minimize_fp: u = gs / ||gs|| (no eps);  d = gs - alpha * (g - <u, g> u)
  else:        u = g / ||g|| (no eps);    d = g + alpha * (gs - <u, gs> u)
  d = mean over devices;  clip d to global norm ``grad_clip_norm``;  a = base(d)
  w = w - schedule(t) * (lr * a + wd * mask * w)
"""

from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import numpy as np

from references.torch_optim import LossAndGrad
from references.torch_optim import Params
from references.torch_optim import at
from references.torch_optim import global_norm
from references.torch_optim import sgd_init
from references.torch_optim import sgd_step

Schedule = Callable[[int], Any]

PERTURB_EPS = 1e-12


def sum_norm(tensors: Params) -> float:
    """big_vision's global norm: sqrt of the sum over tensors of the summed squares."""
    return float(np.sqrt(sum(np.sum(np.square(x)) for x in tensors)))


# --------------------------------------------------------------------------
# The PyTorch class and its example script.
# --------------------------------------------------------------------------


def scheduler_values(
    n: int,
    *,
    kind: str,
    total_steps: int,
    max_value: float,
    min_value: float = 0.0,
    init_value: float = 0.0,
    warmup_steps: int = 0,
) -> list[float]:
    """The values of their ``LinearScheduler``/``CosineScheduler`` over the first n ``step()`` calls."""
    out = []
    for t in range(n):
        if t < warmup_steps:
            value = init_value + (max_value - init_value) * t / warmup_steps
        elif t == warmup_steps:
            value = max_value
        elif kind == "linear":
            frac = (t - warmup_steps) / (total_steps - warmup_steps)
            value = max_value + (min_value - max_value) * frac
        elif kind == "cosine":
            phase = (t - warmup_steps) / (total_steps - warmup_steps) * np.pi
            value = min_value + (max_value - min_value) * (np.cos(phase) + 1.0) / 2.0
        else:
            raise ValueError(f"kind must be 'linear' or 'cosine', got {kind!r}")
        out.append(float(value))
    return out


def proportional_rho(
    lr: float, *, max_lr: float, min_lr: float, max_value: float, min_value: float
) -> float:
    """Their ``ProportionScheduler``: rho moves with lr between (min_lr, min_value) and (max_lr, max_value)."""
    if max_lr > min_lr:
        return min_value + (max_value - min_value) * (lr - min_lr) / (max_lr - min_lr)
    return max_value


def example_schedules(
    n_steps: int,
    *,
    learning_rate: float = 0.1,
    rho_max: float = 2.0,
    rho_min: float = 2.0,
    total_steps: int,
    kind: str = "cosine",
    min_lr: float = 0.0,
    warmup_steps: int = 0,
    init_value: float = 0.0,
) -> tuple[list[float], list[float]]:
    """The per-step (lr, rho) of ``example/train.py``: their scheduler drives SGD's lr and rho.

    Step 0 runs with the SGD's own ``learning_rate`` (the scheduler has not set one yet) and
    with rho from the scheduler's ``init_value``; after step t the scheduler steps (its value
    becomes step t+1's lr) and ``update_rho_t`` reads it (rho_{t+1} follows lr_{t+1}).
    """
    values = scheduler_values(
        max(n_steps - 1, 0),
        kind=kind,
        total_steps=total_steps,
        max_value=learning_rate,
        min_value=min_lr,
        init_value=init_value,
        warmup_steps=warmup_steps,
    )
    lrs = [learning_rate, *values]
    seen = [init_value, *values]
    rhos = [
        proportional_rho(
            v, max_lr=learning_rate, min_lr=min_lr, max_value=rho_max, min_value=rho_min
        )
        for v in seen
    ]
    return lrs[:n_steps], rhos[:n_steps]


def perturbation(
    params: Params, grads: Params, rho: float, *, adaptive: bool, eps: float = PERTURB_EPS
) -> Params:
    """``perturb_weights``: e = g * rho / (||T g|| + eps) * T^2, with T = |w| (adaptive) or 1."""
    scaled = [np.abs(w) * g for w, g in zip(params, grads)] if adaptive else grads
    scale = rho / (global_norm(scaled) + eps)
    out = []
    for w, g in zip(params, grads):
        e = g * scale
        out.append(e * w**2 if adaptive else e)
    return out


def decompose(clean: Params, perturbed: Params, alpha: float, eps: float = PERTURB_EPS) -> Params:
    """``gradient_decompose``: gs - alpha * (g - cos * ||g|| * gs / (||gs|| + eps))."""
    inner = 0.0
    for g, s in zip(clean, perturbed):
        inner += np.sum(g * s)
    new_norm = global_norm(perturbed)
    old_norm = global_norm(clean)
    cosine = inner / (new_norm * old_norm + eps)
    out = []
    for g, s in zip(clean, perturbed):
        vertical = g - cosine * old_norm * s / (new_norm + eps)
        out.append(s + (-alpha) * vertical)
    return out


def trajectory(
    params0: Params,
    batches: Sequence[Any],
    loss_and_grad: LossAndGrad,
    *,
    lr: float | Sequence[float] = 0.1,
    rho: float | Sequence[float] = 2.0,
    alpha: float = 0.4,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    nesterov: bool = False,
    adaptive: bool = True,
    perturb_eps: float = PERTURB_EPS,
) -> list[Params]:
    """The params after each step of ``GSAM.step`` over ``torch.optim.SGD`` (one process).

    ``lr`` and ``rho`` are constants or per-step sequences (``example_schedules`` gives the
    ones their example produces). Only SGD is supported as the base optimizer.
    """
    params = [np.array(w, dtype=np.float64) for w in params0]
    sgd = dict(momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    buffers = sgd_init(params)
    out = []
    for t, batch in enumerate(batches):
        _, grads = loss_and_grad(params, batch)
        e = perturbation(params, grads, at(rho, t), adaptive=adaptive, eps=perturb_eps)
        moved = [w + x for w, x in zip(params, e)]
        _, perturbed = loss_and_grad(moved, batch)
        direction = decompose(grads, perturbed, alpha, perturb_eps)
        params = [w - x for w, x in zip(moved, e)]
        params, buffers = sgd_step(params, direction, buffers, lr=at(lr, t), **sgd)
        out.append([w.copy() for w in params])
    return out


# --------------------------------------------------------------------------
# The big_vision (JAX) trainer.
# --------------------------------------------------------------------------


def big_vision_schedule(
    total_steps: int,
    *,
    decay_type: str = "linear",
    warmup_steps: int = 0,
    linear_end: float = 0.0,
    power: float = 1.0,
    float32: bool = True,
) -> Schedule:
    """``create_learning_rate_schedule(base=1)`` for 'linear' and 'cosine' (a multiplier of ``lr``).

    Their function returns a float32 scalar, and so does this one (``np.float32``: numpy's
    promotion rules then make ``schedule(step) * lr`` and the rho computed from it float32, as
    in their trainer); ``float32=False`` returns the float64 value instead.
    """

    def schedule(step: int) -> float:
        progress = float(np.clip((step - warmup_steps) / float(total_steps - warmup_steps), 0, 1))
        if decay_type == "linear":
            value = linear_end + (1.0 - linear_end) * (1.0 - progress) ** power
        elif decay_type == "cosine":
            value = 0.5 * (1.0 + np.cos(np.pi * progress))
        else:
            raise ValueError(f"decay_type must be 'linear' or 'cosine', got {decay_type!r}")
        if warmup_steps:
            value = value * min(1.0, step / warmup_steps)
        return np.float32(value) if float32 else float(value)

    return schedule


def gsam_gradient(
    params: Params,
    batch: Any,
    loss_and_grad: LossAndGrad,
    *,
    lr: float,
    rho_max: float,
    rho_min: float,
    alpha: float,
    lr_max: float,
    lr_min: float,
    eps: float = PERTURB_EPS,
    adaptive_perturbation: bool = False,
    minimize_fp: bool = True,
) -> Params:
    """big_vision's ``gsam_gradient`` on one device (not yet averaged)."""
    _, clean = loss_and_grad(params, batch)
    clean_norm = sum_norm(clean)
    if lr_max == lr_min:
        rho = rho_max
    else:
        rho = rho_min + (rho_max - rho_min) * (lr - lr_min) / (lr_max - lr_min)
    if adaptive_perturbation:
        moved = [w + np.abs(w) * rho * g / (clean_norm + eps) for w, g in zip(params, clean)]
    else:
        moved = [w + rho * g / (clean_norm + eps) for w, g in zip(params, clean)]
    _, robust = loss_and_grad(moved, batch)
    if minimize_fp:
        robust_norm = sum_norm(robust)
        unit = [s / robust_norm for s in robust]
        coef = sum(np.vdot(u, g) for u, g in zip(unit, clean))
        return [s - (g - coef * u) * alpha for s, g, u in zip(robust, clean, unit)]
    unit = [g / clean_norm for g in clean]
    coef = sum(np.vdot(u, s) for u, s in zip(unit, robust))
    return [g + (s - coef * u) * alpha for g, s, u in zip(clean, robust, unit)]


def _clip_global(grads: Params, max_norm: float | None) -> Params:
    """``optax.clip_by_global_norm``: unchanged below ``max_norm``, else (g / norm) * max_norm."""
    if not max_norm:
        return grads
    norm = sum_norm(grads)
    if norm < max_norm:
        return grads
    return [(g / norm) * max_norm for g in grads]


def _base_direction(
    grads: Params, state: dict[str, Any], t: int, optax_name: str, hyper: dict[str, Any]
) -> Params:
    """``scale_by_adam``, ``big_vision.momentum_hp`` (``optax.trace``) or ``big_vision.sgd``."""
    if optax_name == "big_vision.sgd":
        return grads
    if optax_name == "big_vision.momentum_hp":
        decay = hyper["momentum"]
        trace = [g + decay * m for g, m in zip(grads, state["trace"])]
        state["trace"] = trace
        if hyper["nesterov"]:
            return [g + decay * m for g, m in zip(grads, trace)]
        return trace
    if optax_name == "scale_by_adam":
        b1, b2, eps = hyper["b1"], hyper["b2"], hyper["adam_eps"]
        state["mu"] = [(1 - b1) * g + b1 * m for g, m in zip(grads, state["mu"])]
        state["nu"] = [(1 - b2) * g**2 + b2 * v for g, v in zip(grads, state["nu"])]
        count = t + 1
        mu_hat = [m / (1 - b1**count) for m in state["mu"]]
        nu_hat = [v / (1 - b2**count) for v in state["nu"]]
        return [m / (np.sqrt(v + 0.0) + eps) for m, v in zip(mu_hat, nu_hat)]
    raise ValueError(
        "optax_name must be 'scale_by_adam', 'big_vision.momentum_hp' or 'big_vision.sgd', "
        f"got {optax_name!r}"
    )


def trajectory_big_vision(
    params0: Params,
    batches: Sequence[Any],
    loss_and_grad: LossAndGrad,
    *,
    lr: float = 0.003,
    schedule: Schedule | None = None,
    rho_max: float = 0.6,
    rho_min: float = 0.1,
    alpha: float = 0.6,
    lr_max: float = 0.003,
    lr_min: float = 0.003 * 0.01,
    eps: float = PERTURB_EPS,
    adaptive_perturbation: bool = False,
    minimize_fp: bool = True,
    optax_name: str = "scale_by_adam",
    b1: float = 0.9,
    b2: float = 0.999,
    adam_eps: float = 1e-8,
    momentum: float = 0.9,
    nesterov: bool = False,
    grad_clip_norm: float | None = 1.0,
    wd: float = 0.001,
    wd_mask: Sequence[bool] | None = None,
    sharded: bool = False,
) -> list[Params]:
    """The params after each step of big_vision's GSAM trainer.

    ``schedule(step)`` is the multiplier of ``lr`` (their ``sched_fns[0]``; ``None`` is 1):
    the base step at optimizer count t uses ``schedule(t)``, rho uses ``schedule(t + 1) * lr``
    (their loop passes its 1-based ``step`` to ``gsam_gradient``). ``sharded=True``: each
    ``batches[t]`` is a sequence of per-device batches; each device decomposes with its own
    gradients and the results are averaged (their ``pmean``). ``wd_mask`` selects the decayed
    tensors (their default: the kernels); ``None`` decays all. Adam's moments run in float64
    here (their config asks ``mu_dtype='float32'``).
    """
    sched = schedule if schedule is not None else (lambda step: 1.0)
    params = [np.array(w, dtype=np.float64) for w in params0]
    mask = [True] * len(params) if wd_mask is None else list(wd_mask)
    zeros = [np.zeros_like(w) for w in params]
    state: dict[str, Any] = {"mu": zeros, "nu": zeros, "trace": zeros}
    hyper = {"b1": b1, "b2": b2, "adam_eps": adam_eps, "momentum": momentum, "nesterov": nesterov}
    out = []
    for t, batch in enumerate(batches):
        shards = list(batch) if sharded else [batch]
        per_device = [
            gsam_gradient(
                params,
                shard,
                loss_and_grad,
                lr=sched(t + 1) * lr,
                rho_max=rho_max,
                rho_min=rho_min,
                alpha=alpha,
                lr_max=lr_max,
                lr_min=lr_min,
                eps=eps,
                adaptive_perturbation=adaptive_perturbation,
                minimize_fp=minimize_fp,
            )
            for shard in shards
        ]
        grads = [sum(d[i] for d in per_device) / len(per_device) for i in range(len(params))]
        direction = _base_direction(
            _clip_global(grads, grad_clip_norm), state, t, optax_name, hyper
        )
        step_size = sched(t)
        updates = [lr * a for a in direction]
        updates = [u + wd * w if m else u for u, w, m in zip(updates, params, mask)]
        updates = [-1.0 * (step_size * u) for u in updates]
        params = [w + u for w, u in zip(params, updates)]
        out.append([w.copy() for w in params])
    return out
