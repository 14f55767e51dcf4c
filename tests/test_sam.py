"""``sam_optax.sam``: maths against independent formulas, guarantees, errors."""

import itertools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax

from helpers import QuarticProblem
from helpers import assert_trees_close
from helpers import assert_trees_equal
from helpers import flat
from helpers import np_eps_p
from helpers import unflat

# --------------------------------------------------------------------------
# One step of chain(sam, sgd) against numpy (float64).
# --------------------------------------------------------------------------


def _one_step(problem, lr=0.1, **sam_kwargs):
    tx = optax.chain(sam_optax.sam(**sam_kwargs), optax.sgd(lr))
    params = problem.params
    state = tx.init(params)
    grads = jax.grad(problem.loss)(params)
    updates, _ = tx.update(grads, state, params, value_fn=problem.loss)
    return flat(optax.apply_updates(params, updates))


@pytest.mark.parametrize("p", [2.0, 3.0, math.inf])
def test_one_step_matches_numpy_p_norm(p):
    with jax.enable_x64(True):
        prob = QuarticProblem(0)
        w = flat(prob.params)
        pert = np_eps_p(prob.np_grad(w), 0.05, p)
        expected = w - 0.1 * prob.np_grad(w + pert)
        np.testing.assert_allclose(_one_step(prob, rho=0.05, norm=p, eps=0.0), expected, rtol=1e-12)


def test_one_step_matches_numpy_adaptive():
    with jax.enable_x64(True):
        prob = QuarticProblem(1)
        w = flat(prob.params)
        g = prob.np_grad(w)
        t = np.abs(w) + 0.1
        pert = 0.5 * t**2 * g / np.linalg.norm(t * g)
        expected = w - 0.1 * prob.np_grad(w + pert)
        got = _one_step(prob, rho=0.5, adaptive=True, eta=0.1, eps=0.0)
        np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_one_step_matches_numpy_mask():
    with jax.enable_x64(True):
        prob = QuarticProblem(2)
        w = flat(prob.params)
        g = prob.np_grad(w)
        sel = np.zeros_like(w, bool)
        sel[3:] = True  # flat order is (bias[3], w[6]): perturb only "w"
        pert = np.where(sel, 0.2 * g / np.linalg.norm(g[sel]), 0.0)
        expected = w - 0.1 * prob.np_grad(w + pert)
        got = _one_step(prob, rho=0.2, mask={"bias": False, "w": True}, eps=0.0)
        np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_second_order_matches_closed_form():
    # d/dw L(w + ε(w)) = g(w+ε) + (dε/dw)^T g(w+ε),
    # dε/dw = rho (I/|g| - g g^T/|g|^3) H(w) for p = 2.
    with jax.enable_x64(True):
        prob = QuarticProblem(3)
        w = flat(prob.params)
        g = prob.np_grad(w)
        n = np.linalg.norm(g)
        pert = 0.3 * g / n
        v = prob.np_grad(w + pert)
        jac = 0.3 * (np.eye(w.size) / n - np.outer(g, g) / n**3) @ prob.np_hess(w)
        expected = w - 0.1 * (v + jac.T @ v)
        got = _one_step(prob, rho=0.3, second_order=True, eps=0.0)
        np.testing.assert_allclose(got, expected, rtol=1e-10)


@pytest.mark.parametrize(
    "kwargs", [dict(norm=3.0), dict(adaptive=True, eta=0.05), dict(mask={"bias": False, "w": True})]
)
def test_second_order_matches_finite_differences(kwargs):
    # The exact gradient of w -> L(w + perturbation(w)), by central differences of
    # the composite written with numpy (independent of the library).
    with jax.enable_x64(True):
        prob = QuarticProblem(4)
        w0 = flat(prob.params)

        def np_perturbation(w):
            g = prob.np_grad(w)
            if kwargs.get("adaptive"):
                t = np.abs(w) + kwargs["eta"]
                return 0.2 * t**2 * g / np.linalg.norm(t * g)
            if "mask" in kwargs:
                sel = np.arange(w.size) >= 3
                return np.where(sel, 0.2 * g / np.linalg.norm(g[sel]), 0.0)
            return np_eps_p(g, 0.2, kwargs["norm"])

        def composite(w):
            return prob.np_loss(w + np_perturbation(w))

        h = 1e-6
        fd = np.array(
            [(composite(w0 + h * e) - composite(w0 - h * e)) / (2 * h) for e in np.eye(w0.size)]
        )
        got = _one_step(prob, lr=1.0, rho=0.2, second_order=True, eps=0.0, **kwargs)
        np.testing.assert_allclose(w0 - got, fd, rtol=1e-6, atol=1e-8)


def _np_project(x, rho, p):
    if np.isinf(p):
        return np.clip(x, -rho, rho)
    n = np.linalg.norm(x, ord=p)
    return x * min(1.0, rho / n)


@pytest.mark.parametrize("p", [2.0, math.inf])
def test_ascent_steps_match_projected_gradient_ascent(p):
    with jax.enable_x64(True):
        prob = QuarticProblem(5)
        w = flat(prob.params)
        rho = 0.4
        delta = np_eps_p(prob.np_grad(w), rho, p)
        for _ in range(2):  # steps 2 and 3
            delta = _np_project(delta + np_eps_p(prob.np_grad(w + delta), rho, p), rho, p)
        expected = w - 0.1 * prob.np_grad(w + delta)
        got = _one_step(prob, rho=rho, norm=p, ascent_steps=3, eps=0.0)
        np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_ascent_steps_increase_the_loss_on_a_convex_quadratic():
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        m = rng.normal(size=(8, 8))
        a = jnp.asarray(m @ m.T + 0.1 * np.eye(8))
        loss = lambda w: 0.5 * w @ a @ w + jnp.sum(w)  # noqa: E731
        w = jnp.asarray(rng.normal(size=8))
        g = jax.grad(loss)(w)
        values = []
        for k in (1, 2, 3, 5, 8):
            # The SAM gradient is grad L(w + pert_k); recover pert_k = A^-1 (g_sam - g).
            out, _ = sam_optax.sam(0.5, ascent_steps=k).update(
                g, sam_optax.sam(0.5).init(w), w, value_fn=loss
            )
            pert_k = jnp.linalg.solve(a, out - g)
            assert float(jnp.linalg.norm(pert_k)) <= 0.5 * (1 + 1e-9)
            values.append(float(loss(w + pert_k)))
        assert all(b >= a_ - 1e-12 for a_, b in itertools.pairwise(values)), values
        assert values[-1] > values[0]


# --------------------------------------------------------------------------
# rho = 0 is exactly the base optimizer.
# --------------------------------------------------------------------------


def _mlp_problem(seed=0, dtype=jnp.float32):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    params = {
        "w1": jax.random.normal(k1, (5, 16), dtype) * 0.5,
        "b1": jnp.zeros(16, dtype),
        "w2": jax.random.normal(k2, (16, 3), dtype) * 0.5,
    }
    x = jax.random.normal(k3, (32, 5), dtype)
    y = jnp.arange(32) % 3

    def loss(p):
        h = jnp.tanh(x @ p["w1"] + p["b1"][None, :])
        logits = (h @ p["w2"]).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return params, loss


def _run(tx, params, loss, steps=5, with_value_fn=True):
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        grads = jax.grad(loss)(params)
        kw = {"value_fn": loss} if with_value_fn else {}
        updates, state = tx.update(grads, state, params, **kw)
        return optax.apply_updates(params, updates), state

    for _ in range(steps):
        params, state = step(params, state)
    return params


@pytest.mark.parametrize(
    "make_sam",
    [
        lambda: sam_optax.sam(rho=0.0),
        lambda: sam_optax.sam(rho=optax.constant_schedule(0.0)),
        lambda: optax.inject_hyperparams(sam_optax.sam)(rho=0.0),
        lambda: sam_optax.sam(rho=0.0, adaptive=True, ascent_steps=2),
    ],
    ids=["static", "schedule", "inject", "adaptive-k2"],
)
def test_rho_zero_is_bit_for_bit_the_base_optimizer(make_sam):
    params, loss = _mlp_problem()
    base = lambda: optax.sgd(0.1, momentum=0.9)  # noqa: E731
    with_sam = _run(optax.chain(make_sam(), base()), params, loss)
    without = _run(base(), params, loss, with_value_fn=False)
    assert_trees_equal(with_sam, without)
    # ... and a positive rho does change the trajectory.
    moved = _run(optax.chain(sam_optax.sam(0.05), base()), params, loss)
    assert not np.allclose(flat(moved), flat(without))


def test_rho_schedule_is_indexed_by_sams_own_count():
    sched = lambda count: jnp.where(count >= 1, 0.2, 0.0)  # noqa: E731
    tx = sam_optax.sam(sched)
    with jax.enable_x64(True):
        prob = QuarticProblem(6)
        state = tx.init(prob.params)
        g = jax.grad(prob.loss)(prob.params)
        out0, state = tx.update(g, state, prob.params, value_fn=prob.loss)
        out1, state = tx.update(g, state, prob.params, value_fn=prob.loss)
        assert_trees_close(out0, g)
        w = flat(prob.params)
        expected = prob.np_grad(w + np_eps_p(prob.np_grad(w), 0.2, 2.0))
        np.testing.assert_allclose(flat(out1), expected, rtol=1e-6)
        assert int(state.count) == 2


# --------------------------------------------------------------------------
# Zero gradients, state size, inject_hyperparams, tracing, dtypes.
# --------------------------------------------------------------------------

VARIANTS = {
    "p2": {},
    "p3": {"norm": 3.0},
    "inf": {"norm": math.inf},
    "adaptive": {"adaptive": True},
    "steps3": {"ascent_steps": 3},
    "second-order": {"second_order": True},
    "second-order-p3": {"second_order": True, "norm": 3.0},
    "second-order-adaptive": {"second_order": True, "adaptive": True},
    "random": {"direction": "random"},
    "mask": {"mask": {"bias": False, "w": True}},
}


@pytest.mark.parametrize("kwargs", VARIANTS.values(), ids=VARIANTS.keys())
def test_zero_gradient_gives_finite_updates(kwargs):
    # A loss that is flat at w: both gradients are zero, nothing may be NaN.
    params = {"bias": jnp.zeros(3), "w": jnp.zeros((2, 3))}
    loss = lambda p: jnp.sum(p["w"] ** 4) + jnp.sum(p["bias"] ** 4)  # noqa: E731
    tx = sam_optax.sam(0.05, **kwargs)
    out, _ = jax.jit(lambda g, s, p: tx.update(g, s, p, value_fn=loss))(
        jax.grad(loss)(params), tx.init(params), params
    )
    chex.assert_tree_all_finite(out)


def _nbytes(tree):
    return sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("kwargs", VARIANTS.values(), ids=VARIANTS.keys())
def test_state_holds_no_copy_of_params(kwargs):
    params = {"w": jnp.zeros((256, 256)), "b": jnp.zeros(256)}
    base = optax.sgd(0.1, momentum=0.9)
    sam_state, base_state = optax.chain(sam_optax.sam(**kwargs), base).init(params)
    assert _nbytes(base_state) == _nbytes(base.init(params))
    # An int32 count (+ a uint32[2] key) and the diagnostics: four float32 and a bool.
    assert _nbytes(sam_state) <= 4 + 8 + 4 * 4 + 1
    for leaf in jax.tree.leaves(sam_state):
        assert np.size(leaf) <= 2


def test_inject_hyperparams_rho_under_jit():
    with jax.enable_x64(True):
        prob = QuarticProblem(7)
        tx = optax.inject_hyperparams(sam_optax.sam)(rho=0.1)
        g = jax.grad(prob.loss)(prob.params)
        update = jax.jit(lambda g, s, p: tx.update(g, s, p, value_fn=prob.loss))
        state = tx.init(prob.params)
        out_a, state = update(g, state, prob.params)
        state.hyperparams["rho"] = jnp.asarray(0.3)
        out_b, _ = update(g, state, prob.params)
        w = flat(prob.params)
        for out, rho in ((out_a, 0.1), (out_b, 0.3)):
            expected = prob.np_grad(w + np_eps_p(prob.np_grad(w), rho, 2.0))
            np.testing.assert_allclose(flat(out), expected, rtol=1e-9)


def test_inject_hyperparams_keeps_the_options_static():
    # Only rho is injected; norm=3.0 and ascent_steps=2 stay Python numbers (one
    # compiled path, no traced p), and a callable mask is not mistaken for a schedule.
    with jax.enable_x64(True):
        prob = QuarticProblem(8)
        tx = optax.inject_hyperparams(sam_optax.sam)(
            rho=0.2, norm=3.0, ascent_steps=2, mask=lambda p: jax.tree.map(lambda _: True, p)
        )
        assert set(tx.init(prob.params).hyperparams) == {"rho"}
        g = jax.grad(prob.loss)(prob.params)
        out, _ = jax.jit(lambda g, s, p: tx.update(g, s, p, value_fn=prob.loss))(
            g, tx.init(prob.params), prob.params
        )
        ref, _ = sam_optax.sam(0.2, norm=3.0, ascent_steps=2).update(
            g, sam_optax.sam(0.2).init(prob.params), prob.params, value_fn=prob.loss
        )
        assert_trees_close(out, ref, rtol=1e-9)


def test_jitted_step_traces_once():
    params, loss = _mlp_problem()
    tx = optax.chain(sam_optax.sam(0.05), optax.sgd(0.1, momentum=0.9))
    traces = []

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, state):
        traces.append(1)
        grads = jax.grad(loss)(params)
        updates, state = tx.update(grads, state, params, value_fn=loss)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    params, state = step(params, state)
    params, state = step(params, state)
    params, state = step(params, state)
    assert len(traces) == 1
    assert step._cache_size() == 1


def test_bfloat16_params_keep_dtype_and_stay_finite():
    params, loss = _mlp_problem(dtype=jnp.bfloat16)
    tx = optax.chain(sam_optax.sam(0.05, adaptive=True), optax.sgd(0.1))
    grads = jax.grad(loss)(params)
    updates, _ = jax.jit(lambda g, s, p: tx.update(g, s, p, value_fn=loss))(
        grads, tx.init(params), params
    )
    for u, w in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
        assert u.dtype == jnp.bfloat16 == w.dtype
        assert np.all(np.isfinite(np.asarray(u, np.float32)))
    # Compare with the same computation in float32: bf16 rounding only.
    p32 = jax.tree.map(lambda x: x.astype(jnp.float32), params)
    g32 = jax.grad(loss)(p32)
    ref, _ = tx.update(g32, tx.init(p32), p32, value_fn=loss)
    assert_trees_close(updates, ref, rtol=0.1, atol=2e-2)


# --------------------------------------------------------------------------
# Complex params (optax's convention: the caller conjugates jax.grad).
# --------------------------------------------------------------------------

_C = np.array([1.0, 3.0, 0.5, 2.0])
_A = np.array([1 + 2j, -0.5 + 0.3j, 2 - 1j, 0.2j])


def _complex_loss(z):
    return jnp.sum(jnp.asarray(_C) * jnp.abs(z - jnp.asarray(_A)) ** 2) + 0.25 * jnp.sum(
        jnp.abs(z) ** 4
    )


def _np_real_grad(v):
    """The same loss on R^2n (x then y): the gradient written out in numpy."""
    n = len(_C)
    x, y = v[:n], v[n:]
    r2 = x**2 + y**2
    return np.concatenate([2 * _C * (x - _A.real) + r2 * x, 2 * _C * (y - _A.imag) + r2 * y])


def _run_complex(tx, z, steps):
    state = tx.init(z)

    @jax.jit
    def step(z, state):
        g = optax.tree.conj(jax.grad(_complex_loss)(z))
        u, state = tx.update(g, state, z, value_fn=_complex_loss)
        return optax.apply_updates(z, u), state

    for _ in range(steps):
        z, state = step(z, state)
    return np.asarray(z)


@pytest.mark.parametrize("ascent_steps", [1, 3])
def test_complex_sam_is_sam_on_the_real_and_imaginary_parts(ascent_steps):
    # A complex leaf is a pair of real ones: SAM on C^n must be SAM on R^2n,
    # step for step, and it converges (it used to diverge).
    with jax.enable_x64(True):
        rho, lr, n = 0.1, 0.05, len(_C)
        tx = optax.chain(sam_optax.sam(rho, ascent_steps=ascent_steps, eps=0.0), optax.sgd(lr))
        got = _run_complex(tx, jnp.zeros(n, jnp.complex128), 200)
        v = np.zeros(2 * n)
        for _ in range(200):
            delta = np_eps_p(_np_real_grad(v), rho, 2.0)
            for _ in range(ascent_steps - 1):
                moved = delta + np_eps_p(_np_real_grad(v + delta), rho, 2.0)
                delta = moved * min(1.0, rho / np.linalg.norm(moved))
            v = v - lr * _np_real_grad(v + delta)
        np.testing.assert_allclose(got, v[:n] + 1j * v[n:], rtol=1e-10, atol=1e-12)
        # ... and it converged: near the minimum found by gradient descent on R^2n.
        w = np.zeros(2 * n)
        for _ in range(2000):
            w = w - lr * _np_real_grad(w)
        best = float(_complex_loss(jnp.asarray(w[:n] + 1j * w[n:])))
        assert float(_complex_loss(jnp.asarray(got))) < best + 0.05


@pytest.mark.parametrize("kwargs", [dict(norm=3.0), dict(norm=math.inf), dict(adaptive=True)])
def test_complex_p_norms_and_asam_use_magnitudes(kwargs):
    # eq. (2) on magnitudes with the phase for the sign:
    # eps_j = rho phase(u_j) |u_j|^(q-1) / ||u||_q^(q-1); ASAM: rho T^2 u / ||T u||.
    with jax.enable_x64(True):
        rho = 0.2
        z = jnp.asarray(np.array([0.3 - 0.1j, 1.0 + 1.0j, -0.4j, 0.5]))
        u = np.asarray(optax.tree.conj(jax.grad(_complex_loss)(z)))
        zn = np.asarray(z)
        if kwargs.get("adaptive"):
            t = np.abs(zn) + 0.01
            pert = rho * t**2 * u / np.sqrt(np.sum(np.abs(t * u) ** 2))
        elif np.isinf(kwargs["norm"]):
            pert = rho * u / np.abs(u)
        else:
            q = 1.5
            pert = rho * (u / np.abs(u)) * np.abs(u) ** (q - 1) / np.sum(np.abs(u) ** q) ** (1 / 3)
        tx = sam_optax.sam(rho, eps=0.0, **kwargs)
        out, _ = tx.update(jnp.asarray(u), tx.init(z), z, value_fn=_complex_loss)
        expected = np.conj(np.asarray(jax.grad(_complex_loss)(jnp.asarray(zn + pert))))
        np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-12)


def test_complex_second_order_is_refused_naming_the_leaf():
    z = {"a": jnp.ones(2), "b": jnp.ones(3, jnp.complex64)}
    loss = lambda p: jnp.sum(p["a"] ** 2) + jnp.sum(jnp.abs(p["b"]) ** 2)  # noqa: E731
    tx = sam_optax.sam(0.1, second_order=True)
    with pytest.raises(TypeError, match=r"leaf 1 has dtype complex64"):
        tx.update(optax.tree.conj(jax.grad(loss)(z)), tx.init(z), z, value_fn=loss)


# --------------------------------------------------------------------------
# Composition with optax.
# --------------------------------------------------------------------------


def test_clip_before_and_adamw_after():
    with jax.enable_x64(True):
        prob = QuarticProblem(9)
        g = jax.grad(prob.loss)(prob.params)
        tx = optax.chain(
            optax.clip_by_global_norm(0.1), sam_optax.sam(0.1), optax.adamw(1e-2, weight_decay=1e-3)
        )
        out, _ = tx.update(g, tx.init(prob.params), prob.params, value_fn=prob.loss)
        # By hand: the clipped gradient gives the same direction (scale-free),
        # adamw sees the SAM gradient.
        w = flat(prob.params)
        sam_grad = unflat(prob.np_grad(w + np_eps_p(prob.np_grad(w), 0.1, 2.0)), prob.params)
        adamw = optax.adamw(1e-2, weight_decay=1e-3)
        ref, _ = adamw.update(sam_grad, adamw.init(prob.params), prob.params)
        assert_trees_close(out, ref, rtol=1e-9)


def test_named_chain_and_apply_if_finite():
    params, loss = _mlp_problem()
    ref = _run(optax.chain(sam_optax.sam(0.05), optax.sgd(0.1)), params, loss, steps=3)
    named = optax.named_chain(("sam", sam_optax.sam(0.05)), ("sgd", optax.sgd(0.1)))
    assert_trees_close(_run(named, params, loss, steps=3), ref, rtol=1e-6)
    guarded = optax.apply_if_finite(optax.chain(sam_optax.sam(0.05), optax.sgd(0.1)), 3)
    assert_trees_close(_run(guarded, params, loss, steps=3), ref, rtol=1e-6)


def test_accumulating_sam_gradients_over_micro_batches():
    # The recommended composition: SAM outside, MultiSteps around the base
    # optimizer. Each micro-batch is perturbed with its own gradient and the
    # base optimizer sees the mean of the micro-batch SAM gradients.
    with jax.enable_x64(True):
        probs = [QuarticProblem(10 + i) for i in range(2)]
        params = probs[0].params
        tx = optax.chain(
            sam_optax.sam(0.1), optax.MultiSteps(optax.sgd(1.0), 2).gradient_transformation()
        )
        state = tx.init(params)
        w = flat(params)
        total = 0.0
        for prob in probs:
            g = jax.grad(prob.loss)(params)
            updates, state = tx.update(g, state, params, value_fn=prob.loss)
            total = total + prob.np_grad(w + np_eps_p(prob.np_grad(w), 0.1, 2.0))
        # MultiSteps accumulates in float32 whatever the gradient dtype.
        np.testing.assert_allclose(flat(updates), -total / 2, rtol=1e-5)


def test_multisteps_around_sam_uses_the_last_micro_batch_only():
    # The pitfall the README warns about: MultiSteps(chain(sam, ...)) hands SAM
    # the running mean gradient and the closure of the last micro-batch, so the
    # emitted update is grad L_last(w + eps(mean g)), not a mean of SAM steps.
    with jax.enable_x64(True):
        probs = [QuarticProblem(10 + i) for i in range(2)]
        params = probs[0].params
        tx = optax.MultiSteps(optax.chain(sam_optax.sam(0.1), optax.sgd(1.0)), every_k_schedule=2)
        state = tx.init(params)
        for prob in probs:
            g = jax.grad(prob.loss)(params)
            updates, state = tx.update(g, state, params, value_fn=prob.loss)
        w = flat(params)
        g_mean = (probs[0].np_grad(w) + probs[1].np_grad(w)) / 2
        np.testing.assert_allclose(
            flat(updates), -probs[1].np_grad(w + np_eps_p(g_mean, 0.1, 2.0)), rtol=1e-9
        )


# --------------------------------------------------------------------------
# Behaviour: flat vs sharp minimum.
# --------------------------------------------------------------------------


def _two_minima(w):
    # A valley along x with two minima at the same height, (-1, 0) and (2, 0);
    # across the valley (y) the curvature is 88 at the first and 2.8 at the
    # second: a sharp and a flat minimum, with a low barrier between them.
    x, y = w[0], w[1]
    valley = 0.02 * (x + 1.0) ** 2 * (x - 2.0) ** 2
    curvature = 1.0 + 99.0 * jax.nn.sigmoid(-2.0 * x)
    return valley + 0.5 * curvature * y**2


def _descend(tx, w0, steps):
    state = tx.init(w0)

    @jax.jit
    def step(w, state):
        g = jax.grad(_two_minima)(w)
        u, state = tx.update(g, state, w, value_fn=_two_minima)
        return optax.apply_updates(w, u), state

    w = w0
    for _ in range(steps):
        w, state = step(w, state)
    return w


def test_sam_ends_in_the_flat_minimum_sgd_in_the_sharp_one():
    w0 = jnp.array([-0.9, 1.0])  # in the basin of the sharp minimum
    w_sgd = _descend(optax.sgd(1e-2), w0, steps=3000)
    w_sam = _descend(optax.chain(sam_optax.sam(0.2), optax.sgd(1e-2)), w0, steps=3000)
    np.testing.assert_allclose(np.asarray(w_sgd), [-1.0, 0.0], atol=1e-2)
    np.testing.assert_allclose(np.asarray(w_sam), [2.0, 0.0], atol=1e-2)
    lam = lambda w: float(jnp.linalg.eigvalsh(jax.hessian(_two_minima)(w))[-1])  # noqa: E731
    assert lam(w_sgd) > 20 * lam(w_sam)


# --------------------------------------------------------------------------
# Groups and mapped axes (the core side; parallel.py has the step builders).
# --------------------------------------------------------------------------


@pytest.mark.parametrize("options", [{}, {"adaptive": True}], ids=["own", "asam"])
def test_grouped_objective_is_the_mean_of_per_group_sam_gradients(options):
    # Each group perturbs with its own gradient; the clean losses and aux come
    # back through on_clean, once per group.
    with jax.enable_x64(True):
        probs = [QuarticProblem(20 + i) for i in range(3)]
        params = probs[0].params
        seen = {}
        obj = sam_optax.GroupedObjective(
            value_fn=lambda i, p: (probs[i].loss(p), {"group": i}),
            n_groups=3,
            on_clean=lambda i, loss, aux: seen.setdefault(i, (float(loss), aux["group"])),
        )
        tx = sam_optax.sam(0.15, eps=0.0, **options)
        zeros = jax.tree.map(jnp.zeros_like, params)
        out, state = tx.update(zeros, tx.init(params), params, grouped_objective=obj)
        w = flat(params)
        grads = [pr.np_grad(w) for pr in probs]
        scale = (np.abs(w) + 0.01) if options.get("adaptive") else 1.0

        def eps(g):
            return scale * np_eps_p(scale * g, 0.15, 2.0)

        expected = np.mean([pr.np_grad(w + eps(g)) for pr, g in zip(probs, grads)], axis=0)
        np.testing.assert_allclose(flat(out), expected, rtol=1e-12)
        assert seen == {i: (pytest.approx(probs[i].np_loss(w)), i) for i in range(3)}
        # grad_norm is the mean of the groups' own gradient norms.
        np.testing.assert_allclose(
            float(state.diagnostics.grad_norm),
            np.mean([np.linalg.norm(g) for g in grads]),
            rtol=1e-6,
        )


def test_vmap_axis_averages_per_member_sam_gradients():
    with jax.enable_x64(True):
        prob = QuarticProblem(30)
        shifts = jnp.asarray(np.random.default_rng(0).normal(size=(4, 9)))

        def member_loss(p, s):
            return prob.loss(p) + jnp.dot(s, jnp.concatenate([p["bias"], p["w"].ravel()]))

        tx = sam_optax.sam(0.1, axis_name="g")

        def per_member(s):
            f = lambda p: member_loss(p, s)  # noqa: E731
            out, _ = tx.update(
                jax.grad(f)(prob.params), tx.init(prob.params), prob.params, value_fn=f
            )
            return out

        out = jax.vmap(per_member, axis_name="g")(shifts)
        w = flat(prob.params)
        expected = np.mean(
            [
                prob.np_grad(w + e) + s
                for s in np.asarray(shifts)
                for e in [np_eps_p(prob.np_grad(w) + s, 0.1, 2.0)]
            ],
            axis=0,
        )
        for member in range(4):  # every member holds the average
            got = flat(jax.tree.map(lambda x, m=member: x[m], out))
            np.testing.assert_allclose(got, expected, rtol=1e-10)


# --------------------------------------------------------------------------
# Errors.
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rho=-0.1), "rho must be >= 0"),
        (dict(norm=1), "norm must be a number > 1"),
        (dict(norm=0.5), "norm must be a number > 1"),
        (dict(ascent_steps=0), "ascent_steps must be an integer >= 1"),
        (dict(ascent_steps=1.5), "ascent_steps must be an integer >= 1"),
        (dict(eta=-1.0), "eta must be >= 0"),
        (dict(direction="sideways"), "direction must be one of"),
        (dict(second_order=True, ascent_steps=2), "second_order=True supports ascent_steps=1"),
        (dict(sync_perturbation=True), "sync_perturbation=True needs axis_name"),
    ],
)
def test_bad_construction_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sam_optax.sam(**kwargs)


def test_missing_value_fn_names_it():
    params = jnp.ones(3)
    tx = optax.chain(sam_optax.sam(), optax.sgd(0.1))
    with pytest.raises(TypeError, match="value_fn"):
        tx.update(params, tx.init(params), params)


def test_non_scalar_value_fn_says_scalar_expected_with_shape():
    params = jnp.ones(3)
    tx = sam_optax.sam()
    with pytest.raises(TypeError, match=r"scalar loss, got an array of shape \(3,\)"):
        tx.update(params, tx.init(params), params, value_fn=lambda p: p * 2)
    with pytest.raises(TypeError, match="has_aux=True"):
        tx.update(params, tx.init(params), params, value_fn=lambda p: (jnp.sum(p), {}))
    # with has_aux the aux is accepted and ignored
    out, _ = sam_optax.sam(has_aux=True).update(
        params, tx.init(params), params, value_fn=lambda p: (jnp.sum(p**2), {"n": 1})
    )
    assert out.shape == (3,)


def test_gradient_tree_must_match_params():
    params = {"a": jnp.ones(3), "b": jnp.ones(2)}
    tx = sam_optax.sam()
    loss = lambda p: jnp.sum(p["a"])  # noqa: E731
    with pytest.raises(ValueError, match="tree structure of params"):
        tx.update({"a": jnp.ones(3)}, tx.init(params), params, value_fn=loss)
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        tx.update({"a": jnp.ones(3), "b": jnp.ones(4)}, tx.init(params), params, value_fn=loss)


def test_axis_name_outside_a_mapped_context_names_the_axis():
    params = jnp.ones(3)
    tx = sam_optax.sam(axis_name="devices")
    with pytest.raises(ValueError, match="'devices'"):
        tx.update(params, tx.init(params), params, value_fn=lambda p: jnp.sum(p**2))


# --------------------------------------------------------------------------
# Bad arguments are refused at construction, by name; known wrappers name the fix.
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rho": None}, "rho must be a number"),
        ({"rho": "0.05"}, "rho must be a number"),
        ({"rho": -0.1}, "rho must be >= 0"),
        ({"rho": optax.constant_schedule(-0.1)}, "the rho schedule returns -0.1"),
        ({"norm": "l2"}, "norm must be a number > 1"),
        ({"norm": 1.0}, "norm must be a number > 1"),
        ({"ascent_steps": 0}, "ascent_steps must be an integer >= 1"),
        ({"adaptive": "yes"}, "adaptive must be True or False"),
        ({"eta": -1.0}, "eta must be >= 0"),
        ({"direction": "up"}, "direction must be one of"),
        ({"sync_perturbation": True}, "sync_perturbation=True needs axis_name"),
    ],
)
def test_bad_arguments_are_refused_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sam_optax.sam(**kwargs)


def test_unknown_options_are_named_with_the_valid_ones():
    with pytest.raises(
        TypeError, match=r"unknown option.*adaptiv\b.*its options are norm, adaptive"
    ):
        sam_optax.sam(0.05, adaptiv=True)


def test_a_closure_that_returns_a_python_number_is_named():
    params = {"w": jnp.ones(2)}
    tx = sam_optax.sam(0.05)
    with pytest.raises(TypeError, match="value_fn must return a scalar loss as a JAX array"):
        tx.update(params, tx.init(params), params, value_fn=lambda p: 1.0)


def test_optax_masked_names_sams_own_mask_option():
    params = {"w": jnp.ones(2), "b": jnp.ones(1)}
    tx = optax.masked(sam_optax.sam(0.05), {"w": True, "b": False})
    loss = lambda p: jnp.sum(p["w"] ** 2) + jnp.sum(p["b"] ** 2)  # noqa: E731
    with pytest.raises(ValueError, match=r"optax.masked.*sam\(\.\.\., mask=mask\)"):
        tx.update(jax.grad(loss)(params), tx.init(params), params, value_fn=loss)


def test_a_missing_closure_names_the_wrappers_that_drop_it():
    params = {"w": jnp.ones(2)}
    tx = sam_optax.sam(0.05)
    with pytest.raises(TypeError, match=r"SAMTrainState.*MultiSteps"):
        tx.update(params, tx.init(params), params)


@pytest.mark.parametrize("base", ["sgd", "nesterov", "adam"])
def test_equals_optax_contrib_sam_in_opaque_mode(base):
    # optax.contrib.sam with adv_optimizer = chain(normalize(), sgd(rho)) and
    # sync_period = 2 takes the paper's step; without the eps of our norm the
    # two agree to rounding (float64, several steps of an MLP).
    with jax.enable_x64(True):
        params, loss = _mlp_problem()
        params = jax.tree.map(lambda x: x.astype(jnp.float64), params)
        make = {
            "sgd": lambda: optax.sgd(0.1),
            "nesterov": lambda: optax.sgd(0.1, momentum=0.9, nesterov=True),
            "adam": lambda: optax.adam(1e-2),
        }[base]
        ours = optax.chain(sam_optax.sam(0.05, eps=0.0), make())
        theirs = optax.contrib.sam(
            make(), optax.chain(optax.contrib.normalize(), optax.sgd(0.05)), sync_period=2,
            opaque_mode=True,
        )  # fmt: skip
        a, sa = params, ours.init(params)
        b, sb = params, theirs.init(params)
        for _ in range(5):
            u, sa = ours.update(jax.grad(loss)(a), sa, a, value_fn=loss)
            a = optax.apply_updates(a, u)
            grad_fn = lambda p, _: jax.grad(loss)(p)  # noqa: E731
            v, sb = theirs.update(jax.grad(loss)(b), sb, b, grad_fn=grad_fn)
            b = optax.apply_updates(b, v)
        assert_trees_close(a, b, rtol=1e-10, atol=1e-12)
        assert not np.allclose(flat(a), flat(params))
