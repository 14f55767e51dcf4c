"""Each variant's per-device semantics on 8 devices (shard_map), against formulas per shard."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from parallel_problem import loss
from parallel_problem import make_batch
from parallel_problem import make_params

import sam_optax
from sam_optax import parallel

from helpers import assert_trees_close

RHO, LR, N = 0.1, 0.5, 8


def _shards(batch):
    x, y = batch
    m = len(x) // N
    return [(x[i * m : (i + 1) * m], y[i * m : (i + 1) * m]) for i in range(N)]


def _tree_mean(trees):
    return jax.tree.map(lambda *t: sum(t) / len(t), *trees)


def _norm(tree):
    return jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(tree)))


def _dot(a, b):
    return sum(jnp.sum(x * y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _axpy(alpha, x, y):
    return jax.tree.map(lambda a, b: alpha * a + b, x, y)


def _sam_grad(params, shard, direction=None):
    g = jax.grad(loss)(params, shard) if direction is None else direction
    return jax.grad(loss)(_axpy(RHO / _norm(g), g, params), shard)


def _steps(variant, steps):
    """``steps`` shard_map steps of chain(variant(axis 'data'), sgd) (or of a
    wrapper, given whole); params and states."""
    mesh = jax.make_mesh((N,), ("data",))
    tx = variant if isinstance(variant, _Whole) else optax.chain(variant, optax.sgd(LR))
    step = parallel.shard_map_step(loss, tx, mesh)
    params = parallel.replicate(make_params(), mesh)
    state = parallel.replicate(tx.init(make_params()), mesh)
    out = []
    for t in range(steps):
        params, state, _ = step(params, state, parallel.shard_batch(make_batch(10 + t), mesh))
        out.append((jax.tree.map(np.asarray, params), state))
    return out


class _Whole(optax.GradientTransformationExtraArgs):
    """A whole optimizer (a wrapper around its base), not chained with SGD."""


def _expected(direction_fn, steps):
    w, out = make_params(), []
    for t in range(steps):
        shards = _shards(make_batch(10 + t))
        w = _axpy(-LR, direction_fn(t, w, shards), w)
        out.append(w)
    return out


def _check(variant, direction_fn, steps=3):
    with jax.enable_x64(True):
        got = _steps(variant, steps)
        for (params, _), w in zip(got, _expected(direction_fn, steps)):
            assert_trees_close(params, w, rtol=1e-9)
        return got


def test_gsam_decomposes_per_device_then_averages():
    alpha = 0.5

    def direction(t, w, shards):
        outs = []
        for s in shards:
            g, gp = jax.grad(loss)(w, s), _sam_grad(w, s)
            perp = _axpy(-_dot(g, gp) / _dot(gp, gp), gp, g)
            outs.append(_axpy(-alpha, perp, gp))
        return _tree_mean(outs)

    _check(sam_optax.gsam(RHO, alpha, axis_name="data", eps=0.0), direction)


def test_looksam_perturbs_per_device_and_stores_the_averaged_direction():
    stored = {}

    def direction(t, w, shards):
        g = _tree_mean([jax.grad(loss)(w, s) for s in shards])
        if t % 2 == 0:
            gs = _tree_mean([_sam_grad(w, s) for s in shards])
            gv = _axpy(-_dot(gs, g) / _dot(g, g), g, gs)
            stored["v"] = jax.tree.map(lambda x: x / _norm(gv), gv)
            return gs
        return _axpy(0.7 * _norm(g), stored["v"], g)

    _check(sam_optax.looksam(RHO, every=2, axis_name="data", eps=0.0), direction, steps=4)


def test_msam_shares_the_momentum_perturbation_and_averages():
    # The direction is SGD's own trace of the averaged gradients, the same on
    # every device; SGD steps along that trace.
    d = {}

    def direction(t, w, shards):
        point = w if not d else _axpy(-0.3 / _norm(d["m"]), d["m"], w)
        g = _tree_mean([jax.grad(loss)(point, s) for s in shards])
        d["m"] = g if not d else _axpy(0.9, d["m"], g)
        return d["m"]

    tx = sam_optax.msam(optax.sgd(LR, momentum=0.9), 0.3, axis_name="data", eps=0.0)
    _check(_Whole(*tx), direction)


@pytest.mark.parametrize("factory", ["rst", "aesam"])
def test_switching_takes_one_branch_on_every_device(factory):
    variant = (
        sam_optax.rst(RHO, 0.5, axis_name="data", eps=0.0, seed=1)
        if factory == "rst"
        else sam_optax.aesam(RHO, threshold=0.3, axis_name="data", eps=0.0)
    )
    with jax.enable_x64(True):
        got = _steps(variant, 6)
    flags = [bool(optax.tree.get(s, "sam_step")) for _, s in got]
    assert 0 < sum(flags) < 6, flags
    stats = {}

    def direction(t, w, shards):
        grads = [jax.grad(loss)(w, s) for s in shards]
        if factory == "aesam":  # q is the device mean of |g_i|^2
            q = float(np.mean([_dot(g, g) for g in grads]))
            mean = q if t == 0 else 0.9 * stats["mean"] + 0.1 * q
            var = 0.0 if t == 0 else 0.9 * stats["var"] + 0.1 * (q - mean) ** 2
            stats.update(mean=mean, var=var)
            assert (q >= mean + 0.3 * np.sqrt(var)) == flags[t]
        if flags[t]:
            return _tree_mean([_sam_grad(w, s) for s in shards])
        return _tree_mean(grads)

    with jax.enable_x64(True):
        for (params, _), w in zip(got, _expected(direction, 6)):
            assert_trees_close(params, w, rtol=1e-9)


def test_fsam_directions_per_device_running_mean_of_the_average():
    sigma, lam = 0.7, 0.6
    m = {}

    def direction(t, w, shards):
        grads = [jax.grad(loss)(w, s) for s in shards]
        mean = _tree_mean(grads)
        if t == 0:
            out = _tree_mean([_sam_grad(w, s) for s in shards])
            m["m"] = mean
        else:
            dirs = [_axpy(-sigma, m["m"], g) for g in grads]
            out = _tree_mean([_sam_grad(w, s, d) for s, d in zip(shards, dirs)])
            m["m"] = _axpy(lam, m["m"], jax.tree.map(lambda x: (1 - lam) * x, mean))
        return out

    _check(sam_optax.fsam(RHO, sigma, decay=lam, axis_name="data", eps=0.0), direction)


def test_diagnostics_are_averaged_over_devices():
    with jax.enable_x64(True):
        ((_, state),) = _steps(sam_optax.sam(RHO, axis_name="data", eps=0.0), 1)
        w, shards = make_params(), _shards(make_batch(10))
        norms = [float(_norm(jax.grad(loss)(w, s))) for s in shards]
        np.testing.assert_allclose(
            float(optax.tree.get(state, "grad_norm")), np.mean(norms), rtol=1e-5
        )
        sharp = [
            float(loss(_axpy(RHO / _norm(g), g, w), s) - loss(w, s))
            for s in shards
            for g in [jax.grad(loss)(w, s)]
        ]
        np.testing.assert_allclose(
            float(optax.tree.get(state, "sharpness")), np.mean(sharp), rtol=1e-5
        )
