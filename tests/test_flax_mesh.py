"""Per-device SAM for an NNX model and its nnx.Optimizer on a ('data', 'model') mesh.

The model is built the way the Flax GSPMD guide builds its ``DotReluDot``:
weights annotated with ``nnx.with_partitioning`` over ``'model'``, the
activation constrained inside ``__call__``, the state placed by
``jax.lax.with_sharding_constraint`` in an ``nnx.jit`` function under
``jax.set_mesh``. Here it also has BatchNorm and dropout, for the paper's
per-device semantics.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import sam_optax
from sam_optax import parallel
from sam_optax.flax import nnx_shard_map_step

from helpers import assert_trees_close

RHO, LR, DEPTH = 0.1, 0.05, 16
GUIDE = P("data", "model")  # the guide's constraint
EDITED = P(P.UNCONSTRAINED, "model")  # the edit the library names


class DotReluDot(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, constraint=EDITED, dropout: float = 0.0):
        init = nnx.initializers.lecun_normal()
        self.dot1 = nnx.Linear(
            DEPTH,
            DEPTH,
            kernel_init=nnx.with_partitioning(init, (None, "model")),
            use_bias=False,
            rngs=rngs,
        )
        self.w2 = nnx.Param(
            nnx.with_partitioning(init, ("model", None))(rngs.params(), (DEPTH, DEPTH))
        )
        self.bn = nnx.BatchNorm(DEPTH, momentum=0.9, rngs=rngs)
        self.drop = nnx.Dropout(dropout, rngs=rngs)
        self.constraint = constraint

    def __call__(self, x):
        y = jax.nn.relu(self.dot1(x))
        y = jax.lax.with_sharding_constraint(y, self.constraint)
        y = self.drop(y)
        return self.bn(y @ self.w2[...])


def loss_fn(model, batch):
    x, y = batch
    return jnp.mean((model(x) - y) ** 2)


def _mesh(kind=AxisType.Auto):
    return jax.make_mesh((2, 4), ("data", "model"), axis_types=(kind, kind))


def _sharded_model(mesh, **kwargs):
    with jax.set_mesh(mesh):

        @nnx.jit
        def create():
            model = DotReluDot(nnx.Rngs(0, dropout=1), **kwargs)
            state = nnx.state(model)
            nnx.update(
                model, jax.lax.with_sharding_constraint(state, nnx.get_partition_spec(state))
            )
            return model

        return create()


def _batch(seed=0, size=16):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(size, DEPTH)).astype(np.float32)
    y = rng.normal(size=(size, DEPTH)).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(y)


def _tx(axis_name="data"):
    return optax.chain(sam_optax.sam(RHO, axis_name=axis_name), optax.sgd(LR))


def _per_replica_reference(params, rest, graphdef, batch, replicas=2):
    """A hand-written SAM step: each replica's own eps and SAM gradient, their mean, SGD.

    Returns the new params and the mean of the replicas' clean-pass BatchNorm statistics.
    """

    def pass_(p, shard):
        model = nnx.merge(graphdef, p, rest)
        loss = loss_fn(model, shard)
        return loss, nnx.as_pure(nnx.state(model, nnx.BatchStat))

    x, y = batch
    m = x.shape[0] // replicas
    sam_grads, stats = [], []
    for r in range(replicas):
        shard = (x[r * m : (r + 1) * m], y[r * m : (r + 1) * m])
        (_, stat), g = jax.value_and_grad(pass_, has_aux=True)(params, shard)
        norm = jnp.sqrt(sum(jnp.sum(v**2) for v in jax.tree.leaves(g)))
        point = jax.tree.map(lambda w, v, n=norm: w + RHO * v / (n + 1e-12), params, g)
        sam_grads.append(jax.grad(lambda p, shard=shard: pass_(p, shard)[0])(point))
        stats.append(stat)
    mean = jax.tree.map(lambda *v: sum(v) / replicas, *sam_grads)
    return (
        jax.tree.map(lambda w, v: w - LR * v, params, mean),
        jax.tree.map(lambda *v: sum(v) / replicas, *stats),
    )


def test_the_guides_constraint_over_the_data_axis_is_refused_with_the_edit():
    mesh = _mesh()
    model = _sharded_model(mesh, constraint=GUIDE)
    optimizer = nnx.Optimizer(model, _tx(), wrt=nnx.Param)
    step = nnx_shard_map_step(loss_fn, mesh)
    with pytest.raises(ValueError, match=r"write P\(P.UNCONSTRAINED, 'model'\) where the model"):
        step(model, optimizer, parallel.shard_batch(_batch(), mesh))


def test_model_and_optimizer_go_in_and_come_out_updated_as_the_per_replica_reference():
    mesh = _mesh()
    model = _sharded_model(mesh)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = nnx.as_pure(params), nnx.as_pure(rest)
    host = jax.tree.map(jnp.copy, (params, rest))  # the step donates the model's arrays
    specs = jax.tree.map(lambda x: x.sharding.spec, params)
    optimizer = nnx.Optimizer(model, _tx(), wrt=nnx.Param)
    step = nnx_shard_map_step(loss_fn, mesh)
    batch = _batch(1)
    loss = step(model, optimizer, parallel.shard_batch(batch, mesh))

    with jax.set_mesh(mesh):  # the model's constraint names the mesh's axes
        want_params, want_stats = _per_replica_reference(*host, graphdef, batch)
        synced = _per_replica_reference(*host, graphdef, batch, 1)[0]
    got = nnx.as_pure(nnx.state(model, nnx.Param))
    assert_trees_close(got, want_params, rtol=2e-5, atol=2e-6)
    assert_trees_close(nnx.as_pure(nnx.state(model, nnx.BatchStat)), want_stats, rtol=2e-5)
    assert jax.tree.map(lambda x: x.sharding.spec, got) == specs  # shardings kept
    assert specs["dot1"]["kernel"] == P(None, "model")
    assert int(optimizer.step[...]) == 1
    assert np.isfinite(float(loss))
    # Per replica, not one perturbation for the batch: the synced step differs.
    assert not np.allclose(np.asarray(got["w2"]), np.asarray(synced["w2"]), rtol=1e-4)


def test_each_replica_draws_its_own_dropout_masks_and_the_stream_advances_once():
    mesh = _mesh()
    x, y = _batch(2, size=8)
    twice = (jnp.concatenate([x, x]), jnp.concatenate([y, y]))  # both replicas see x

    def one_step(rngs, batch):
        model = _sharded_model(mesh, dropout=0.5)
        optimizer = nnx.Optimizer(model, _tx(), wrt=nnx.Param)
        step = nnx_shard_map_step(loss_fn, mesh, donate=False)
        step(model, optimizer, parallel.shard_batch(batch, mesh), rngs)
        return model

    a = one_step(jax.random.key(3), twice)
    b = one_step(jax.random.key(3), twice)
    c = one_step(jax.random.key(4), twice)
    kernel = lambda m: np.asarray(m.w2[...])  # noqa: E731
    np.testing.assert_array_equal(kernel(a), kernel(b))
    assert not np.allclose(kernel(a), kernel(c))
    # Same data on both replicas: with one mask for both, each replica's step
    # would be the single-replica step on x; with a mask each, it is not.
    single_mesh = jax.make_mesh((1, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    model = _sharded_model(single_mesh, dropout=0.5)
    optimizer = nnx.Optimizer(model, _tx(), wrt=nnx.Param)
    nnx_shard_map_step(loss_fn, single_mesh)(model, optimizer, (x, y), jax.random.key(3))
    assert not np.allclose(kernel(a), kernel(model), rtol=1e-4)

    # Without rngs, the key comes from the model's own stream, advanced once a step.
    model = _sharded_model(mesh, dropout=0.5)
    optimizer = nnx.Optimizer(model, _tx(), wrt=nnx.Param)
    step = nnx_shard_map_step(loss_fn, mesh)
    for t in range(3):
        step(model, optimizer, parallel.shard_batch(twice, mesh))
        assert int(model.drop.rngs.count[...]) == t + 1


def test_groups_within_replicas_and_the_order_check_and_lower():
    mesh = _mesh()
    model = _sharded_model(mesh)
    optimizer = nnx.Optimizer(model, _tx(), wrt=nnx.Param)
    step = nnx_shard_map_step(loss_fn, mesh, group_size=4, has_aux=False)
    batch = parallel.shard_batch(_batch(3), mesh)
    temp = step.lower(model, optimizer, batch).compile().memory_analysis().temp_size_in_bytes
    assert temp > 0
    losses = [float(step(model, optimizer, batch)) for _ in range(4)]
    assert losses[-1] < losses[0]


def test_an_explicit_mesh_names_the_axis_types():
    mesh = _mesh(AxisType.Explicit)  # jax.make_mesh's default
    model = _sharded_model(_mesh(), constraint=P(None, "model"))
    optimizer = nnx.Optimizer(model, _tx(), wrt=nnx.Param)
    step = nnx_shard_map_step(loss_fn, mesh)
    with pytest.raises(ValueError, match=r"axis_types=\(jax.sharding.AxisType.Auto,\) \* 2"):
        step(model, optimizer, parallel.shard_batch(_batch(), mesh))


def test_sam_over_the_model_axis_names_the_data_axis():
    # The mesh has 'model', but the step maps 'data' alone: the fix is that name.
    mesh = _mesh()
    model = _sharded_model(mesh, constraint=P(None, "model"))
    optimizer = nnx.Optimizer(model, _tx("model"), wrt=nnx.Param)
    step = nnx_shard_map_step(loss_fn, mesh)
    with pytest.raises(ValueError, match=r"maps only \('data',\).*pass axis_name='data'"):
        step(model, optimizer, parallel.shard_batch(_batch(), mesh))


def test_sam_over_a_mesh_axis_under_plain_jit_names_shard_map():
    # No manual axis at all (plain jit with a mesh set): the fix is shard_map.
    tx = sam_optax.sam(RHO, axis_name="data")
    w = jnp.ones(3)
    update = jax.jit(lambda w: tx.update(w, tx.init(w), w, value_fn=lambda p: jnp.sum(p**2)))
    with jax.set_mesh(_mesh()), pytest.raises(ValueError, match=r"inside jax\.shard_map"):
        update(w)
