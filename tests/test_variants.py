"""The efficient SAM family against independent float64 formulas, reductions, guarantees."""

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
        np.testing.assert_allclose(flat(got[-1][1][0].direction), stored["v"], rtol=1e-10)


def test_msam_matches_the_formula_one_gradient_at_w_minus_rho_d():
    with jax.enable_x64(True):
        prob, rho, mu = QuarticProblem(62), 0.3, 0.9
        d = np.zeros(9)

        def msam_grad(t, w):
            nonlocal d
            n = np.linalg.norm(d)
            g = prob.np_grad(w - rho * d / n) if n > 0 else prob.np_grad(w)
            d = mu * d + g
            return g

        got = _run(optax.chain(sam_optax.msam(rho, momentum=mu), optax.sgd(LR)), prob, 5)
        for (params, _), w in zip(got, _np_sgd(prob, msam_grad, 5)):
            np.testing.assert_allclose(flat(params), w, rtol=1e-12)
        np.testing.assert_allclose(flat(got[-1][1][0].momentum), d, rtol=1e-12)


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
        np.testing.assert_allclose(flat(got[-1][1][0].average), m, rtol=1e-12)


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
    ],
    ids=["gsam-alpha0", "looksam-every1", "rst-p1", "rst-p0", "fsam-sigma0", "aesam-always"],
)
def test_reductions_are_exact(make, reference):
    prob = QuarticProblem(66)
    prob.params = jax.tree.map(lambda x: x.astype(jnp.float32), prob.params)
    base = lambda: optax.sgd(LR, momentum=0.9)  # noqa: E731
    a = _run(optax.chain(make(), base()), prob, 6)[-1][0]
    b = _run(optax.chain(reference(), base()), prob, 6)[-1][0]
    assert_trees_equal(a, b)


VARIANTS = {
    "gsam": lambda rho: sam_optax.gsam(rho, 0.3),
    "looksam": lambda rho: sam_optax.looksam(rho, every=2),
    "msam": lambda rho: sam_optax.msam(rho),
    "rst": lambda rho: sam_optax.rst(rho, 0.5),
    "aesam": lambda rho: sam_optax.aesam(rho),
    "fsam": lambda rho: sam_optax.fsam(rho, 0.9),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_rho_zero_is_the_base_optimizer_bit_for_bit(name):
    prob = QuarticProblem(67)
    prob.params = jax.tree.map(lambda x: x.astype(jnp.float32), prob.params)
    base = lambda: optax.sgd(LR, momentum=0.9)  # noqa: E731
    a = _run(optax.chain(VARIANTS[name](0.0), base()), prob, 4)[-1][0]
    b = _run(base(), prob, 4)[-1][0]
    assert_trees_equal(a, b)


@pytest.mark.parametrize("name", VARIANTS)
def test_zero_gradient_stays_finite(name):
    params = {"bias": jnp.zeros(3), "w": jnp.zeros((2, 3))}
    loss = lambda p: jnp.sum(p["w"] ** 4) + jnp.sum(p["bias"] ** 4)  # noqa: E731
    tx = VARIANTS[name](0.05)
    state = tx.init(params)
    for _ in range(3):  # the reuse steps of looksam and the later steps of fsam too
        out, state = jax.jit(lambda g, s, p: tx.update(g, s, p, value_fn=loss))(
            jax.grad(loss)(params), state, params
        )
        chex.assert_tree_all_finite(out)


@pytest.mark.parametrize("name", VARIANTS)
def test_bfloat16_params_keep_their_dtype(name):
    k1, k2 = jax.random.split(jax.random.key(0))
    params = {"w": jax.random.normal(k1, (5, 4), jnp.bfloat16)}
    x = jax.random.normal(k2, (16, 5), jnp.bfloat16)
    loss = lambda p: jnp.mean(jnp.tanh(x @ p["w"]).astype(jnp.float32) ** 2)  # noqa: E731
    tx = optax.chain(VARIANTS[name](0.05), optax.sgd(0.1))
    state = tx.init(params)
    for _ in range(3):
        updates, state = jax.jit(lambda g, s, p: tx.update(g, s, p, value_fn=loss))(
            jax.grad(loss)(params), state, params
        )
        assert updates["w"].dtype == jnp.bfloat16
        chex.assert_tree_all_finite(updates)
        params = optax.apply_updates(params, updates)


def test_inject_hyperparams_changes_alpha_between_steps():
    with jax.enable_x64(True):
        prob = QuarticProblem(68)
        tx = optax.inject_hyperparams(sam_optax.gsam)(rho=0.1, alpha=0.2)
        update = jax.jit(lambda g, s, p: tx.update(g, s, p, value_fn=prob.loss))
        g = jax.grad(prob.loss)(prob.params)
        state = tx.init(prob.params)
        out_a, state = update(g, state, prob.params)
        state.hyperparams["alpha"] = jnp.asarray(0.0)
        out_b, _ = update(g, state, prob.params)
        ref, _ = sam_optax.sam(0.1).update(
            g, sam_optax.sam(0.1).init(prob.params), prob.params, value_fn=prob.loss
        )
        assert_trees_close(out_b, ref, rtol=1e-12)
        assert not np.allclose(flat(out_a), flat(ref))


@pytest.mark.parametrize(
    "name, first, changed",
    [
        ("gsam", dict(rho=0.1, alpha=0.2), dict(alpha=0.6)),
        ("looksam", dict(rho=0.1, every=3, alpha=0.2), dict(alpha=0.9)),
        ("msam", dict(rho=0.1), dict(rho=0.4)),
        ("rst", dict(rho=0.1, probability=1.0), dict(probability=0.0)),
        ("aesam", dict(rho=0.1, threshold=100.0), dict(threshold=-100.0)),
        ("fsam", dict(rho=0.1, sigma=0.2), dict(sigma=0.9)),
    ],
)
def test_inject_hyperparams_steps_with_the_values_in_the_state(name, first, changed):
    # Built with `first`, then the state's hyperparams set to `changed`: the
    # run equals the factory called with `changed`, and differs from `first`'s.
    with jax.enable_x64(True):
        prob, steps = QuarticProblem(69), 5
        factory = getattr(sam_optax, name)
        tx = optax.chain(optax.inject_hyperparams(factory)(**first), optax.sgd(LR))
        state, params = tx.init(prob.params), prob.params
        for key, v in changed.items():
            state[0].hyperparams[key] = jnp.asarray(v, state[0].hyperparams[key].dtype)
        want = _run(optax.chain(factory(**{**first, **changed}), optax.sgd(LR)), prob, steps)
        for t in range(steps):
            value, grads = jax.value_and_grad(prob.loss)(params)
            updates, state = tx.update(grads, state, params, value_fn=prob.loss, value=value)
            params = optax.apply_updates(params, updates)
            assert_trees_close(params, want[t][0], rtol=1e-12)
        before = _run(optax.chain(factory(**first), optax.sgd(LR)), prob, steps)[-1][0]
        assert not np.allclose(flat(params), flat(before), rtol=1e-9)


# --------------------------------------------------------------------------
# Diagnostics: free scalars in the state.
# --------------------------------------------------------------------------


def test_diagnostics_are_the_formulas():
    with jax.enable_x64(True):
        prob, rho = QuarticProblem(70), 0.2
        (_, state), = _run(sam_optax.sam(rho, eps=0.0), prob, 1)  # fmt: skip
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
        # Without the clean value, sharpness is "not measured".
        (_, state), = _run(sam_optax.sam(rho), prob, 1, with_value=False)  # fmt: skip
        assert math.isnan(float(optax.tree.get(state, "sharpness")))
        assert np.isfinite(float(optax.tree.get(state, "perturbed_loss")))


@pytest.mark.parametrize("name", VARIANTS)
def test_every_variant_records_its_diagnostics(name):
    prob = QuarticProblem(71)
    prob.params = jax.tree.map(lambda x: x.astype(jnp.float32), prob.params)
    history = _run(optax.chain(VARIANTS[name](0.1), optax.sgd(LR)), prob, 4)
    flags = [bool(optax.tree.get(s, "sam_step")) for _, s in history]
    for (_, state), flag in zip(history, flags):
        sharp = float(optax.tree.get(state, "sharpness"))
        assert np.isfinite(sharp) == flag, (name, sharp, flag)
        if name != "msam":
            assert float(optax.tree.get(state, "grad_norm")) > 0
    assert any(flags)


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
    msam = _flops(optax.chain(sam_optax.msam(0.1), optax.sgd(0.1, momentum=0.9)), loss, params)
    sam = _flops(optax.chain(sam_optax.sam(0.1), optax.sgd(0.1, momentum=0.9)), loss, params)
    assert msam < 1.1 * sgd, (msam, sgd)
    assert sam > 1.8 * sgd, (sam, sgd)
