"""The contract every method of the family is held to (the registry is ``tests/family.py``).

As optax's ``contrib/_common_test.py`` holds every contrib optimizer: each
test runs for every method of :data:`family.METHODS`, so a new method is one
registry line from being checked for all of it.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from family import METHODS
from family import Problem
from family import run
from family import step_fn
from helpers import assert_trees_close
from helpers import assert_trees_equal
from helpers import flat

LR = 0.05
IDS = [m.name for m in METHODS]
each_method = pytest.mark.parametrize("method", METHODS, ids=IDS)


def _base():
    return optax.sgd(LR, momentum=0.9)


def _nbytes(tree) -> int:
    return sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree))


@each_method
def test_rho_zero_is_the_base_optimizer_bit_for_bit(method):
    problem = Problem(1)
    with_method = run(method, method.tx(0.0, _base()), problem, 4)[-1][0]
    base = run(method, _base(), problem, 4)[-1][0]
    assert_trees_equal(with_method, base)
    moved = run(method, method.tx(0.1, _base()), problem, 4)[-1][0]
    assert not np.allclose(flat(moved), flat(base))


@each_method
def test_a_mask_with_no_leaf_is_the_base_optimizer_bit_for_bit(method):
    problem = Problem(2)
    none = jax.tree.map(lambda _: False, problem.params)
    with_method = run(method, method.tx(0.1, _base(), mask=none), problem, 3)[-1][0]
    assert_trees_equal(with_method, run(method, _base(), problem, 3)[-1][0])


@each_method
def test_a_zero_gradient_stays_finite(method):
    # Zero params and zero targets: every gradient, clean and perturbed, is 0.
    problem = Problem(3)
    problem.params = jax.tree.map(jnp.zeros_like, problem.params)
    tx = method.tx(0.1, _base())
    step = step_fn(method, tx)
    params, state = problem.params, tx.init(problem.params)
    x, y = problem.batch(0)
    for _ in range(3):  # later steps reuse stored state (looksam, fsam, vasso, msam)
        params, state = step(params, state, (x, jnp.zeros_like(y)))
        chex.assert_tree_all_finite(params)


@each_method
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
def test_half_precision_params_keep_their_dtype(method, dtype):
    problem = Problem(4, dtype=dtype)
    for params, state in run(method, method.tx(0.1, _base()), problem, 3):
        chex.assert_trees_all_equal_dtypes(params, problem.params)
        chex.assert_tree_all_finite(params)
        assert np.isfinite(float(optax.tree.get(state, "grad_norm"))) or method.name == "msam"


@each_method
def test_a_jitted_step_traces_once(method):
    problem = Problem(5)
    tx = method.tx(0.1, _base())
    traces = []

    @jax.jit
    def step(params, state, batch):
        traces.append(1)
        per = lambda p: problem.per_example(p, batch)  # noqa: E731
        grads = jax.grad(lambda p: jnp.mean(per(p)))(params)
        updates, state = method.update(tx, grads, state, params, per)
        return optax.apply_updates(params, updates), state

    params, state = problem.params, tx.init(problem.params)
    for t in range(3):
        params, state = step(params, state, problem.batch(t))
    assert len(traces) == 1


@each_method
def test_inject_hyperparams_steps_with_the_values_in_the_state(method):
    # Injected: the same steps as the factory; then rho set to 0.3 in the
    # state: the same steps as the factory built with 0.3.
    problem = Problem(6)
    want = run(method, method.tx(0.1, _base()), problem, 3)
    got = run(method, method.injected(0.1, _base()), problem, 3)
    for (a, _), (b, _) in zip(got, want):
        assert_trees_close(a, b, rtol=1e-6, atol=1e-7)
    tx = method.injected(0.1, _base())
    state = tx.init(problem.params)
    optax.tree.get(state, "hyperparams")["rho"] = jnp.asarray(0.3, jnp.float32)
    step, params = step_fn(method, tx), problem.params
    for t, (b, _) in enumerate(run(method, method.tx(0.3, _base()), problem, 3)):
        params, state = step(params, state, problem.batch(t))
        assert_trees_close(params, b, rtol=1e-6, atol=1e-7)


@each_method
def test_masked_leaves_are_never_perturbed(method):
    # Every evaluation of the closure sees the masked-out leaves at their
    # clean values, bit for bit; the others move.
    problem = Problem(7)
    mask = {"hidden": True, "out": False}
    tx = method.tx(0.2, _base(), mask=mask)
    seen = []

    @jax.jit
    def step(params, state, batch):
        def per(p):
            jax.debug.callback(lambda o, h: seen.append((o, h)), p["out"]["w"], p["hidden"]["w"])
            return problem.per_example(p, batch)

        grads = jax.grad(lambda p: jnp.mean(problem.per_example(p, batch)))(params)
        updates, state = method.update(tx, grads, state, params, per)
        return optax.apply_updates(params, updates), state

    params, state = problem.params, tx.init(problem.params)
    moved = False
    for t in range(4):
        seen.clear()
        new_params, state = step(params, state, problem.batch(t))
        jax.effects_barrier()
        for out_w, hidden_w in seen:
            np.testing.assert_array_equal(out_w, np.asarray(params["out"]["w"]))
            moved |= not np.array_equal(hidden_w, np.asarray(params["hidden"]["w"]))
        params = new_params
    assert moved


@each_method
def test_the_state_stores_only_what_the_method_keeps(method):
    problem = Problem(8)
    params = {"w": jnp.zeros((64, 64)), "b": jnp.zeros(64)}
    problem.params = params
    state = method.tx(0.1, _base()).init(params)
    extra = _nbytes(state) - _nbytes(_base().init(params))
    # A count, a key, five diagnostics and a few scalars of the method's own.
    assert extra <= method.stored * _nbytes(params) + 64, (method.name, extra)


@each_method
def test_unknown_and_refused_options_are_named(method):
    with pytest.raises(TypeError, match="normm"):
        method.tx(0.1, _base(), normm=2.0)
    for option in method.refuses:
        value = {"norm": 3.0, "eta": 0.5, "ascent_steps": 2, "direction": "random", "seed": 1}
        with pytest.raises(TypeError, match=option):
            method.tx(0.1, _base(), **{option: value.get(option, True)})


# A value other than the default for each option that one step on one device exercises.
OPTIONS = {
    "norm": 3.0,
    "adaptive": True,
    "eta": 0.05,
    "ascent_steps": 2,
    "second_order": True,
    "mask": {"hidden": True, "out": False},
    "eps": 1e-8,
    "direction": "random",
    "seed": 3,
    "cosine": True,
    "has_aux": True,
}


@each_method
def test_every_option_it_takes_runs(method):
    # One value other than the default of each option it takes, two steps each.
    problem = Problem(9)
    per = lambda p: problem.per_example(p, problem.batch(0))  # noqa: E731
    grads = jax.grad(lambda p: jnp.mean(per(p)))(problem.params)
    for option, value in OPTIONS.items():
        if not method.accepts(option):
            continue
        tx = method.tx(0.1, _base(), **{option: value})
        closure = per if method.per_example else (lambda p: jnp.mean(per(p)))
        if option == "has_aux":
            closure = (lambda f: lambda p: (f(p), {"aux": 1.0}))(closure)
        state = tx.init(problem.params)
        for _ in range(2):
            updates, state = tx.update(grads, state, problem.params, value_fn=closure)
            chex.assert_tree_all_finite(updates)
        if option == "cosine" and bool(optax.tree.get(state, "sam_step")):
            assert np.isfinite(float(optax.tree.get(state, "cosine"))), method.name


# --------------------------------------------------------------------------
# Per-device perturbations on 8 devices.
# --------------------------------------------------------------------------


def _sharded_first_update(method, tx, params, batch):
    """The first update under ``jax.shard_map`` over 8 devices, batch split along 'd'."""
    mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))

    def body(params, state, x, y):
        local = jax.lax.pcast(params, ("d",), to="varying")

        def per(p):
            return Problem.per_example(p, (x, y))

        (_, losses), grads = jax.value_and_grad(lambda p: (jnp.mean(per(p)), per(p)), has_aux=True)(
            local
        )
        return method.update(tx, grads, state, params, per, losses)

    mapped = jax.shard_map(body, mesh=mesh, in_specs=(P(), P(), P("d"), P("d")), out_specs=P())
    return jax.jit(mapped)(params, tx.init(params), *batch)[0]


@each_method
def test_each_device_perturbs_with_its_own_gradient(method):
    # The first update on 8 devices is the mean of the 8 single-device updates
    # on the devices' shards (each perturbs with its own gradient), not the
    # update of one perturbation shared by all.
    with jax.enable_x64(True):
        problem = Problem(10, dtype=jnp.float64, batch=32)
        x, y = problem.batch(0)
        base = _base()  # its first step is linear in the gradient: the mean commutes with it
        tx = method.tx(0.2, base, always=True, axis_name="d")
        sharded = _sharded_first_update(method, tx, problem.params, (x, y))
        single = method.tx(0.2, base, always=True)

        @jax.jit
        def single_update(shard):
            def per(p):
                return problem.per_example(p, shard)

            (_, losses), grads = jax.value_and_grad(
                lambda p: (jnp.mean(per(p)), per(p)), has_aux=True
            )(problem.params)
            state = single.init(problem.params)
            return method.update(single, grads, state, problem.params, per, losses)[0]

        updates = [single_update((x[4 * d : 4 * d + 4], y[4 * d : 4 * d + 4])) for d in range(8)]
        mean = jax.tree.map(lambda *u: sum(u) / 8, *updates)
        assert_trees_close(sharded, mean, rtol=1e-9, atol=1e-12)
        if method.accepts("sync_perturbation"):
            synced = _sharded_first_update(
                method,
                method.tx(0.2, base, always=True, axis_name="d", sync_perturbation=True),
                problem.params,
                (x, y),
            )
            assert not np.allclose(flat(synced), flat(mean), rtol=1e-6)


@each_method
def test_diagnostics_are_recorded_where_the_sam_branch_ran(method):
    # A SAM step measures; a cheap step keeps the last SAM step's values (a NaN
    # in a per-step log reads as divergence); NaN only before the first one.
    history = run(method, method.tx(0.1, _base()), Problem(11), 6)
    flags = [bool(optax.tree.get(state, "sam_step")) for _, state in history]
    last = {"sharpness": np.nan, "perturbed_loss": np.nan}
    for (_, state), flag in zip(history, flags):
        for name in last:
            value = float(optax.tree.get(state, name))
            if flag:
                assert np.isfinite(value), name
                assert value != last[name], name  # measured anew
            else:
                np.testing.assert_equal(value, last[name])
            last[name] = value
        grad_norm = float(optax.tree.get(state, "grad_norm"))
        assert grad_norm > 0 or (method.name == "msam" and np.isnan(grad_norm))
        for leaf in jax.tree.leaves(optax.tree.get(state, "diagnostics")):
            assert np.size(leaf) == 1
    assert any(flags)


# --------------------------------------------------------------------------
# Donation: no two leaves of a state are one buffer.
# --------------------------------------------------------------------------


def _buffers(tree):
    return [x.unsafe_buffer_pointer() for x in jax.tree.leaves(tree) if isinstance(x, jax.Array)]


def _ms(tx, k=2):
    """``optax.MultiSteps`` as a ``GradientTransformationExtraArgs`` (its ``update`` forwards them)."""
    multi = optax.MultiSteps(tx, k)
    return optax.GradientTransformationExtraArgs(multi.init, multi.update)


def _nestings(method):
    """The method as users compose it: alone, injected, and both nestings of MultiSteps.

    ``sampa`` refuses a ``MultiSteps`` base (``tests/test_sampa.py``): no inside nesting.
    """
    nestings = {
        "plain": method.tx(0.1, _base()),
        "injected": method.injected(0.1, _base()),
        "multisteps_outside": _ms(method.tx(0.1, _base())),
    }
    inner_ms = optax.MultiSteps(_base(), 2).gradient_transformation()
    if method.name != "sampa":
        nestings["multisteps_inside"] = (
            method.factory(inner_ms, 0.1, **method.hyper)
            if method.wraps
            else optax.chain(method.factory(0.1, **method.hyper), inner_ms)
        )
    return nestings


@each_method
def test_state_leaves_are_distinct_buffers(method):
    problem = Problem(12)
    per = lambda p: problem.per_example(p, problem.batch(0))  # noqa: E731
    grads = jax.grad(lambda p: jnp.mean(per(p)))(problem.params)
    for name, tx in _nestings(method).items():
        state = tx.init(problem.params)
        seen = _buffers(state)
        assert len(set(seen)) == len(seen), (name, "init")
        assert not set(seen) & set(_buffers(problem.params)), (name, "a params buffer")
        _, state = method.update(tx, grads, state, problem.params, per)  # outside jit
        seen = _buffers(state)
        assert len(set(seen)) == len(seen), (name, "after an eager step")


@each_method
def test_state_is_donated_to_a_jitted_step(method):
    # XLA refuses a buffer donated twice ("Attempt to donate the same buffer
    # twice"): params and state donated, three steps, every nesting.
    problem = Problem(13)
    for name, tx in _nestings(method).items():

        def step(params, state, batch, tx=tx):
            per = lambda p: problem.per_example(p, batch)  # noqa: E731
            grads = jax.grad(lambda p: jnp.mean(per(p)))(params)
            updates, state = method.update(tx, grads, state, params, per)
            return optax.apply_updates(params, updates), state

        donated = jax.jit(step, donate_argnums=(0, 1))
        params = jax.tree.map(jnp.copy, problem.params)
        state = tx.init(params)
        for t in range(2):
            params, state = donated(params, state, problem.batch(t))
        chex.assert_tree_all_finite(params)
        if name == "plain":  # donation changes no number
            want, want_state = problem.params, tx.init(problem.params)
            for t in range(2):
                want, want_state = jax.jit(step)(want, want_state, problem.batch(t))
            assert_trees_equal(params, want)


@each_method
def test_state_is_donated_by_nnx_jit_through_nnx_optimizer(method):
    # The large-model client's step: an NNX model and its nnx.Optimizer, both
    # donated to nnx.jit, the closure from sam_optax.flax.nnx_value_and_grad.
    from flax import nnx

    from sam_optax.flax import nnx_value_and_grad
    from sam_optax.flax import nnx_value_fn

    x, y = Problem(14).batch(0)

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.hidden = nnx.Linear(5, 8, rngs=rngs)
            self.out = nnx.Linear(8, 3, rngs=rngs)

        def __call__(self, x):
            return self.out(jnp.tanh(self.hidden(x)))

    def per_example(model, x, y):
        return jnp.sum((model(x) - y) ** 2, axis=-1)

    def mean_loss(model, x, y):
        return jnp.mean(per_example(model, x, y))

    @nnx.jit(donate_argnames=("model", "optimizer"))
    def step(model, optimizer, x, y):
        if method.per_example:  # ESAM: the closure returns the per-example losses
            value_fn = nnx_value_fn(model, per_example, x, y)
            loss, grads = nnx.value_and_grad(mean_loss)(model, x, y)
            optimizer.update(model, grads, value_fn=value_fn)
        else:
            loss, grads, value_fn = nnx_value_and_grad(mean_loss)(model, x, y)
            optimizer.update(model, grads, value_fn=value_fn, value=loss)
        return loss

    model = Net(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, method.tx(0.1, _base()), wrt=nnx.Param)
    losses = [float(step(model, optimizer, x, y)) for _ in range(4)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert int(optimizer.step[...]) == 4
