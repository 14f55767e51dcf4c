"""Each method of the family against its authors' own code, re-expressed in float64 numpy.

The re-expressions live in ``tests/references/`` (one module per method; each
docstring cites the repository, the files and the commit read, and how it
was validated against the authors' PyTorch or JAX code run unchanged). Each
test runs the documented composition of ``sam_optax`` on the same problem
and batches and compares the params after every step, to 1e-10 in float64.
RST and AE-SAM have no public code from their authors; their formulas are
checked in ``tests/test_variants.py``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax

from references import esam as ref_esam
from references import fsam as ref_fsam
from references import gsam as ref_gsam
from references import looksam as ref_looksam
from references import msam as ref_msam
from references import samon as ref_samon
from references import sampa as ref_sampa
from references import torch_optim as ref_torch_optim
from references import vasso as ref_vasso
from references import wsam as ref_wsam

STEPS = 6
TOL = 1e-10  # max abs difference of the params after any step
SHAPES = [(5, 4), (5,), (3, 5), (3,)]  # torch's Linear(4, 5), Linear(5, 3): weight, bias


# --------------------------------------------------------------------------
# The problem: a 4-5-3 tanh network, cross-entropy, a new batch of 16 each step.
# --------------------------------------------------------------------------


def _per_example(params, x, y):
    w1, b1, w2, b2 = params
    logits = jnp.tanh(x @ w1.T + b1[None, :]) @ w2.T + b2[None, :]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def _params0(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=s) * (0.7 if len(s) == 2 else 0.2) for s in SHAPES]


def _batches(n=STEPS, size=16, seed=1):
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=(size, 4)), rng.integers(0, 3, size)) for _ in range(n)]


def _numpy_loss_and_grad(params, batch, index=None):
    """The oracle the references call: mean loss and its gradient (float64, via JAX)."""
    x, y = batch
    if index is not None:
        x, y = x[index], y[index]
    value, grads = jax.value_and_grad(
        lambda p: jnp.mean(_per_example(p, jnp.asarray(x), jnp.asarray(y)))
    )([jnp.asarray(w) for w in params])
    return float(value), [np.asarray(g) for g in grads]


def _numpy_per_example(params, batch):
    x, y = batch
    return np.asarray(
        _per_example([jnp.asarray(w) for w in params], jnp.asarray(x), jnp.asarray(y))
    )


def _run(tx, batches, params0, *, per_example=False, before_step=None):
    """The params after each step of ``tx`` (jitted), clean losses passed as ``value``."""

    @jax.jit
    def step(params, state, x, y):
        def per(p):
            return _per_example(p, x, y)

        (_, losses), grads = jax.value_and_grad(lambda p: (jnp.mean(per(p)), per(p)), has_aux=True)(
            params
        )
        if per_example:
            updates, state = tx.update(grads, state, params, value_fn=per, value=losses)
        else:
            mean = lambda p: jnp.mean(per(p))  # noqa: E731
            updates, state = tx.update(grads, state, params, value_fn=mean, value=jnp.mean(losses))
        return optax.apply_updates(params, updates), state

    params = [jnp.asarray(w) for w in params0]
    state = tx.init(params)
    out = []
    for t, (x, y) in enumerate(batches):
        if before_step is not None:
            before_step(t, state)
        params, state = step(params, state, jnp.asarray(x), jnp.asarray(y))
        out.append([np.asarray(w) for w in params])
    return out


def _assert_same_trajectory(got, want, tol=TOL):
    assert len(got) == len(want)
    for t, (a, b) in enumerate(zip(got, want)):
        diff = max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))
        assert diff < tol, f"step {t}: max abs difference {diff:.3g}"
    moved = max(float(np.max(np.abs(x - y))) for x, y in zip(want[-1], _params0()))
    assert moved > 1e-3  # the trajectories went somewhere


def _per_step(values):
    """A per-step list as an optax schedule of the count."""
    table = jnp.asarray(values, jnp.float64)
    return lambda count: table[count]


def _torch_base(base, lrs, wd):
    """torch.optim.SGD(momentum=0.9, weight_decay=wd) or AdamW(weight_decay=wd) as optax."""
    if base == "sgd":
        return optax.chain(optax.add_decayed_weights(wd), optax.sgd(_per_step(lrs), momentum=0.9))
    return optax.adamw(_per_step(lrs), 0.9, 0.999, 1e-8, weight_decay=wd)


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


# --------------------------------------------------------------------------
# GSAM: juntang-zhuang/GSAM and google-research/big_vision.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("adaptive, nesterov", [(False, False), (True, False), (True, True)])
def test_gsam_is_the_authors_pytorch_code(adaptive, nesterov):
    """juntang-zhuang/GSAM @ a770275 (gsam/gsam.py, example/train.py): references/gsam.py."""
    lrs = ref_fsam.cosine_lrs(STEPS, lr=0.1, total_steps=STEPS + 2)
    rho, alpha, wd = 0.3 if not adaptive else 1.0, 0.4, 5e-4
    want = ref_gsam.trajectory(
        _params0(), _batches(), _numpy_loss_and_grad,
        lr=lrs, rho=rho, alpha=alpha, momentum=0.9, weight_decay=wd,
        nesterov=nesterov, adaptive=adaptive,
    )  # fmt: skip
    tx = optax.chain(
        sam_optax.gsam(rho, alpha, adaptive=adaptive, eta=0.0),
        optax.add_decayed_weights(wd),
        optax.sgd(_per_step(lrs), momentum=0.9, nesterov=nesterov),
    )
    _assert_same_trajectory(_run(tx, _batches(), _params0()), want)


def test_gsam_is_big_visions_jax_code():
    """google-research/big_vision @ 0127fb6 (big_vision/trainers/proj/gsam/): references/gsam.py."""
    lr, rho_max, rho_min, alpha, wd = 0.05, 0.6, 0.1, 0.6, 1e-3
    lr_min = 0.01 * lr

    def schedule(step):
        return 1.0 - 0.08 * step  # a linear decay, the multiplier of lr

    want = ref_gsam.trajectory_big_vision(
        _params0(), _batches(), _numpy_loss_and_grad,
        lr=lr, schedule=schedule, rho_max=rho_max, rho_min=rho_min, alpha=alpha,
        lr_max=lr, lr_min=lr_min, grad_clip_norm=1.0, wd=wd,
    )  # fmt: skip

    def rho(count):  # their trainer ties rho to the lr one step ahead
        return rho_min + (rho_max - rho_min) * (schedule(count + 1) * lr - lr_min) / (lr - lr_min)

    tx = optax.chain(
        sam_optax.gsam(rho, alpha, eps=1e-12),
        optax.clip_by_global_norm(1.0),
        optax.scale_by_adam(),
        optax.scale(lr),
        optax.add_decayed_weights(wd),
        optax.scale_by_schedule(schedule),
        optax.scale(-1.0),
    )
    _assert_same_trajectory(_run(tx, _batches(), _params0()), want)


# --------------------------------------------------------------------------
# LookSAM (MarlonBecker/MSAM's whole-vector form) and F-SAM (nblt/F-SAM).
# --------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3])
def test_looksam_is_the_reference_code(k):
    """MarlonBecker/MSAM @ 780fa4f (optimizer/looksam.py): references/looksam.py."""
    rho, alpha, wd = 0.3, 0.2, 1e-2
    want = ref_looksam.trajectory(
        _params0(), _batches(), _numpy_loss_and_grad,
        lr=0.1, rho=rho, alpha=alpha, k=k, momentum=0.9, weight_decay=wd,
    )  # fmt: skip
    tx = optax.chain(
        sam_optax.looksam(rho, every=k, alpha=alpha),
        optax.add_decayed_weights(wd),
        optax.sgd(0.1, momentum=0.9),
    )
    _assert_same_trajectory(_run(tx, _batches(), _params0()), want)


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_fsam_is_the_authors_code(base):
    """nblt/F-SAM @ 2e2f989 (utils.py FriendlySAM, train.py): references/fsam.py."""
    lrs = ref_fsam.cosine_lrs(STEPS, lr=0.05, total_steps=STEPS + 2)
    rho, sigma, lmbda, wd = 0.2, 1.0, 0.6, 1e-3
    want = ref_fsam.trajectory(
        _params0(), _batches(), _numpy_loss_and_grad,
        lr=lrs, rho=rho, sigma=sigma, lmbda=lmbda, base=base, momentum=0.9, weight_decay=wd,
    )  # fmt: skip
    tx = optax.chain(sam_optax.fsam(rho, sigma, decay=lmbda), _torch_base(base, lrs, wd))
    _assert_same_trajectory(_run(tx, _batches(), _params0()), want)


# --------------------------------------------------------------------------
# MSAM: MarlonBecker/MSAM, SGD and AdamW, with weight decay and clipping.
# --------------------------------------------------------------------------


def clip_like_torch(max_norm: float) -> optax.GradientTransformation:
    """``torch.nn.utils.clip_grad_norm_``: scale by ``min(1, max_norm / (||g|| + 1e-6))``."""

    def update(updates, state, params=None):
        del params
        scale = jnp.minimum(1.0, max_norm / (optax.tree.norm(updates) + 1e-6))
        return optax.tree.scale(scale, updates), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def decay_after_the_step(lr: float, weight_decay: float) -> optax.GradientTransformation:
    """The authors' AdamW-MSAM decay: ``w <- (w + u) (1 - lr wd)``, i.e. ``u - lr wd (w + u)``."""

    def update(updates, state, params):
        return jax.tree.map(lambda u, w: u - lr * weight_decay * (w + u), updates, params), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


@pytest.mark.parametrize("wd, max_norm", [(0.0, None), (5e-3, None), (5e-3, 0.3)])
def test_msam_is_the_authors_sgd_msam(wd, max_norm):
    """MarlonBecker/MSAM @ 780fa4f (optimizer/msam.py, main.py): references/msam.py."""
    rho, lr = 3.0, 0.1
    want = ref_msam.trajectory_sgd(
        _params0(), _batches(), _numpy_loss_and_grad,
        lr=lr, rho=rho, momentum=0.9, weight_decay=wd, max_norm=max_norm,
    )  # fmt: skip
    inner = optax.chain(
        clip_like_torch(max_norm) if max_norm else optax.identity(),
        optax.add_decayed_weights(wd),
        optax.sgd(lr, momentum=0.9),
    )
    tx = sam_optax.msam(inner, rho, sees="perturbed")
    _assert_same_trajectory(_run(tx, _batches(), _params0()), want)


@pytest.mark.parametrize("wd, max_norm", [(0.0, None), (0.1, None), (0.1, 0.3)])
def test_msam_is_the_authors_adamw_msam(wd, max_norm):
    """MarlonBecker/MSAM @ 780fa4f (optimizer/adamW_msam.py, main.py): references/msam.py."""
    rho, lr = 1.0, 0.05
    want = ref_msam.trajectory_adamw(
        _params0(), _batches(), _numpy_loss_and_grad,
        lr=lr, rho=rho, weight_decay=wd, max_norm=max_norm,
    )  # fmt: skip
    inner = optax.chain(
        clip_like_torch(max_norm) if max_norm else optax.identity(),
        optax.scale_by_adam(0.9, 0.999, 1e-8),
        optax.scale(-lr),
        decay_after_the_step(lr, wd),
    )
    tx = sam_optax.msam(inner, rho)
    _assert_same_trajectory(_run(tx, _batches(), _params0()), want)


# --------------------------------------------------------------------------
# ESAM (dydjw9/Efficient_SAM) and VaSSO (BingcongLi/VaSSO).
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "beta, gamma, adaptive", [(1.0, 1.0, False), (0.5, 0.5, False), (0.6, 0.25, True)]
)
def test_esam_is_the_authors_code(beta, gamma, adaptive):
    """dydjw9/Efficient_SAM @ 1e06840 (utils/Esam.py, train.py): references/esam.py."""
    rho, wd, lr = 0.1, 1e-3, 0.05
    masks = []

    def record_subsets(t, state):
        # The weight subsets the JAX code draws this step, for the reference.
        if beta == 1.0:
            masks.append([True] * len(SHAPES))
            return
        sam_state = state[0]
        key = jax.random.wrap_key_data(sam_state.key)
        draw = jax.random.bernoulli(jax.random.fold_in(key, 2), beta, (len(SHAPES),))
        masks.append([bool(d) or t == 0 for d in np.asarray(draw)])

    tx = optax.chain(
        sam_optax.esam(rho, beta, gamma, eps=1e-7, adaptive=adaptive, eta=0.0, seed=5),
        optax.add_decayed_weights(wd),
        optax.sgd(lr, momentum=0.9),
    )
    got = _run(tx, _batches(), _params0(), per_example=True, before_step=record_subsets)
    want = ref_esam.trajectory(
        _params0(), _batches(), _numpy_loss_and_grad, _numpy_per_example,
        masks=masks, lr=lr, rho=rho, beta=beta, gamma=gamma, adaptive=adaptive,
        momentum=0.9, weight_decay=wd,
    )  # fmt: skip
    _assert_same_trajectory(got, want)
    if beta < 1:
        assert not all(all(m) for m in masks[1:]), masks  # some subsets were drawn


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_vasso_is_the_authors_code(base):
    """BingcongLi/VaSSO @ 3524bad (solver/vasso.py, utils/engine.py): references/vasso.py."""
    rho, theta, wd = 0.2, 0.4, 1e-3
    lrs = ref_fsam.cosine_lrs(STEPS, lr=0.1, total_steps=STEPS + 2)
    want = ref_vasso.trajectory(
        _params0(), _batches(), _numpy_loss_and_grad,
        lr=lrs, rho=rho, theta=theta, base=base, momentum=0.9, weight_decay=wd,
    )  # fmt: skip
    tx = optax.chain(sam_optax.vasso(rho, theta, eps=1e-7), _torch_base(base, lrs, wd))
    _assert_same_trajectory(_run(tx, _batches(), _params0()), want)


# --------------------------------------------------------------------------
# WSAM (intelligent-machine-learning/dlrover atorch) and SAM-ON (mueller-mp/SAM-ON).
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "decouple, adaptive, base",
    [(True, False, "sgd"), (False, False, "sgd"), (True, True, "sgd"), (True, False, "adamw")],
)
def test_wsam_is_the_authors_code(decouple, adaptive, base):
    """intelligent-machine-learning/dlrover @ 4584843 (atorch/atorch/optimizers/wsam.py)."""
    rho, gamma, wd = 0.2, 0.9, 5e-4
    lrs = ref_fsam.cosine_lrs(STEPS, lr=0.05, total_steps=STEPS + 2)
    want = ref_wsam.trajectory(
        _params0(), _batches(), _numpy_loss_and_grad,
        lr=lrs, rho=rho, gamma=gamma, adaptive=adaptive, decouple=decouple,
        base=base, momentum=0.9, weight_decay=wd,
    )  # fmt: skip
    tx = sam_optax.wsam(
        _torch_base(base, lrs, wd), rho, gamma, learning_rate=_per_step(lrs) if decouple else None,
        adaptive=adaptive, eta=0.0,
    )  # fmt: skip
    _assert_same_trajectory(_run(tx, _batches(), _params0()), want)


@pytest.mark.parametrize("minimizer", ["SAM_ON", "ASAM_ON"])
def test_sam_on_is_the_authors_code(minimizer):
    """mueller-mp/SAM-ON @ 8b8869a (sam_on.py SAM_ON, ASAM_ON): references/samon.py."""
    # The second layer stands in for a normalization layer: SAM-ON perturbs the
    # tensors its mask selects (both weight and bias) and nothing else.
    mask = [False, False, True, True]
    rho, eta, wd = (0.5, 0.0, 5e-4) if minimizer == "SAM_ON" else (2.0, 0.01, 5e-4)
    want = ref_samon.trajectory(
        _params0(), _batches(), _numpy_loss_and_grad, mask,
        minimizer=minimizer, lr=0.1, rho=rho, eta=eta, elementwise=True, normalize_bias=True,
        momentum=0.9, weight_decay=wd,
    )  # fmt: skip
    adaptive = minimizer == "ASAM_ON"
    tx = optax.chain(
        sam_optax.sam(rho, mask=mask, adaptive=adaptive, eta=eta, eps=1e-16),
        optax.add_decayed_weights(wd),
        optax.sgd(0.1, momentum=0.9),
    )
    _assert_same_trajectory(_run(tx, _batches(), _params0()), want)


# --------------------------------------------------------------------------
# SAMPa: LIONS-EPFL/SAMPa.
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "momentum, wd, rho, lam",
    [(0.9, 5e-4, 0.1, 0.2), (0.0, 0.0, 0.1, 0.2), (0.9, 5e-4, 0.3, 0.4), (0.9, 0.0, 0.2, 0.5)],
    ids=["defaults", "plain-sgd", "other-rho-lam", "momentum-only"],
)
def test_sampa_is_the_authors_code(momentum, wd, rho, lam):
    """LIONS-EPFL/SAMPa @ 01093ef (train.py run, utility.py): references/sampa.py.

    Rank 0's gradient on the previous batch (``previous_value_fn``), rank 1's on the
    current one; torch SGD with momentum and decay; the per-epoch cosine learning rate.
    """
    lrs = ref_sampa.epoch_lrs(0.1, epochs=2, steps_per_epoch=STEPS // 2)
    batches = _batches()
    want = ref_sampa.trajectory(
        _params0(), batches, _numpy_loss_and_grad,
        lr=lrs, rho=rho, lam=lam, momentum=momentum, weight_decay=wd,
    )  # fmt: skip
    base = optax.chain(optax.add_decayed_weights(wd), optax.sgd(_per_step(lrs), momentum=momentum))
    tx = sam_optax.sampa(base, rho, lam)

    @jax.jit
    def step(params, state, now, before):
        def loss(batch):
            return lambda p: jnp.mean(_per_example(p, *batch))

        grads = jax.grad(loss(now))(params)  # not read by sampa: XLA drops it
        updates, state = tx.update(
            grads, state, params, value_fn=loss(now), previous_value_fn=loss(before)
        )
        return optax.apply_updates(params, updates), state

    params = [jnp.asarray(w) for w in _params0()]
    state, got = tx.init(params), []
    as_jax = [tuple(jnp.asarray(a) for a in b) for b in batches]
    for t, now in enumerate(as_jax):
        params, state = step(params, state, now, as_jax[max(t - 1, 0)])
        got.append([np.asarray(w) for w in params])
    _assert_same_trajectory(got, want)


def test_the_references_are_not_the_library():
    # The re-expressions import numpy only: a bug in sam_optax cannot hide in both.
    import inspect

    import references

    for module in (
        ref_esam,
        ref_fsam,
        ref_gsam,
        ref_looksam,
        ref_msam,
        ref_samon,
        ref_sampa,
        ref_torch_optim,
        ref_vasso,
        ref_wsam,
    ):
        source = inspect.getsource(module)
        assert "sam_optax" not in source and "import jax" not in source, module.__name__
    assert math.isfinite(len(references.__doc__ or "x"))
