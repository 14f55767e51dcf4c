"""SAMPa's parallel form against its one-device form, and what it refuses.

The authors' code is reproduced in ``tests/test_authors.py``; the contract in
``tests/test_contract.py`` (the registry has ``sampa``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import sam_optax
from sam_optax import parallel

from helpers import assert_trees_close

RHO, LAM, LR = 0.2, 0.3, 0.05


def _problem(seed=0):
    rng = np.random.default_rng(seed)
    params = {
        "w1": jnp.asarray(rng.normal(size=(6, 8)) / np.sqrt(6), jnp.float32),
        "w2": jnp.asarray(rng.normal(size=(8, 3)) / np.sqrt(8), jnp.float32),
    }
    batches = [
        (
            jnp.asarray(rng.normal(size=(16, 6)), jnp.float32),
            jnp.asarray(rng.normal(size=(16, 3)), jnp.float32),
        )
        for _ in range(4)
    ]
    return params, batches


def loss(params, batch):
    x, y = batch
    return jnp.mean((jnp.tanh(x @ params["w1"]) @ params["w2"] - y) ** 2)


def _tx():
    base = optax.chain(optax.add_decayed_weights(1e-3), optax.sgd(LR, momentum=0.9))
    return sam_optax.sampa(base, RHO, LAM)


def _one_device(params, batches):
    """The one-device form: both gradients in sequence, the previous batch's closure given."""
    tx = _tx()

    @jax.jit
    def step(params, state, now, before):
        updates, state = tx.update(
            jax.tree.map(jnp.zeros_like, params),
            state,
            params,
            value_fn=lambda p: loss(p, now),
            previous_value_fn=lambda p: loss(p, before),
        )
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for t, batch in enumerate(batches):
        params, state = step(params, state, batch, batches[max(t - 1, 0)])
    return params, state


def _pair_mesh(n, model=1):
    devices = np.asarray(jax.devices()[: n * model]).reshape(n, model)
    return jax.sharding.Mesh(devices, ("pair", "model"), axis_types=(AxisType.Auto,) * 2)


@pytest.mark.parametrize("n", [2, 4, 8])
def test_the_parallel_form_equals_the_one_device_form(n):
    params, batches = _problem()
    want, want_state = _one_device(params, batches)
    mesh = _pair_mesh(n)
    tx = _tx()
    step = parallel.sampa_step(loss, tx, mesh, axis_name="pair")
    p, s = parallel.replicate(params, mesh), parallel.replicate(tx.init(params), mesh)
    previous = None
    for batch in batches:
        p, s, value = step(p, s, batch, previous_batch=previous)
        previous = batch
    assert_trees_close(p, want, rtol=2e-5, atol=2e-6)
    direction = optax.tree.get(s, "direction")
    assert_trees_close(direction, optax.tree.get(want_state, "direction"), rtol=2e-5, atol=2e-6)
    assert np.isfinite(float(value))


def test_model_sharded_params_keep_their_shardings():
    params, batches = _problem(1)
    want, _ = _one_device(params, batches)
    mesh = _pair_mesh(2, model=4)
    tx = _tx()
    specs = {"w1": P(None, "model"), "w2": P("model", None)}
    state = tx.init(params)
    p = parallel.place(params, mesh, specs)
    s = parallel.place(state, mesh, parallel.state_specs(tx, state, specs))
    step = parallel.sampa_step(loss, tx, mesh, axis_name="pair")
    previous = None
    for batch in batches:
        p, s, _ = step(p, s, batch, previous_batch=previous)
        previous = batch
    assert_trees_close(p, want, rtol=2e-5, atol=2e-6)
    assert p["w1"].sharding.spec == P(None, "model")
    memory = step.lower(p, s, batches[0]).compile().memory_analysis()
    assert memory.temp_size_in_bytes > 0


def test_bad_input_is_refused_naming_the_fix():
    params, batches = _problem()
    odd = jax.make_mesh((3,), ("pair",), devices=jax.devices()[:3])
    with pytest.raises(ValueError, match="its size must be even"):
        parallel.sampa_step(loss, _tx(), odd, axis_name="pair")
    mesh = _pair_mesh(4)
    with pytest.raises(ValueError, match="must name one axis"):
        parallel.sampa_step(loss, _tx(), mesh, axis_name="data")
    sam = optax.chain(sam_optax.sam(0.1, axis_name="pair"), optax.sgd(0.1))
    step = parallel.sampa_step(loss, sam, mesh, axis_name="pair")
    with pytest.raises(ValueError, match=r"tx = sam_optax.sampa\("):
        step(params, sam.init(params), batches[0])
    step = parallel.sampa_step(loss, _tx(), mesh, axis_name="pair", donate=False)
    with pytest.raises(ValueError, match="do not split over the 2 devices"):
        step(params, _tx().init(params), (batches[0][0][:5], batches[0][1][:5]))
    # A short last batch after a full one: each half takes one of them.
    short = (batches[1][0][:8], batches[1][1][:8])
    with pytest.raises(ValueError, match="previous_batch has 16 examples and batch 8"):
        step(params, _tx().init(params), short, previous_batch=batches[0])
    tx = _tx()
    with pytest.raises(TypeError, match="value_fn"):
        tx.update(params, tx.init(params), params)
    with pytest.raises(TypeError, match=r"sampa wraps the base optimizer"):
        sam_optax.sampa(0.1)
    # Accumulation: y's would-be step is zero on MultiSteps' micro-batches.
    for accumulating in (
        optax.MultiSteps(optax.sgd(LR), 2).gradient_transformation(),
        optax.chain(
            optax.clip_by_global_norm(1.0),
            optax.MultiSteps(optax.sgd(LR), 2).gradient_transformation(),
        ),
    ):
        with pytest.raises(ValueError, match="Gradient accumulation is not supported with sampa"):
            sam_optax.sampa(accumulating).init(params)


def test_the_first_step_is_the_base_step_and_later_ones_differ_from_sam():
    # No previous gradient: x~ = y = x, so step 0 is the base step on grad f(x_0).
    params, batches = _problem(2)
    base = optax.sgd(LR)
    tx = sam_optax.sampa(base, RHO, LAM)
    grads = jax.grad(loss)(params, batches[0])
    first, state = tx.update(grads, tx.init(params), params, value_fn=lambda p: loss(p, batches[0]))
    want, _ = base.update(grads, base.init(params))
    assert_trees_close(first, want, rtol=1e-6)
    assert float(optax.tree.get(state, "grad_norm")) > 0
