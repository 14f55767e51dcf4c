"""Equinox models: the value_fn closure the Equinox way (eqx.partition / eqx.combine)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import sam_optax

from helpers import assert_trees_close
from helpers import assert_trees_equal


def _problem(seed=0):
    model = eqx.nn.MLP(5, 3, width_size=16, depth=2, key=jax.random.key(seed))
    k1, k2 = jax.random.split(jax.random.key(seed + 1))
    x = jax.random.normal(k1, (32, 5))
    y = jax.random.randint(k2, (32,), 0, 3)
    return model, x, y


def _loss(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(jax.vmap(model)(x), y).mean()


def _train(tx, model, x, y, steps=3, sam=True):
    opt_state = tx.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(model, opt_state):
        params, static = eqx.partition(model, eqx.is_inexact_array)
        grads = eqx.filter_grad(_loss)(model, x, y)
        extra = {"value_fn": lambda p: _loss(eqx.combine(p, static), x, y)} if sam else {}
        updates, opt_state = tx.update(grads, opt_state, params, **extra)
        return eqx.apply_updates(model, updates), opt_state

    for _ in range(steps):
        model, opt_state = step(model, opt_state)
    return eqx.filter(model, eqx.is_inexact_array)


def test_equinox_rho_zero_is_the_plain_optax_step_bit_for_bit():
    model, x, y = _problem()
    base = lambda: optax.sgd(0.1, momentum=0.9)  # noqa: E731
    with_sam = _train(optax.chain(sam_optax.sam(0.0), base()), model, x, y)
    plain = _train(base(), model, x, y, sam=False)
    assert_trees_equal(with_sam, plain)


def test_equinox_sam_step_is_the_hand_written_one():
    model, x, y = _problem(1)
    rho, lr = 0.1, 0.5
    got = _train(optax.chain(sam_optax.sam(rho), optax.sgd(lr)), model, x, y, steps=1)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    g = eqx.filter_grad(_loss)(model, x, y)
    norm = jnp.sqrt(sum(jnp.sum(v**2) for v in jax.tree.leaves(g)))
    perturbed = jax.tree.map(lambda w, d: w + rho * d / norm, params, g)
    v = eqx.filter_grad(_loss)(eqx.combine(perturbed, static), x, y)
    expected = jax.tree.map(lambda w, d: w - lr * d, params, v)
    assert_trees_close(got, expected, rtol=1e-5, atol=1e-7)


def test_sam_on_mask_perturbs_the_normalization_layers_only():
    # The documented one-line mask: every leaf under a LayerNorm, nothing else.
    import equinox as eqx

    class Net(eqx.Module):
        dense: eqx.nn.Linear
        norm: eqx.nn.LayerNorm
        head: eqx.nn.Linear

        def __call__(self, x):
            return self.head(self.norm(jax.nn.relu(self.dense(x))))

    k1, k2 = jax.random.split(jax.random.key(0))
    model = Net(eqx.nn.Linear(4, 8, key=k1), eqx.nn.LayerNorm(8), eqx.nn.Linear(8, 3, key=k2))
    params = eqx.filter(model, eqx.is_inexact_array)
    is_norm = lambda x: isinstance(x, (eqx.nn.LayerNorm, eqx.nn.BatchNorm))  # noqa: E731
    mask = jax.tree.map(lambda x: jax.tree.map(lambda _: is_norm(x), x), params, is_leaf=is_norm)
    assert jax.tree.leaves(mask.norm) == [True, True]
    assert not any(jax.tree.leaves(mask.dense)) and not any(jax.tree.leaves(mask.head))
    x = jax.random.normal(jax.random.key(1), (16, 4))
    _, static = eqx.partition(model, eqx.is_inexact_array)

    def loss(p):
        return jnp.mean(jax.vmap(eqx.combine(p, static))(x) ** 2)

    tx = sam_optax.sam(0.5, mask=mask)
    g = jax.grad(loss)(params)
    out, _ = tx.update(g, tx.init(params), params, value_fn=loss)
    # Only the norm's params moved: the SAM gradient is the gradient at the
    # point where the norm's scale and bias alone are perturbed.
    eps = jax.tree.map(lambda gi, m: 0.5 * gi * m, g, mask)
    n = jnp.sqrt(sum(jnp.sum(e**2) for e in jax.tree.leaves(eps))) / 0.5
    moved = jax.tree.map(lambda w, e: w + e / n, params, eps)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(jax.grad(loss)(moved))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=1e-6)
