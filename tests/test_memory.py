"""Memory relations of a step, from XLA's own memory analysis (deterministic for a jaxlib).

The scratch of a jitted step with params and optimizer state donated
(``memory_analysis().temp_size_in_bytes``), in units of the params' bytes P,
on an MLP whose params dominate its activations. Nothing is run; the figures
are what the compiler plans. ``benchmarks/memory.py`` prints them all, for a
larger MLP and the benchmark CNN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from sam_optax import parallel

from family import METHODS

SIZES = (256, 1024, 1024, 10)
BATCH = 32
RHO = 0.05


def _problem():
    keys = jax.random.split(jax.random.key(0), len(SIZES))
    params = {
        f"dense{i}": {"w": jax.random.normal(k, (m, n)) / np.sqrt(m), "b": jnp.zeros(n)}
        for i, (k, m, n) in enumerate(zip(keys, SIZES[:-1], SIZES[1:]))
    }
    batch = (jax.random.normal(keys[-1], (BATCH, SIZES[0])), jnp.zeros(BATCH, jnp.int32))
    return params, batch


def _per_example(params, batch):
    x, y = batch
    for i in range(len(params) - 1):
        layer = params[f"dense{i}"]
        x = jax.nn.relu(x @ layer["w"] + layer["b"][None, :])
    last = params[f"dense{len(params) - 1}"]
    return optax.softmax_cross_entropy_with_integer_labels(x @ last["w"] + last["b"][None, :], y)


def _loss(params, batch):
    return jnp.mean(_per_example(params, batch))


PARAMS, BATCH_DATA = _problem()
P = sum(x.nbytes for x in jax.tree.leaves(PARAMS))


def _scratch(step, state) -> float:
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(PARAMS, state, BATCH_DATA).compile()
    return compiled.memory_analysis().temp_size_in_bytes / P


def _base():
    return optax.sgd(0.1, momentum=0.9)


def _method_step(method, tx):
    def step(params, state, batch):
        def per(p):
            return _per_example(p, batch)

        (_, losses), grads = jax.value_and_grad(lambda p: (jnp.mean(per(p)), per(p)), has_aux=True)(
            params
        )
        updates, state = method.update(tx, grads, state, params, per, losses)
        return optax.apply_updates(params, updates), state

    return step


def _hand_written(params, state, batch):
    g = jax.grad(_loss)(params, batch)
    n = optax.tree.norm(g)
    g2 = jax.grad(_loss)(jax.tree.map(lambda w, x: w + RHO * x / (n + 1e-12), params, g), batch)
    updates, state = _base().update(g2, state, params)
    return optax.apply_updates(params, updates), state


@pytest.fixture(scope="module")
def hand_written() -> float:
    return _scratch(_hand_written, _base().init(PARAMS))


@pytest.mark.parametrize("method", METHODS, ids=[m.name for m in METHODS])
def test_each_method_holds_what_its_maths_needs(method, hand_written):
    # The method's step, diagnostics on (value= passed), against the
    # hand-written SAM step plus what the method keeps alive at once.
    tx = method.tx(RHO, _base(), always=True)
    got = _scratch(_method_step(method, tx), tx.init(PARAMS))
    assert got <= hand_written + method.scratch, (method.name, got, hand_written)


def test_sams_step_is_the_hand_written_step(hand_written):
    tx = optax.chain(sam_optax.sam(RHO), _base())
    got = _scratch(_method_step(METHODS[0], tx), tx.init(PARAMS))
    assert abs(got - hand_written) <= 0.05, (got, hand_written)
    # The cosine, asked for, keeps g alive through the second pass.
    tx = optax.chain(sam_optax.sam(RHO, cosine=True), _base())
    with_cosine = _scratch(_method_step(METHODS[0], tx), tx.init(PARAMS))
    assert 0.9 <= with_cosine - got <= 1.1, (with_cosine, got)


def test_ascent_steps_hold_the_same_for_every_k(hand_written):
    figures = []
    for k in (2, 3, 5):
        tx = optax.chain(sam_optax.sam(RHO, ascent_steps=k), _base())
        figures.append(_scratch(_method_step(METHODS[0], tx), tx.init(PARAMS)))
    assert max(figures) - min(figures) <= 0.05, figures
    assert figures[0] <= hand_written + 1.1, figures  # delta and one evaluation


@pytest.mark.parametrize("base_rho", [RHO, 0.0], ids=["sam", "rho0"])
def test_grouped_steps_do_not_grow_with_the_groups(base_rho, hand_written):
    # m-sharpness on one device: the groups one after the other into one
    # running sum, so G = 16 holds what G = 2 holds: plain SAM + one buffer.
    tx = optax.chain(sam_optax.sam(base_rho), _base())
    figures = {}
    for groups in (2, 4, 16):
        step = parallel.grouped_step(_loss, tx, group_size=BATCH // groups)
        figures[groups] = _scratch(lambda p, s, b, step=step: step(p, s, b)[:2], tx.init(PARAMS))
    assert max(figures.values()) - min(figures.values()) <= 0.1, figures
    # rho = 0 (a plain baseline) sums the clean gradients: one group's and the sum.
    assert figures[16] <= hand_written + (1.1 if base_rho else 1.6), figures
