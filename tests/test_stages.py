"""Each stage of a SAM step on its own, against numpy (float64)."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam_optax import _stages
from sam_optax._directions import select
from sam_optax._family import SAMOptions as Ascent
from sam_optax._stages import Objective

from helpers import QuarticProblem
from helpers import flat
from helpers import np_eps_p
from helpers import unflat

MASK = {"bias": False, "w": True}  # flat order (bias, w): only w is perturbed


def _problems(n=2, seed=40):
    """G groups sharing params: group i's loss is problem i's quartic."""
    probs = [QuarticProblem(seed + i) for i in range(n)]
    params = probs[0].params
    objective = Objective(
        loss=lambda points: sum(pr.loss(p) for pr, p in zip(probs, points)) / n,
        grads=[jax.grad(pr.loss)(params) for pr in probs],
    )
    return probs, params, objective


def _np(leaves):
    return np.concatenate([np.asarray(x).ravel() for x in leaves])


def test_direction_gradients_own_or_synced():
    with jax.enable_x64(True):
        probs, params, objective = _problems(3)
        sel = select(params, MASK)
        own = _stages.direction_gradients(sel, objective.grads, None)
        w = flat(params)
        for got, pr in zip(own, probs):
            np.testing.assert_allclose(_np(got), pr.np_grad(w)[3:], rtol=1e-15)
        synced = _stages.direction_gradients(sel, objective.grads, ())
        mean = np.mean([pr.np_grad(w)[3:] for pr in probs], axis=0)
        for got in synced:
            np.testing.assert_allclose(_np(got), mean, rtol=1e-14)


def test_direction_gradients_sync_over_a_mapped_axis():
    with jax.enable_x64(True):
        sel = select(jnp.zeros(3), None)
        grads = jnp.arange(12.0).reshape(4, 3)
        out = jax.vmap(
            lambda g: _stages.direction_gradients(sel, [g], ("i",))[0][0], axis_name="i"
        )(grads)
        np.testing.assert_allclose(np.asarray(out), np.tile(grads.mean(0), (4, 1)))


@pytest.mark.parametrize("p", [2.0, 3.0, math.inf])
def test_first_deltas_are_eq2_per_group(p):
    with jax.enable_x64(True):
        probs, params, objective = _problems(2)
        sel = select(params, None)
        grads = _stages.direction_gradients(sel, objective.grads, None)
        deltas = _stages.first_deltas(grads, None, jnp.float64(0.3), Ascent(norm=p, eps=0.0))
        w = flat(params)
        for d, pr in zip(deltas, probs):
            np.testing.assert_allclose(_np(d), np_eps_p(pr.np_grad(w), 0.3, p), rtol=1e-12)


def test_adaptive_scale_and_perturbations():
    with jax.enable_x64(True):
        _, params, objective = _problems(1)
        sel = select(params, None)
        ascent = Ascent(adaptive=True, eta=0.1, eps=0.0)
        scale = _stages.ascent_scale(sel, params, ascent)
        w, g = flat(params), flat(objective.grads[0])
        t = np.abs(w) + 0.1
        np.testing.assert_allclose(_np(scale), t, rtol=1e-15)
        grads = _stages.direction_gradients(sel, objective.grads, None)
        deltas = _stages.first_deltas(grads, scale, jnp.float64(0.5), ascent)
        (pert,) = _stages.perturbations(deltas, scale)
        np.testing.assert_allclose(_np(pert), 0.5 * t**2 * g / np.linalg.norm(t * g), rtol=1e-12)
        # In the T^-1 coordinates the step lies on the rho-sphere.
        np.testing.assert_allclose(np.linalg.norm(_np(deltas[0])), 0.5, rtol=1e-12)


def test_random_deltas_norm_rho_distinct_per_group_and_device():
    sel = select({"a": jnp.zeros((5, 4)), "b": jnp.zeros(3)}, {"a": True, "b": False})
    like = sel.take({"a": jnp.zeros((5, 4)), "b": jnp.zeros(3)})
    ascent = Ascent(direction="random")
    deltas = _stages.random_deltas(jax.random.key(0), sel, like, 3, jnp.float32(0.2), ascent, ())
    norms = [np.linalg.norm(_np(d)) for d in deltas]
    np.testing.assert_allclose(norms, 0.2, rtol=1e-5)
    assert len({_np(d).tobytes() for d in deltas}) == 3

    def per_device(_):
        key = jax.random.key(0)
        return _stages.random_deltas(key, sel, like, 1, jnp.float32(0.2), ascent, ("d",))[0][0]

    out = np.asarray(jax.vmap(per_device, axis_name="d")(jnp.arange(4)))
    assert len({row.tobytes() for row in out}) == 4


def test_perturbed_points_move_the_selected_leaves_only():
    params = {"bias": jnp.ones(3, jnp.bfloat16), "w": jnp.ones((2, 3), jnp.bfloat16)}
    sel = select(params, MASK)
    assert sel.dtype == jnp.float32
    (point,) = _stages.perturbed_points(sel, params, [[jnp.full((2, 3), 0.25)]], ())
    assert point["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(point["w"], np.float32), 1.25)
    assert point["bias"] is params["bias"]


def test_gradients_at_gives_each_group_its_own_gradient():
    with jax.enable_x64(True):
        probs, params, objective = _problems(3)
        rng = np.random.default_rng(0)
        points = tuple(unflat(flat(params) + 0.1 * rng.normal(size=9), params) for _ in probs)
        value, grads = _stages.gradients_at(objective, points)
        for g, pr, pt in zip(grads, probs, points):
            np.testing.assert_allclose(_np(g), pr.np_grad(flat(pt)), rtol=1e-12)
        expected = np.mean([pr.np_loss(flat(pt)) for pr, pt in zip(probs, points)])
        np.testing.assert_allclose(float(value), expected, rtol=1e-12)


def test_projected_ascent_iterates_and_projects():
    # Against numpy with a quadratic's gradient: delta <- Pi(delta + rho d(A(w + delta))).
    with jax.enable_x64(True):
        rng = np.random.default_rng(1)
        a = rng.normal(size=(4, 4))
        a = a @ a.T
        w = rng.normal(size=4)
        rho = 0.7

        def evaluate(deltas):
            x = jnp.asarray(w) + deltas[0][0]
            return 0.5 * x @ jnp.asarray(a) @ x, [[jnp.asarray(a) @ x]]

        start = [[jnp.asarray(np_eps_p(a @ w, rho, 2.0))]]
        value, grads = _stages.ascend(
            start, evaluate, lambda g: g, None, jnp.float64(rho), Ascent(ascent_steps=4)
        )
        delta = np_eps_p(a @ w, rho, 2.0)
        for _ in range(3):
            moved = delta + np_eps_p(a @ (w + delta), rho, 2.0)
            delta = moved * min(1.0, rho / np.linalg.norm(moved))
            assert np.linalg.norm(delta) <= rho * (1 + 1e-12)
        # The result is the 4th evaluation, at the 3rd re-projected perturbation.
        np.testing.assert_allclose(np.asarray(grads[0][0]), a @ (w + delta), rtol=1e-12)
        np.testing.assert_allclose(float(value), 0.5 * (w + delta) @ a @ (w + delta), rtol=1e-12)


def test_second_order_term_is_hessian_times_jacobian_transpose():
    # p = 2: d eps/dw = rho (I/|g| - g g^T/|g|^3) H, the term is its transpose times v.
    with jax.enable_x64(True):
        probs, params, objective = _problems(1)
        sel = select(params, None)
        w = flat(params)
        g = probs[0].np_grad(w)
        v = np.random.default_rng(2).normal(size=9)
        ascent = Ascent(second_order=True, eps=0.0)
        term = _stages.second_order_term(
            objective,
            sel,
            params,
            [sel.take(objective.grads[0])],
            [sel.take(unflat(v, params))],
            jnp.float64(0.3),
            ascent,
            (),
        )
        n = np.linalg.norm(g)
        jac = 0.3 * (np.eye(9) / n - np.outer(g, g) / n**3) @ probs[0].np_hess(w)
        np.testing.assert_allclose(_np(term), jac.T @ v, rtol=1e-10)


def test_mean_over_groups():
    grads = [[jnp.array([1.0, 2.0], jnp.bfloat16)], [jnp.array([3.0, 6.0], jnp.bfloat16)]]
    (out,) = _stages.mean_over_groups(grads, jnp.float32)
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out), [2.0, 4.0])


@pytest.mark.parametrize("sync", [False, True])
def test_sam_gradient_wires_the_stages(sync):
    with jax.enable_x64(True):
        probs, params, objective = _problems(2)
        sel = select(params, MASK)
        out, info = _stages.sam_gradient(
            objective, params, sel, 0.2, Ascent(eps=0.0), sync_axes=() if sync else None
        )
        w = flat(params)
        sel_np = np.arange(9) >= 3

        def eps_for(g):
            return np.where(sel_np, 0.2 * g / np.linalg.norm(g[sel_np]), 0.0)

        g_mean = np.mean([pr.np_grad(w) for pr in probs], axis=0)
        perts = [eps_for(g_mean if sync else pr.np_grad(w)) for pr in probs]
        expected = np.mean([pr.np_grad(w + e) for pr, e in zip(probs, perts)], axis=0)
        np.testing.assert_allclose(_np(out), expected, rtol=1e-12)
        loss = np.mean([pr.np_loss(w + e) for pr, e in zip(probs, perts)])
        np.testing.assert_allclose(float(info.perturbed_loss), loss, rtol=1e-12)
        chex.assert_tree_all_finite(out)
