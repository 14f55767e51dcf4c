"""m-sharpness on 2-D meshes (data x model) and perturbations synced within groups of devices.

8 fake CPU devices, float64: each data replica perturbs with its own gradient
while its params are sharded over the model axis; the result equals one
device with one group per replica.
"""

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

RHO, LR = 0.1, 0.3


def _mesh(shape, names):
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names))


# --------------------------------------------------------------------------
# Problems: an MLP with tensor-parallel layers, a small transformer block.
# --------------------------------------------------------------------------


def _mlp(rng):
    params = {
        "w1": rng.normal(size=(8, 16)) * 0.5,
        "b1": rng.normal(size=16) * 0.1,
        "w2": rng.normal(size=(16, 3)) * 0.5,
    }

    def loss(p, batch):
        x, y = batch
        h = jnp.tanh(x @ p["w1"] + p["b1"][None, :])
        return jnp.mean((h @ p["w2"] - y) ** 2)

    x, y = rng.normal(size=(32, 8)), rng.normal(size=(32, 3))
    return params, loss, (x, y)


TP_MLP = {"w1": P(None, "model"), "b1": P("model"), "w2": P("model", None)}


def _transformer(rng, d=8, heads=2, seq=4):
    s = 1 / np.sqrt(d)
    params = {
        "ln": np.ones(d) + 0.1 * rng.normal(size=d),
        "wq": rng.normal(size=(d, d)) * s,
        "wk": rng.normal(size=(d, d)) * s,
        "wv": rng.normal(size=(d, d)) * s,
        "wo": rng.normal(size=(d, d)) * s,
        "up": rng.normal(size=(d, 4 * d)) * s,
        "down": rng.normal(size=(4 * d, d)) * s / 2,
    }

    def block(p, x):  # pre-norm attention and MLP with residuals
        h = x / jnp.sqrt(jnp.mean(x**2, -1, keepdims=True) + 1e-6) * p["ln"][None, None, :]
        q, k, v = ((h @ p[n]).reshape(*x.shape[:-1], heads, d // heads) for n in ("wq", "wk", "wv"))
        att = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d // heads), -1)
        x = x + jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(x.shape) @ p["wo"]
        return x + jax.nn.gelu(x @ p["up"]) @ p["down"]

    def loss(p, batch):
        x, y = batch
        return jnp.mean((block(p, x).mean(1) - y) ** 2)

    x, y = rng.normal(size=(32, seq, d)), rng.normal(size=(32, d))
    return params, loss, (x, y)


TP_BLOCK = {
    "ln": P(),
    "wq": P(None, "model"),
    "wk": P(None, "model"),
    "wv": P(None, "model"),
    "wo": P("model", None),
    "up": P(None, "model"),
    "down": P("model", None),
}


def _fsdp_specs(params, n=4):
    """FSDP within a replica: every leaf split over 'model' along its first axis that divides."""
    specs = {}
    for k, v in params.items():
        axes = [i for i, d in enumerate(np.shape(v)) if d % n == 0]
        specs[k] = P(*([None] * axes[0]), "model") if axes else P()
    return specs


def _on_mesh(mesh, params, loss, batch, specs, steps=2, sync=False):
    names = ("data", "sync") if sync else "data"
    tx = optax.chain(
        sam_optax.sam(RHO, axis_name=names, sync_perturbation="sync" if sync else False),
        optax.sgd(LR, momentum=0.9),
    )
    state = tx.init(params)
    placed = parallel.place(params, mesh, specs)
    placed_state = parallel.place(state, mesh, parallel.state_specs(tx, state, specs))
    step = parallel.shard_map_step(loss, tx, mesh, axis_name=names)
    for _ in range(steps):
        placed, placed_state, _ = step(
            placed, placed_state, parallel.shard_batch(batch, mesh, names)
        )
    return placed, placed_state


def _grouped(params, loss, batch, group_size, steps=2):
    tx = optax.chain(sam_optax.sam(RHO), optax.sgd(LR, momentum=0.9))
    step = parallel.grouped_step(loss, tx, group_size=group_size)
    state = tx.init(params)
    for _ in range(steps):
        params, state, _ = step(params, state, batch)
    return params


@pytest.mark.parametrize(
    "problem, specs, shape",
    [
        (_mlp, TP_MLP, (4, 2)),
        (_transformer, TP_BLOCK, (4, 2)),
        (_mlp, "fsdp", (2, 4)),
        (_transformer, "fsdp", (2, 4)),
        (_mlp, "fsdp", (1, 8)),  # one replica: no collective over the data axis
    ],
    ids=["mlp-tp-4x2", "block-tp-4x2", "mlp-fsdp-2x4", "block-fsdp-2x4", "mlp-fsdp-1x8"],
)
def test_sharded_params_per_replica_sam_equals_single_device_grouping(problem, specs, shape):
    with jax.enable_x64(True):
        params, loss, batch = problem(np.random.default_rng(0))
        specs = _fsdp_specs(params) if specs == "fsdp" else specs
        mesh = _mesh(shape, ("data", "model"))
        got, state = _on_mesh(mesh, params, loss, batch, specs)
        expected = _grouped(
            params, loss, batch, group_size=32 // shape[0] if shape[0] > 1 else None
        )
        assert_trees_close(jax.tree.map(np.asarray, got), expected, rtol=1e-12, atol=1e-14)
        # The params (and the momentum) come back with the shardings they went in with.
        for name, spec in specs.items():
            assert got[name].sharding.is_equivalent_to(
                jax.sharding.NamedSharding(mesh, spec), got[name].ndim
            ), (name, got[name].sharding)
        trace = state[1][0].trace
        for name, spec in specs.items():
            assert trace[name].sharding.is_equivalent_to(
                jax.sharding.NamedSharding(mesh, spec), trace[name].ndim
            ), (name, trace[name].sharding)
        # ... and per-replica perturbation is not the global-batch step.
        whole = _grouped(params, loss, batch, group_size=None)
        if shape[0] > 1:
            assert max(np.max(np.abs(np.asarray(got[k]) - whole[k])) for k in whole) > 1e-6


def test_place_and_state_specs():
    mesh = _mesh((4, 2), ("data", "model"))
    params = {"w": np.arange(12.0).reshape(3, 4), "b": np.zeros(4)}
    specs = {"w": P(None, "model"), "b": P()}
    placed = parallel.place(params, mesh, specs)
    assert placed["w"].sharding.spec == P(None, "model")
    np.testing.assert_array_equal(np.asarray(placed["w"]), params["w"])
    tx = optax.chain(sam_optax.looksam(0.1), optax.adam(1e-3))
    state = tx.init(params)
    st_specs = parallel.state_specs(tx, state, specs)
    assert st_specs[0].memory.direction == specs and st_specs[1][0].mu == specs
    assert st_specs[0].count == P() and st_specs[1][0].count == P()


# --------------------------------------------------------------------------
# Perturbations synced within groups of devices (the paper's inner_group_size).
# --------------------------------------------------------------------------


def _shards(batch, n):
    x, y = batch
    m = len(x) // n
    return [(x[i * m : (i + 1) * m], y[i * m : (i + 1) * m]) for i in range(n)]


def _sam_grad_with(loss, w, shard, g):
    norm = jnp.sqrt(sum(jnp.sum(v**2) for v in jax.tree.leaves(g)))
    return jax.grad(loss)(jax.tree.map(lambda a, b: a + RHO * b / norm, w, g), shard)


def _mean(trees):
    return jax.tree.map(lambda *t: sum(t) / len(t), *trees)


def test_perturbation_synced_within_groups_of_four_devices():
    with jax.enable_x64(True):
        params, loss, batch = _mlp(np.random.default_rng(1))
        mesh = _mesh((2, 4), ("data", "sync"))
        replicated = jax.tree.map(lambda _: P(), params)
        got, _ = _on_mesh(mesh, params, loss, batch, replicated, steps=1, sync=True)
        shards = _shards(batch, 8)  # device (d, s) holds shard 4 d + s
        grads = [jax.grad(loss)(params, s) for s in shards]
        per_group = [_mean(grads[4 * d : 4 * d + 4]) for d in range(2)]
        sam_grads = [
            _sam_grad_with(loss, params, s, per_group[i // 4]) for i, s in enumerate(shards)
        ]
        expected = jax.tree.map(lambda w, v: w - LR * v, params, _mean(sam_grads))
        assert_trees_close(jax.tree.map(np.asarray, got), expected, rtol=1e-10)
        # It differs from per-device and from fully synced perturbations.
        per_device = [_sam_grad_with(loss, params, s, g) for s, g in zip(shards, grads)]
        synced = [_sam_grad_with(loss, params, s, _mean(grads)) for s in shards]
        for other in (per_device, synced):
            alt = jax.tree.map(lambda w, v: w - LR * v, params, _mean(other))
            assert max(np.max(np.abs(np.asarray(got[k]) - alt[k])) for k in alt) > 1e-5


def test_sync_axes_must_be_among_axis_name():
    with pytest.raises(ValueError, match="subset of axis_name"):
        sam_optax.sam(0.1, axis_name="data", sync_perturbation="model")
    with pytest.raises(ValueError, match="needs axis_name"):
        sam_optax.sam(0.1, sync_perturbation="sync")


@pytest.mark.parametrize("kind", [AxisType.Auto, AxisType.Explicit], ids=["auto", "explicit"])
def test_meshes_as_make_mesh_makes_them_take_an_unplaced_batch(kind):
    # jax.make_mesh gives Explicit axes by default: shard_map wants its inputs
    # placed there; the builders place the batch themselves, on both kinds.
    params, loss, batch = _mlp(np.random.default_rng(3))
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    batch = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), batch)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(kind,))
    results = []
    for builder in (parallel.shard_map_step, parallel.sampa_step):
        method = (
            sam_optax.sam(RHO, axis_name="data") if builder is parallel.shard_map_step else None
        )
        tx = optax.chain(method, optax.sgd(LR)) if method else sam_optax.sampa(optax.sgd(LR))
        step = builder(loss, tx, mesh, donate=False)
        out = step(params, tx.init(params), batch)  # neither placed
        results.append(out[0])
    want = _grouped_f32(params, loss, batch)
    assert_trees_close(results[0], want, rtol=1e-5, atol=1e-6)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(results[1]))


def _grouped_f32(params, loss, batch):
    tx = optax.chain(sam_optax.sam(RHO), optax.sgd(LR))
    step = parallel.grouped_step(loss, tx, group_size=batch[0].shape[0] // 8, donate=False)
    return step(params, tx.init(params), batch)[0]
