"""The efficient SAM family against independent float64 formulas, reductions, guarantees."""

import math

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

LR = 0.05


def _run(tx, prob, steps, *, with_value=True):
    """``steps`` jitted steps of ``tx`` on the problem; the params and states after each."""
    state, params = tx.init(prob.params), prob.params

    @jax.jit
    def step(params, state):
        value, grads = jax.value_and_grad(prob.loss)(params)
        extra = {"value": value} if with_value else {}
        updates, state = tx.update(grads, state, params, value_fn=prob.loss, **extra)
        return optax.apply_updates(params, updates), state

    history = []
    for _ in range(steps):
        params, state = step(params, state)
        history.append((params, state))
    return history


def _np_sgd(prob, direction_fn, steps, lr=LR):
    """Plain SGD in numpy on the gradients ``direction_fn(t, w) -> g_t``."""
    w = flat(prob.params)
    out = []
    for t in range(steps):
        w = w - lr * direction_fn(t, w)
        out.append(w)
    return out


def _np_sam_grad(prob, w, rho, direction=None):
    g = prob.np_grad(w) if direction is None else direction
    return prob.np_grad(w + np_eps_p(g, rho, 2.0))


# --------------------------------------------------------------------------
# Each variant against its formula, several steps, state included.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True], ids=["constant-rho", "rho-from-lr"])
def test_gsam_matches_the_formula(tied):
    with jax.enable_x64(True):
        prob, alpha = QuarticProblem(60), 0.4
        if tied:  # a float64 linear decay 0.2 -> 0.05; rho_t = 0.05 + 0.25 (lr_t - 0.05) / 0.15
            lr = lambda count: 0.2 - 0.0375 * jnp.asarray(count, jnp.float64)  # noqa: E731
            rho = sam_optax.rho_from_learning_rate(lr, rho_max=0.3, rho_min=0.05, lr_min=0.05)
            rho_at = [0.05 + 0.25 * (0.2 - 0.0375 * t - 0.05) / 0.15 for t in range(4)]
        else:
            rho, rho_at = 0.2, [0.2] * 4

        def gsam_grad(t, w):
            g, gp = prob.np_grad(w), _np_sam_grad(prob, w, rho_at[t])
            perp = g - (g @ gp) / (gp @ gp) * gp
            return gp - alpha * perp

        got = _run(optax.chain(sam_optax.gsam(rho, alpha, eps=0.0), optax.sgd(LR)), prob, 4)
        for (params, _), w in zip(got, _np_sgd(prob, gsam_grad, 4)):
            np.testing.assert_allclose(flat(params), w, rtol=1e-12)


def test_gsam_rho_follows_the_learning_rate():
    lr = optax.linear_schedule(0.1, 0.01, 10)
    rho = sam_optax.rho_from_learning_rate(lr, rho_max=0.2, rho_min=0.05, lr_min=0.01)
    for t in (0, 3, 10):
        expected = 0.05 + 0.15 * (float(lr(t)) - 0.01) / 0.09
        np.testing.assert_allclose(float(rho(t)), expected, rtol=1e-6)
    warmup = optax.linear_schedule(0.0, 0.1, 5)
    assert float(sam_optax.rho_from_learning_rate(warmup, 0.2, lr_max=0.1)(0)) == 0.0
    with pytest.raises(ValueError, match="lr_max must be > lr_min"):
        sam_optax.rho_from_learning_rate(optax.constant_schedule(0.0), 0.1)


def test_looksam_matches_the_formula_and_stores_the_direction():
    with jax.enable_x64(True):
        prob, rho, alpha, k = QuarticProblem(61), 0.2, 0.7, 3
        stored = {}

        def looksam_grad(t, w):
            g = prob.np_grad(w)
            if t % k == 0:
                gs = _np_sam_grad(prob, w, rho)
                gv = gs - (gs @ g) / (g @ g) * g
                stored["v"] = gv / np.linalg.norm(gv)
                return gs
            return g + alpha * np.linalg.norm(g) * stored["v"]

        tx = optax.chain(sam_optax.looksam(rho, every=k, alpha=alpha, eps=0.0), optax.sgd(LR))
        got = _run(tx, prob, 7)
        for t, ((params, state), w) in enumerate(zip(got, _np_sgd(prob, looksam_grad, 7))):
            np.testing.assert_allclose(flat(params), w, rtol=1e-11)
            assert bool(optax.tree.get(state, "sam_step")) == (t % k == 0)
        np.testing.assert_allclose(
            flat(optax.tree.get(got[-1][1], "direction")), stored["v"], rtol=1e-10
        )


def test_msam_matches_the_formula_one_gradient_at_w_minus_rho_m():
    # m is SGD's own momentum trace: m <- mu m + g_t, the gradient taken at
    # w - rho m / ||m|| (unperturbed while m = 0); the base step is SGD's.
    with jax.enable_x64(True):
        prob, rho, mu = QuarticProblem(62), 0.3, 0.9
        m = np.zeros(9)

        def msam_grad(t, w):
            nonlocal m
            n = np.linalg.norm(m)
            g = prob.np_grad(w - rho * m / n) if n > 0 else prob.np_grad(w)
            m = mu * m + g
            return m  # SGD with momentum steps along its trace

        got = _run(sam_optax.msam(optax.sgd(LR, momentum=mu), rho, eps=0.0), prob, 5)
        for (params, _), w in zip(got, _np_sgd(prob, msam_grad, 5)):
            np.testing.assert_allclose(flat(params), w, rtol=1e-12)
        np.testing.assert_allclose(flat(optax.tree.get(got[-1][1], "trace")), m, rtol=1e-12)


def test_msam_reads_adams_first_moment_and_the_decay_it_sees():
    # With adamw the direction is the raw first moment mu (not bias-corrected),
    # and weight decay (decoupled) never enters it.
    with jax.enable_x64(True):
        prob, rho = QuarticProblem(72), 0.5
        inner = optax.adamw(LR, b1=0.8, weight_decay=0.1)
        got = _run(sam_optax.msam(inner, rho, eps=0.0), prob, 4)
        w, m, v = flat(prob.params), np.zeros(9), np.zeros(9)
        for t, (params, _) in enumerate(got):
            n = np.linalg.norm(m)
            g = prob.np_grad(w - rho * m / n if n > 0 else w)
            m, v = 0.8 * m + 0.2 * g, 0.999 * v + 0.001 * g**2
            m_hat, v_hat = m / (1 - 0.8 ** (t + 1)), v / (1 - 0.999 ** (t + 1))
            w = w - LR * (m_hat / (np.sqrt(v_hat) + 1e-8) + 0.1 * w)
            np.testing.assert_allclose(flat(params), w, rtol=1e-12)


def test_msam_names_what_it_cannot_find():
    params = {"w": jnp.zeros(3)}
    with pytest.raises(ValueError, match="no first moment named 'mu' or 'trace'"):
        sam_optax.msam(optax.sgd(0.1), 0.3).init(params)
    with pytest.raises(ValueError, match="2 fields named 'trace'"):
        sam_optax.msam(optax.chain(optax.trace(0.9), optax.trace(0.5)), 0.3).init(params)
    tx = sam_optax.msam(
        optax.chain(optax.trace(0.9), optax.trace(0.5)), 0.3, moment=lambda s: s[1].trace
    )
    tx.init(params)  # a function picks the moment
    with pytest.raises(ValueError, match="sees must be one of"):
        sam_optax.msam(optax.sgd(0.1, momentum=0.9), sees="held")


@pytest.mark.parametrize("factory", ["rst", "aesam"])
def test_switching_variants_take_sam_or_base_steps_by_their_rule(factory):
    with jax.enable_x64(True):
        prob, rho, steps = QuarticProblem(63), 0.2, 12
        if factory == "rst":
            tx = sam_optax.rst(rho, probability=0.5, eps=0.0, seed=3)
        else:
            tx = sam_optax.aesam(rho, threshold=0.2, decay=0.8, eps=0.0)
        got = _run(optax.chain(tx, optax.sgd(LR)), prob, steps)
        flags = [bool(optax.tree.get(s, "sam_step")) for _, s in got]
        assert 0 < sum(flags) < steps, flags  # both kinds of step happen
        stats = {"mean": 0.0, "var": 0.0}

        def switched_grad(t, w):
            g = prob.np_grad(w)
            if factory == "aesam":  # the rule, written out
                q = g @ g
                mean = q if t == 0 else 0.8 * stats["mean"] + 0.2 * q
                # the exponentially weighted variance, against the previous mean
                var = 0.0 if t == 0 else 0.8 * stats["var"] + 0.8 * 0.2 * (q - stats["mean"]) ** 2
                stats.update(mean=mean, var=var)
                assert (q >= mean + 0.2 * math.sqrt(var)) == flags[t], t
            return _np_sam_grad(prob, w, rho) if flags[t] else g

        for (params, _), w in zip(got, _np_sgd(prob, switched_grad, steps)):
            np.testing.assert_allclose(flat(params), w, rtol=1e-12)


def test_rst_draws_sam_steps_with_probability_p():
    prob = QuarticProblem(64)
    got = _run(optax.chain(sam_optax.rst(0.05, probability=0.3), optax.sgd(1e-3)), prob, 400)
    fraction = np.mean([bool(optax.tree.get(s, "sam_step")) for _, s in got])
    assert abs(fraction - 0.3) < 4 * math.sqrt(0.3 * 0.7 / 400), fraction


def test_fsam_matches_the_formula():
    with jax.enable_x64(True):
        prob, rho, sigma, lam = QuarticProblem(65), 0.2, 0.8, 0.6
        m = np.zeros(9)

        def fsam_grad(t, w):
            nonlocal m
            g = prob.np_grad(w)
            d = g if t == 0 else g - sigma * m
            m = g if t == 0 else lam * m + (1 - lam) * g
            return _np_sam_grad(prob, w, rho, direction=d)

        tx = optax.chain(sam_optax.fsam(rho, sigma, decay=lam, eps=0.0), optax.sgd(LR))
        got = _run(tx, prob, 5)
        for (params, _), w in zip(got, _np_sgd(prob, fsam_grad, 5)):
            np.testing.assert_allclose(flat(params), w, rtol=1e-12)
        np.testing.assert_allclose(flat(optax.tree.get(got[-1][1], "average")), m, rtol=1e-12)


def test_vasso_matches_the_formula():
    with jax.enable_x64(True):
        prob, rho, theta = QuarticProblem(73), 0.2, 0.3
        d = None

        def vasso_grad(t, w):
            nonlocal d
            g = prob.np_grad(w)
            d = g if d is None else (1 - theta) * d + theta * g
            return _np_sam_grad(prob, w, rho, direction=d)

        tx = optax.chain(sam_optax.vasso(rho, theta, eps=0.0), optax.sgd(LR))
        got = _run(tx, prob, 5)
        for (params, _), w in zip(got, _np_sgd(prob, vasso_grad, 5)):
            np.testing.assert_allclose(flat(params), w, rtol=1e-12)
        np.testing.assert_allclose(flat(optax.tree.get(got[-1][1], "average")), d, rtol=1e-12)


@pytest.mark.parametrize("decouple", [True, False])
def test_wsam_matches_the_formula(decouple):
    # alpha = gamma / (1 - gamma); SGD with momentum steps on g0 (+ the
    # sharpness term folded in, or as a separate -lr alpha (g1 - g0) step).
    with jax.enable_x64(True):
        prob, rho, gamma, mu = QuarticProblem(74), 0.2, 0.75, 0.9
        alpha = gamma / (1 - gamma)
        tx = sam_optax.wsam(
            optax.sgd(LR, momentum=mu), rho, gamma, learning_rate=LR if decouple else None, eps=0.0
        )
        got = _run(tx, prob, 4)
        w, trace = flat(prob.params), np.zeros(9)
        for params, _ in got:
            g0 = prob.np_grad(w)
            g1 = _np_sam_grad(prob, w, rho)
            seen = g0 if decouple else g0 + alpha * (g1 - g0)
            trace = mu * trace + seen
            w = w - LR * trace - (LR * alpha * (g1 - g0) if decouple else 0.0)
            np.testing.assert_allclose(flat(params), w, rtol=1e-12)


def test_esam_selects_the_examples_whose_loss_rises_most():
    # Per-example losses l_i(w) = (a_i . w - b_i)^2: the SAM gradient is that of the
    # mean over the examples with the largest rise, strictly above the k-th (k = 4 of 8).
    with jax.enable_x64(True):
        rng = np.random.default_rng(75)
        a, b = rng.normal(size=(8, 3)), rng.normal(size=8)
        w0, rho = rng.normal(size=3), 0.3

        def per(w):
            return (jnp.asarray(a) @ w - jnp.asarray(b)) ** 2

        g = jax.grad(lambda w: jnp.mean(per(w)))(jnp.asarray(w0))
        tx = sam_optax.esam(rho, gamma=0.5, eps=0.0)
        out, state = tx.update(g, tx.init(w0), jnp.asarray(w0), value_fn=per, value=per(w0))
        e = rho * np.asarray(g) / np.linalg.norm(np.asarray(g))
        before, after = (a @ w0 - b) ** 2, (a @ (w0 + e) - b) ** 2
        rise = after - before
        chosen = rise > np.sort(rise)[-4]
        assert chosen.sum() == 3  # the authors' rule: k - 1 without ties
        want = np.mean((2 * (a @ (w0 + e) - b))[chosen, None] * a[chosen], axis=0)
        np.testing.assert_allclose(np.asarray(out), want, rtol=1e-10)
        # The diagnostics are the whole batch's, as every method's: L(w+e) - L(w).
        np.testing.assert_allclose(float(state.diagnostics.perturbed_loss), after.mean(), rtol=1e-6)
        np.testing.assert_allclose(
            float(state.diagnostics.sharpness), after.mean() - before.mean(), rtol=1e-5
        )


def test_esam_refuses_a_loss_that_is_not_per_example():
    w = jnp.zeros(3)
    tx = sam_optax.esam(0.1, gamma=0.5)
    with pytest.raises(TypeError, match="a vector of per-example losses"):
        tx.update(w, tx.init(w), w, value_fn=lambda p: jnp.sum(p**2))
    with pytest.raises(ValueError, match="selects no example"):
        tx.update(w, tx.init(w), w, value_fn=lambda p: jnp.sum(p**2)[None])


# --------------------------------------------------------------------------
# Reductions, exactly.
# --------------------------------------------------------------------------

_SAM = lambda: sam_optax.sam(0.1)  # noqa: E731


@pytest.mark.parametrize(
    "make, reference",
    [
        (lambda: sam_optax.gsam(0.1, alpha=0.0), _SAM),
        (lambda: sam_optax.looksam(0.1, every=1), _SAM),
        (lambda: sam_optax.rst(0.1, probability=1.0), _SAM),
        (lambda: sam_optax.rst(0.1, probability=0.0), lambda: optax.identity()),
        (lambda: sam_optax.fsam(0.1, sigma=0.0), _SAM),
        (lambda: sam_optax.aesam(0.1, threshold=-1e9), _SAM),
        (lambda: sam_optax.vasso(0.1, theta=1.0), _SAM),
    ],
    ids=[
        "gsam-alpha0",
        "looksam-every1",
        "rst-p1",
        "rst-p0",
        "fsam-sigma0",
        "aesam-always",
        "vasso-theta1",
    ],
)
def test_reductions_are_exact(make, reference):
    prob = QuarticProblem(66)
    prob.params = jax.tree.map(lambda x: x.astype(jnp.float32), prob.params)
    base = lambda: optax.sgd(LR, momentum=0.9)  # noqa: E731
    a = _run(optax.chain(make(), base()), prob, 6)[-1][0]
    b = _run(optax.chain(reference(), base()), prob, 6)[-1][0]
    assert_trees_equal(a, b)


def test_wsam_with_gamma_half_is_sam():
    # alpha = 1: the gradient WSAM hands on is g1, SAM's.
    prob = QuarticProblem(76)
    prob.params = jax.tree.map(lambda x: x.astype(jnp.float32), prob.params)
    base = lambda: optax.sgd(LR, momentum=0.9)  # noqa: E731
    a = _run(sam_optax.wsam(base(), 0.1, gamma=0.5), prob, 5)[-1][0]
    b = _run(optax.chain(_SAM(), base()), prob, 5)[-1][0]
    assert_trees_close(a, b, rtol=1e-6)


# --------------------------------------------------------------------------
# Diagnostics: free scalars in the state.
# --------------------------------------------------------------------------


def test_diagnostics_are_the_formulas():
    with jax.enable_x64(True):
        prob, rho = QuarticProblem(70), 0.2
        (_, state), = _run(sam_optax.sam(rho, eps=0.0, cosine=True), prob, 1)  # fmt: skip
        w = flat(prob.params)
        g = prob.np_grad(w)
        pert = np_eps_p(g, rho, 2.0)
        gs = prob.np_grad(w + pert)
        expected = {
            "sharpness": prob.np_loss(w + pert) - prob.np_loss(w),
            "perturbed_loss": prob.np_loss(w + pert),
            "grad_norm": np.linalg.norm(g),
            "cosine": g @ gs / np.linalg.norm(g) / np.linalg.norm(gs),
        }
        for name, value in expected.items():
            np.testing.assert_allclose(float(optax.tree.get(state, name)), value, rtol=1e-5)
        assert bool(optax.tree.get(state, "sam_step"))
        for leaf in jax.tree.leaves(state.diagnostics):
            assert np.size(leaf) == 1  # nothing params-sized
        # Without cosine=True the cosine is not measured (it would cost a buffer).
        (_, state), = _run(sam_optax.sam(rho), prob, 1)  # fmt: skip
        assert math.isnan(float(optax.tree.get(state, "cosine")))
        # Without the clean value, sharpness is "not measured".
        (_, state), = _run(sam_optax.sam(rho), prob, 1, with_value=False)  # fmt: skip
        assert math.isnan(float(optax.tree.get(state, "sharpness")))
        assert np.isfinite(float(optax.tree.get(state, "perturbed_loss")))


# --------------------------------------------------------------------------
# The branch not taken does not run; MSAM costs one gradient.
# --------------------------------------------------------------------------


def _count_perturbed_passes(tx, steps=8):
    """How many times ``tx`` evaluates the loss over ``steps`` steps (the clean
    gradient is written out, so every evaluation is tx's own)."""
    calls = []

    def loss(p):
        jax.debug.callback(lambda: calls.append(1))
        return jnp.sum(p["w"] ** 2 + jnp.sin(p["w"]))

    params = {"w": jnp.arange(1.0, 4.0)}
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        grads = {"w": 2 * params["w"] + jnp.cos(params["w"])}
        updates, state = tx.update(grads, state, params, value_fn=loss)
        return optax.apply_updates(params, updates), state

    for _ in range(steps):
        params, state = step(params, state)
    jax.effects_barrier()
    return len(calls)


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda: sam_optax.rst(0.1, probability=0.0), 0),
        (lambda: sam_optax.rst(0.1, probability=1.0), 8),
        (lambda: sam_optax.looksam(0.1, every=4), 2),
        (lambda: sam_optax.aesam(0.1, threshold=1e9), 1),  # only the first step (sigma = 0)
    ],
    ids=["rst-p0", "rst-p1", "looksam-4", "aesam-never"],
)
def test_the_branch_not_taken_does_not_run(make, expected):
    assert _count_perturbed_passes(optax.chain(make(), optax.sgd(0.01))) == expected


def _flops(tx, loss, params):
    state = tx.init(params)

    def step(params, state):
        grads = jax.grad(loss)(params)
        updates, state = tx.update(grads, state, params, value_fn=loss)
        return optax.apply_updates(params, updates), state

    return jax.jit(step).lower(params, state).compile().cost_analysis()["flops"]


def test_msam_compiles_to_one_gradient_sam_to_two():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    params = {"w1": jax.random.normal(k1, (64, 256)), "w2": jax.random.normal(k2, (256, 10))}
    x = jax.random.normal(k3, (512, 64))
    loss = lambda p: jnp.mean(jnp.tanh(x @ p["w1"]) @ p["w2"] ** 2)  # noqa: E731
    sgd = _flops(optax.sgd(0.1, momentum=0.9), loss, params)
    msam = _flops(sam_optax.msam(optax.sgd(0.1, momentum=0.9), 0.1), loss, params)
    sam = _flops(optax.chain(sam_optax.sam(0.1), optax.sgd(0.1, momentum=0.9)), loss, params)
    assert msam < 1.1 * sgd, (msam, sgd)
    assert sam > 1.8 * sgd, (sam, sgd)
