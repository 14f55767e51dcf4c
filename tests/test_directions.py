"""The ascent directions of eq. (2), ASAM and the random ablation, against numpy."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sam_optax

from helpers import flat
from helpers import np_eps_p
from helpers import unflat


def _grads(seed=0):
    rng = np.random.default_rng(seed)
    like = {"conv": jnp.zeros((3, 3, 2, 4)), "bias": jnp.zeros(4), "dense": jnp.zeros((5, 2))}
    return like, rng


@pytest.mark.parametrize("p", [2.0, 3.0, 1.5, 7.0, math.inf])
def test_p_norm_direction_matches_eq2(p):
    with jax.enable_x64(True):
        like, rng = _grads()
        g = rng.normal(size=flat(like).size)
        g[3] = 0.0  # an exact zero must stay zero
        eps = sam_optax.ascent_direction(unflat(g, like), 0.07, norm=p, eps=0.0)
        expected = np_eps_p(g, 0.07, p)
        np.testing.assert_allclose(flat(eps), expected, rtol=1e-12, atol=1e-15)
        # It lies on the sphere of radius rho in the p-norm ...
        np.testing.assert_allclose(np.linalg.norm(flat(eps), ord=p), 0.07, rtol=1e-12)
        # ... and maximises the linear term there (Hoelder's equality).
        q = 1.0 if np.isinf(p) else p / (p - 1)
        np.testing.assert_allclose(flat(eps) @ g, 0.07 * np.linalg.norm(g, ord=q), rtol=1e-12)


def test_adaptive_direction_matches_asam_formula():
    with jax.enable_x64(True):
        like, rng = _grads(1)
        g, w = rng.normal(size=(2, flat(like).size))
        eps = sam_optax.ascent_direction(
            unflat(g, like), 0.5, params=unflat(w, like), adaptive=True, eta=0.01, eps=0.0
        )
        t = np.abs(w) + 0.01
        expected = 0.5 * t**2 * g / np.linalg.norm(t * g)
        np.testing.assert_allclose(flat(eps), expected, rtol=1e-12)


def test_adaptive_inf_norm_is_scaled_sign():
    with jax.enable_x64(True):
        like, rng = _grads(2)
        g, w = rng.normal(size=(2, flat(like).size))
        eps = sam_optax.ascent_direction(
            unflat(g, like), 0.1, params=unflat(w, like), adaptive=True, eta=0.1, norm=math.inf
        )
        np.testing.assert_allclose(flat(eps), 0.1 * (np.abs(w) + 0.1) * np.sign(g), rtol=1e-12)


@pytest.mark.parametrize("kind", ["prefix", "callable", "array"])
def test_mask_restricts_perturbation_and_norm(kind):
    with jax.enable_x64(True):
        like, rng = _grads(3)
        g = rng.normal(size=flat(like).size)
        grads = unflat(g, like)
        if kind == "prefix":
            mask = {"conv": True, "bias": False, "dense": True}
        elif kind == "callable":
            mask = lambda p: jax.tree.map(lambda x: x.ndim > 1, p)  # noqa: E731
        else:
            mask = {"conv": True, "bias": jnp.zeros(4, bool), "dense": jnp.ones((5, 2), bool)}
        eps = sam_optax.ascent_direction(grads, 0.3, params=like, mask=mask, eps=0.0)
        assert np.all(np.asarray(eps["bias"]) == 0)
        selected = np.concatenate([np.asarray(grads[k]).ravel() for k in ("conv", "dense")])
        got = np.concatenate([np.asarray(eps[k]).ravel() for k in ("conv", "dense")])
        np.testing.assert_allclose(got, 0.3 * selected / np.linalg.norm(selected), rtol=1e-12)


def test_elementwise_array_mask():
    with jax.enable_x64(True):
        g = jnp.array([3.0, 1.0, 4.0])
        eps = sam_optax.ascent_direction(g, 1.0, mask=jnp.array([True, False, True]), eps=0.0)
        np.testing.assert_allclose(np.asarray(eps), [0.6, 0.0, 0.8], rtol=1e-12)


@pytest.mark.parametrize("p", [2.0, 3.0, math.inf])
@pytest.mark.parametrize("adaptive", [False, True])
def test_zero_gradient_gives_zero_not_nan(p, adaptive):
    like, _ = _grads()
    zero = jax.tree.map(jnp.zeros_like, like)
    eps = sam_optax.ascent_direction(zero, 0.05, params=like, norm=p, adaptive=adaptive)
    for leaf in jax.tree.leaves(eps):
        assert np.all(np.asarray(leaf) == 0)
    # The direction is differentiable at zero too (second_order needs it).
    jac = jax.grad(
        lambda z: sum(
            jnp.sum(x)
            for x in jax.tree.leaves(
                sam_optax.ascent_direction(z, 0.05, params=like, norm=p, adaptive=adaptive)
            )
        )
    )(zero)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(jac))


def test_a_traced_norm_is_refused_by_name():
    # p picks the formula (closed forms for 2 and inf): it must be a static number.
    like, _ = _grads()
    f = jax.jit(lambda g, p: sam_optax.ascent_direction(g, 0.2, norm=p))
    with pytest.raises(ValueError, match="norm must be a static number"):
        f(like, jnp.float32(3.0))


def test_float16_norm_is_computed_in_float32():
    # 300^2 overflows float16 (max 65504): a float16 norm would give inf and a
    # zero direction; computed in float32 the direction is exact.
    g = {"a": jnp.full((4,), 300.0, jnp.float16), "b": jnp.full((3,), -300.0, jnp.float16)}
    eps = sam_optax.ascent_direction(g, 1.0)
    assert eps["a"].dtype == jnp.float16 and eps["b"].dtype == jnp.float16
    np.testing.assert_allclose(np.asarray(eps["a"], np.float32), 1 / math.sqrt(7), rtol=1e-3)
    np.testing.assert_allclose(np.asarray(eps["b"], np.float32), -1 / math.sqrt(7), rtol=1e-3)


def test_random_direction_is_seeded_and_has_norm_rho():
    like, _ = _grads()
    a = sam_optax.random_direction(jax.random.key(3), like, 0.2)
    b = sam_optax.random_direction(jax.random.key(3), like, 0.2)
    c = sam_optax.random_direction(jax.random.key(4), like, 0.2)
    np.testing.assert_array_equal(flat(a), flat(b))
    assert not np.allclose(flat(a), flat(c))
    np.testing.assert_allclose(np.linalg.norm(flat(a)), 0.2, rtol=1e-5)
    masked = sam_optax.random_direction(
        jax.random.key(3), like, 0.2, mask={"conv": False, "bias": True, "dense": True}
    )
    assert np.all(np.asarray(masked["conv"]) == 0)
    np.testing.assert_allclose(np.linalg.norm(flat(masked)), 0.2, rtol=1e-5)
    inf = sam_optax.random_direction(jax.random.key(3), like, 0.2, norm=math.inf)
    np.testing.assert_allclose(np.max(np.abs(flat(inf))), 0.2, rtol=1e-6)


@pytest.mark.parametrize("bad", [1, 0.5, -2.0, float("nan")])
def test_bad_norm_is_refused(bad):
    with pytest.raises(ValueError, match="norm"):
        sam_optax.ascent_direction({"a": jnp.ones(2)}, 0.1, norm=bad)


def test_tree_mismatch_is_refused():
    with pytest.raises(ValueError, match="same tree structure"):
        sam_optax.ascent_direction({"a": jnp.ones(2)}, 0.1, params={"b": jnp.ones(2)})
    with pytest.raises(ValueError, match="adaptive=True needs params"):
        sam_optax.ascent_direction({"a": jnp.ones(2)}, 0.1, adaptive=True)
