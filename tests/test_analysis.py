"""Sharpness, m-sharpness, Hessian spectra and landscapes against independent formulas."""

import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import sam_optax
from sam_optax import analysis

from helpers import QuarticProblem


def _quadratic(eigenvalues, seed=0):
    """L(w) = 1/2 w^T Q diag(lam) Q^T w with a random rotation Q (float64)."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(len(eigenvalues),) * 2))
    a = jnp.asarray(q @ np.diag(eigenvalues) @ q.T)
    return lambda w: 0.5 * w @ a @ w, a


# --------------------------------------------------------------------------
# Lanczos.
# --------------------------------------------------------------------------


def test_top_eigenvalues_of_a_known_spectrum_are_exact():
    with jax.enable_x64(True):
        lam = np.concatenate([[50.0, 20.0, 7.5, 3.0, 2.0], np.linspace(-1.0, 1.0, 35)])
        loss, _ = _quadratic(lam)
        got = analysis.hessian_top_eigenvalues(loss, jnp.zeros(40), k=5, num_iterations=40)
        np.testing.assert_allclose(got, [50.0, 20.0, 7.5, 3.0, 2.0], rtol=0, atol=1e-6)


def test_repeated_eigenvalues_are_found_through_restarts():
    # One Krylov space sees each distinct eigenvalue once; the restarts find
    # the multiplicities.
    with jax.enable_x64(True):
        lam = np.array([9.0, 9.0, 9.0, 4.0, 4.0, 1.0, 1.0, 1.0, 1.0, 0.5])
        loss, _ = _quadratic(lam, seed=1)
        got = analysis.hessian_top_eigenvalues(loss, jnp.zeros(10), k=6, num_iterations=10)
        np.testing.assert_allclose(got, [9, 9, 9, 4, 4, 1], atol=1e-6)


def _mlp_problem(seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(32, 4)))
    y = jnp.asarray(rng.normal(size=(32, 2)))
    params = {
        "w1": jnp.asarray(rng.normal(size=(4, 10)) * 0.8),
        "b1": jnp.asarray(rng.normal(size=(10,)) * 0.1),
        "w2": jnp.asarray(rng.normal(size=(10, 2)) * 0.8),
    }

    def loss(p, batch=(x, y)):
        h = jnp.tanh(batch[0] @ p["w1"] + p["b1"][None, :])
        return jnp.mean((h @ p["w2"] - batch[1]) ** 2)

    return params, loss, (x, y)


def test_top_eigenvalues_of_a_small_mlp_match_the_dense_hessian():
    with jax.enable_x64(True):
        params, loss, _ = _mlp_problem()
        vec, unravel = ravel_pytree(params)
        n = vec.size  # 70 parameters
        dense = jax.hessian(lambda v: loss(unravel(v)))(vec)  # built only here, in the test
        expected = np.linalg.eigvalsh(np.asarray(dense))[::-1][:5]
        got = analysis.hessian_top_eigenvalues(loss, params, k=5, num_iterations=45)
        assert n > 45
        np.testing.assert_allclose(got, expected, rtol=1e-4)


def test_hessian_averaged_over_batches():
    with jax.enable_x64(True):
        params, loss, (x, y) = _mlp_problem(1)
        batches = (x.reshape(4, 8, 4), y.reshape(4, 8, 2))
        as_list = [(x[i * 8 : (i + 1) * 8], y[i * 8 : (i + 1) * 8]) for i in range(4)]
        whole = analysis.hessian_top_eigenvalues(loss, params, k=3, num_iterations=70)
        stacked = analysis.hessian_top_eigenvalues(
            loss, params, k=3, batches=batches, num_iterations=70
        )
        listed = analysis.hessian_top_eigenvalues(
            loss, params, k=3, batches=as_list, num_iterations=70
        )
        np.testing.assert_allclose(stacked, whole, rtol=1e-8)
        np.testing.assert_allclose(listed, whole, rtol=1e-8)


def test_lanczos_iterates_inside_one_trace():
    calls = []
    params, loss, _ = _mlp_problem(2)

    def counting_loss(p):
        calls.append(1)
        return loss(p)

    analysis.hessian_top_eigenvalues(counting_loss, params, k=2, num_iterations=30)
    assert len(calls) <= 2  # traced once (no Python loop over the 30 iterations)


def test_spectral_density_puts_the_mass_where_the_eigenvalues_are():
    with jax.enable_x64(True):
        rng = np.random.default_rng(3)
        lam = np.concatenate([1.0 + 0.05 * rng.normal(size=30), 10.0 + 0.1 * rng.normal(size=20)])
        loss, _ = _quadratic(lam, seed=4)
        grid = jnp.linspace(-2.0, 14.0, 3201)
        grid, density, (_nodes, weights) = analysis.hessian_spectral_density(
            loss, jnp.zeros(50), num_iterations=50, num_draws=8, grid=grid, sigma=0.1
        )
        np.testing.assert_allclose(np.asarray(weights).sum(axis=1), 1.0, rtol=1e-8)
        dx = float(grid[1] - grid[0])
        density = np.asarray(density)
        mass = lambda lo, hi: density[(grid >= lo) & (grid <= hi)].sum() * dx  # noqa: E731
        assert abs(mass(-2, 14) - 1.0) < 1e-3
        assert abs(mass(0.3, 1.7) - 30 / 50) < 0.15
        assert abs(mass(9.0, 11.0) - 20 / 50) < 0.15
        assert mass(2.5, 8.0) < 1e-3


# --------------------------------------------------------------------------
# Sharpness.
# --------------------------------------------------------------------------


def test_one_step_sharpness_uses_the_core_direction():
    with jax.enable_x64(True):
        prob = QuarticProblem(0)
        w = prob.params
        eps = sam_optax.ascent_direction(jax.grad(prob.loss)(w), 0.2)
        expected = prob.loss(jax.tree.map(jnp.add, w, eps)) - prob.loss(w)
        np.testing.assert_allclose(analysis.sharpness(prob.loss, w, 0.2), expected, rtol=1e-12)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"norm": float("inf")}, {"norm": 3.0}, {"adaptive": True, "eta": 0.1}],
    ids=["p2", "inf", "p3", "adaptive"],
)
def test_more_ascent_steps_never_lower_on_a_convex_quadratic_and_stay_in_the_ball(kwargs):
    with jax.enable_x64(True):
        rng = np.random.default_rng(5)
        m = rng.normal(size=(12, 12))
        a = jnp.asarray(m @ m.T / 12 + 0.05 * np.eye(12))
        b = jnp.asarray(rng.normal(size=12))
        loss = lambda w: 0.5 * w @ a @ w + b @ w  # noqa: E731
        w = jnp.asarray(rng.normal(size=12))
        values = []
        for k in range(1, 7):
            eps = analysis.ascent_perturbation(loss, w, 0.5, k, **kwargs)
            values.append(float(loss(w + eps) - loss(w)))
            scaled = eps / (jnp.abs(w) + kwargs["eta"]) if kwargs.get("adaptive") else eps
            p = kwargs.get("norm", 2.0)
            assert float(jnp.linalg.norm(scaled, ord=p)) <= 0.5 * (1 + 1e-9)
        if kwargs.get("norm", 2.0) in (2.0, float("inf")):  # exact projections
            assert all(v2 >= v1 - 1e-12 for v1, v2 in itertools.pairwise(values)), values
        assert values[-1] >= values[0] - 1e-12


def test_m_sharpness_is_the_mean_of_group_sharpness():
    with jax.enable_x64(True):
        params, loss, (x, y) = _mlp_problem(6)
        got = analysis.m_sharpness(loss, params, (x, y), 0.1, m=8, ascent_steps=2)
        by_hand = np.mean(
            [
                float(
                    analysis.sharpness(
                        lambda p, i=i: loss(p, (x[i : i + 8], y[i : i + 8])), params, 0.1, 2
                    )
                )
                for i in range(0, 32, 8)
            ]
        )
        np.testing.assert_allclose(got, by_hand, rtol=1e-10)
        whole = analysis.m_sharpness(loss, params, (x, y), 0.1, m=32)
        np.testing.assert_allclose(whole, analysis.sharpness(loss, params, 0.1), rtol=1e-10)
        with pytest.raises(ValueError, match="must divide"):
            analysis.m_sharpness(loss, params, (x, y), 0.1, m=5)


# --------------------------------------------------------------------------
# Landscapes.
# --------------------------------------------------------------------------


def test_filter_normalized_direction():
    params = {
        "conv": {"kernel": jax.random.normal(jax.random.key(0), (3, 3, 4, 6)), "bias": jnp.ones(6)},
        "dense": {"kernel": jax.random.normal(jax.random.key(1), (24, 5)) * 3, "bias": jnp.ones(5)},
        "bn": {"scale": jnp.full((6,), 2.0)},
    }
    d = analysis.filter_normalized_direction(jax.random.key(2), params)
    for name in ("conv", "dense"):
        w, dk = np.asarray(params[name]["kernel"]), np.asarray(d[name]["kernel"])
        axes = tuple(range(w.ndim - 1))
        np.testing.assert_allclose(np.sqrt((dk**2).sum(axes)), np.sqrt((w**2).sum(axes)), rtol=1e-5)
        assert not np.allclose(dk, w)  # a random direction, not the weights
        assert np.all(np.asarray(d[name]["bias"]) == 0)
    assert np.all(np.asarray(d["bn"]["scale"]) == 0)
    d_all = analysis.filter_normalized_direction(jax.random.key(2), params, ignore_1d=False)
    np.testing.assert_allclose(
        np.linalg.norm(d_all["bn"]["scale"]), np.linalg.norm(params["bn"]["scale"]), rtol=1e-5
    )


def test_landscapes_evaluate_the_loss_along_the_directions():
    params, loss, _ = _mlp_problem(7)
    d1 = analysis.filter_normalized_direction(jax.random.key(0), params)
    d2 = analysis.filter_normalized_direction(jax.random.key(1), params)
    alphas, losses = analysis.loss_landscape_1d(
        loss, params, d1, alphas=jnp.array([-0.5, 0.0, 0.25])
    )
    for a, value in zip(np.asarray(alphas), np.asarray(losses)):
        direct = loss(jax.tree.map(lambda w, d, a=a: w + a * d, params, d1))
        np.testing.assert_allclose(value, direct, rtol=1e-5)
    a, _b, z = analysis.loss_landscape_2d(
        loss, params, (d1, d2), alphas=jnp.array([0.0, 0.5]), betas=jnp.array([-0.3, 0.0, 0.3])
    )
    assert z.shape == (2, 3)
    np.testing.assert_allclose(z[0, 1], loss(params), rtol=1e-6)
    direct = loss(jax.tree.map(lambda w, u, v: w + 0.5 * u + 0.3 * v, params, d1, d2))
    np.testing.assert_allclose(z[1, 2], direct, rtol=1e-5)


# --------------------------------------------------------------------------
# The paper's finding at small scale, through `sam-optax analyze`.
# --------------------------------------------------------------------------


@pytest.mark.slow
def test_sam_finds_a_flatter_minimum_than_sgd_on_digits(tmp_path, capsys):
    from sam_optax.program import cli

    common = ["train", "--epochs", "20", "--seed", "0", "--no-progress"]
    assert cli.main([*common, "--rho", "0", "--m", "batch", "--out", str(tmp_path / "sgd")]) == 0
    assert cli.main([*common, "--out", str(tmp_path / "sam")]) == 0  # rho 0.2, same init and data
    lam = {}
    for name in ("sgd", "sam"):
        args = ["analyze", str(tmp_path / name), "--examples", "256", "--iterations", "30"]
        if name == "sgd":
            args.append("--no-plots")
        assert cli.main(args) == 0
        lam[name] = json.loads((tmp_path / name / "analysis" / "analysis.json").read_text())
    assert lam["sam"]["lambda_max"] < lam["sgd"]["lambda_max"], lam
    assert lam["sam"]["sharpness_1_step"] < lam["sgd"]["sharpness_1_step"], lam
    for png in ("landscape_1d.png", "landscape_2d.png", "spectrum.png"):
        assert (tmp_path / "sam" / "analysis" / png).read_bytes()[:4] == b"\x89PNG"
    assert "lambda_max" in capsys.readouterr().out


def test_loops_unroll_on_cpu_exactly_for_convolutional_losses():
    from sam_optax.analysis._loops import resolve_unroll

    w = jnp.ones((3, 3, 1, 2))
    x = jnp.ones((1, 5, 5, 1))

    def conv_loss(w):
        y = jax.lax.conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return jnp.sum(y**2)

    nested = jax.jit(lambda w: jax.checkpoint(conv_loss)(w))
    assert jax.default_backend() == "cpu"
    assert resolve_unroll(None, conv_loss, w) is True
    assert resolve_unroll(None, nested, w) is True  # found inside sub-programs too
    assert resolve_unroll(None, lambda v: jnp.sum(jnp.tanh(v) ** 2), w) is False
    assert resolve_unroll(4, conv_loss, w) == 4
