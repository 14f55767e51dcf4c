"""Flax NNX and Linen: the paper's BatchNorm and dropout semantics, step for step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state
from flax_models import LinenNet
from flax_models import NNXNet
from flax_models import make_batch
from flax_models import nnx_loss
from flax_models import xent

import sam_optax
from sam_optax import flax as sam_flax
from sam_optax import parallel

from helpers import assert_trees_close
from helpers import assert_trees_equal

RHO, LR = 0.1, 0.5


def _sam_reference(loss_with_stats, params, rho=RHO, lr=LR):
    """The paper's step written out: grad at w (keeping the clean pass's
    statistics), perturbation rho g/|g|, grad at w + perturbation, one SGD step."""
    (_, stats), g = jax.value_and_grad(loss_with_stats, has_aux=True)(params)
    norm = jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(g)))
    perturbed = jax.tree.map(lambda w, d: w + rho * d / norm, params, g)
    v = jax.grad(lambda p: loss_with_stats(p)[0])(perturbed)
    return jax.tree.map(lambda w, d: w - lr * d, params, v), stats, v, perturbed


# --------------------------------------------------------------------------
# NNX.
# --------------------------------------------------------------------------


def _nnx_model(dropout=0.3):
    return NNXNet(nnx.Rngs(0, dropout=1), dropout=dropout)


def _nnx_reference(model, batch, loss=nnx_loss):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = nnx.as_pure(params), nnx.as_pure(rest)

    def loss_with_stats(p):
        m = nnx.merge(graphdef, p, rest)
        return loss(m, batch), nnx.as_pure(nnx.state(m, nnx.BatchStat))

    return _sam_reference(loss_with_stats, params), (graphdef, rest)


def test_nnx_step_matches_the_hand_written_reference():
    batch = make_batch()
    model = _nnx_model()
    (expected, stats, v, perturbed), (graphdef, rest) = _nnx_reference(nnx.clone(model), batch)
    count_before = int(nnx.as_pure(nnx.state(model, nnx.RngCount))["drop"]["rngs"]["count"])

    tx = optax.chain(sam_optax.sam(RHO), optax.sgd(LR))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    sam_flax.nnx_train_step(nnx_loss)(model, optimizer, batch)

    assert_trees_close(nnx.as_pure(nnx.state(model, nnx.Param)), expected, rtol=1e-5, atol=1e-6)
    # Running statistics: those of the clean pass, updated once.
    assert_trees_close(nnx.as_pure(nnx.state(model, nnx.BatchStat)), stats, rtol=1e-6)
    count = nnx.as_pure(nnx.state(model, nnx.RngCount))["drop"]["rngs"]["count"]
    assert int(count) == count_before + 1
    # The reference's equality is informative: another dropout key at w + eps
    # would give another gradient.
    other = nnx.merge(graphdef, perturbed, rest)
    nnx.reseed(other, dropout=123)
    v_other = nnx.grad(lambda m: nnx_loss(m, batch))(other)
    assert not np.allclose(np.asarray(v["dense"]["kernel"]), np.asarray(v_other["dense"]["kernel"]))


def test_nnx_train_step_passes_the_clean_loss_so_sharpness_is_recorded():
    # The step builder hands the clean pass's loss to tx.update as `value=`:
    # the sharpness diagnostic L(w + e) - L(w) is a number, not NaN.
    batch = make_batch()
    model = _nnx_model(dropout=0.0)
    optimizer = nnx.Optimizer(model, optax.chain(sam_optax.sam(RHO), optax.sgd(LR)), wrt=nnx.Param)
    loss = sam_flax.nnx_train_step(nnx_loss)(model, optimizer, batch)
    sharpness = float(optax.tree.get(optimizer.opt_state, "sharpness"))
    perturbed = float(optax.tree.get(optimizer.opt_state, "perturbed_loss"))
    assert np.isfinite(sharpness) and sharpness > 0
    np.testing.assert_allclose(sharpness, perturbed - float(loss), rtol=1e-5)


def test_nnx_rho_zero_is_plain_sgd_step_for_step():
    batch = make_batch(1)
    a, b = _nnx_model(), _nnx_model()
    opt_a = nnx.Optimizer(
        a, optax.chain(sam_optax.sam(0.0), optax.sgd(LR, momentum=0.9)), wrt=nnx.Param
    )
    opt_b = nnx.Optimizer(b, optax.sgd(LR, momentum=0.9), wrt=nnx.Param)
    sam_step = sam_flax.nnx_train_step(nnx_loss)

    @nnx.jit
    def sgd_step(model, optimizer, batch):
        loss, grads = nnx.value_and_grad(nnx_loss)(model, batch)
        optimizer.update(model, grads)
        return loss

    for _ in range(3):
        la = sam_step(a, opt_a, batch)
        lb = sgd_step(b, opt_b, batch)
        assert float(la) == float(lb)
    assert_trees_equal(
        nnx.as_pure(nnx.state(a, nnx.Not(nnx.RngKey))),
        nnx.as_pure(nnx.state(b, nnx.Not(nnx.RngKey))),
    )


def test_nnx_frozen_batch_norm_changes_no_statistic():
    model = sam_flax.freeze_batch_norm(_nnx_model())
    before = nnx.as_pure(nnx.state(model, nnx.BatchStat))
    params_before = nnx.as_pure(nnx.state(model, nnx.Param))
    optimizer = nnx.Optimizer(model, optax.chain(sam_optax.sam(RHO), optax.sgd(LR)), wrt=nnx.Param)
    sam_flax.nnx_train_step(nnx_loss)(model, optimizer, make_batch())
    assert_trees_equal(nnx.as_pure(nnx.state(model, nnx.BatchStat)), before)
    after = nnx.as_pure(nnx.state(model, nnx.Param))
    assert not np.allclose(
        np.asarray(after["dense"]["kernel"]), np.asarray(params_before["dense"]["kernel"])
    )
    sam_flax.freeze_batch_norm(model, False)
    assert model.bn.use_running_average is False


def test_nnx_step_traces_once_per_shape():
    traces = []

    def counting_loss(model, batch):
        traces.append(1)
        return nnx_loss(model, batch)

    model = _nnx_model()
    optimizer = nnx.Optimizer(model, optax.chain(sam_optax.sam(RHO), optax.sgd(LR)), wrt=nnx.Param)
    step = sam_flax.nnx_train_step(counting_loss)
    step(model, optimizer, make_batch(0))
    first = len(traces)
    step(model, optimizer, make_batch(1))
    step(model, optimizer, make_batch(2))
    assert len(traces) == first
    step(model, optimizer, make_batch(3, size=16))  # a new shape traces again
    assert len(traces) == 2 * first


def test_nnx_value_fn_merges_pure_state_inside_grad():
    # The DESIGN pitfall: a closure over live BatchStat variables fails inside
    # jax.grad; the snapshot is pure and works under plain jax.grad too.
    model = _nnx_model()
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    value_fn = sam_flax.nnx_value_fn(model, nnx_loss, make_batch())
    g = jax.grad(value_fn)(params)
    assert jax.tree.structure(g) == jax.tree.structure(params)


# --------------------------------------------------------------------------
# The official NNX example (tests/nnx_example.py): Rngs passed as arguments.
# --------------------------------------------------------------------------


def _example(tx):
    import nnx_example as ex

    model = ex.ExampleCNN(nnx.Rngs(0))
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param), ex.make_metrics(), nnx.Rngs(dropout=7)


def _sam_step(ex, route):
    return {
        "value_and_grad": ex.sam_train_step,
        "value_fn": ex.sam_train_step_value_fn,
        "train_step": ex.sam_train_step_builtin,
    }[route]


@pytest.mark.parametrize("route", ["value_and_grad", "value_fn", "train_step"])
def test_official_nnx_example_rho_zero_is_its_plain_step_bit_for_bit(route):
    import nnx_example as ex

    plain = _example(optax.sgd(0.05, momentum=0.9))
    sam = _example(optax.chain(sam_optax.sam(0.0), optax.sgd(0.05, momentum=0.9)))
    sam_step = _sam_step(ex, route)
    for t in range(3):
        batch = ex.make_batch(t)
        ex.train_step(*plain[:3], batch, plain[3])
        sam_step(*sam[:3], batch, sam[3])
    a, b = ex.state_of(*plain), ex.state_of(*sam)
    sgd_state, chain_state = a.pop("opt")["opt_state"], b.pop("opt")["opt_state"]
    assert_trees_equal(b, a)  # params, BatchNorm statistics, metrics, the caller's Rngs
    assert_trees_equal(chain_state[1], sgd_state)
    assert int(chain_state[0]["count"]) == 3
    assert int(b["rngs"]["dropout"]["count"]) == 3 * 2  # two dropout layers, three steps


@pytest.mark.parametrize("route", ["value_and_grad", "value_fn", "train_step"])
def test_official_nnx_example_sam_uses_the_same_dropout_masks_in_both_passes(route):
    import nnx_example as ex

    rho, lr = 0.1, 0.05
    batch = ex.make_batch(3)
    model, optimizer, metrics, rngs = _example(optax.chain(sam_optax.sam(rho), optax.sgd(lr)))
    # By hand, on copies taken before the step: both passes from the same Rngs state.
    clean_model, clean_rngs = nnx.clone(model), nnx.clone(rngs)
    (_, logits), g = nnx.value_and_grad(ex.loss_fn, has_aux=True)(clean_model, batch, clean_rngs)
    g = nnx.as_pure(g)
    norm = jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(g)))
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    perturbed_model, perturbed_rngs = nnx.clone(model), nnx.clone(rngs)
    nnx.update(perturbed_model, jax.tree.map(lambda w, d: w + rho * d / norm, params, g))
    v = nnx.as_pure(
        nnx.grad(lambda m, r: ex.loss_fn(m, batch, r)[0])(perturbed_model, perturbed_rngs)
    )
    expected = jax.tree.map(lambda w, d: w - lr * d, params, v)

    step = _sam_step(ex, route)
    step(model, optimizer, metrics, batch, rngs)
    assert_trees_close(nnx.as_pure(nnx.state(model, nnx.Param)), expected, rtol=2e-5, atol=1e-6)
    # BatchNorm statistics and the caller's Rngs: those of the clean pass, advanced once
    # (jit against eager: equal to float32 rounding).
    assert_trees_close(
        nnx.as_pure(nnx.state(model, nnx.BatchStat)),
        nnx.as_pure(nnx.state(clean_model, nnx.BatchStat)),
        rtol=1e-5,
        atol=1e-7,
    )
    assert int(rngs.dropout.count[...]) == int(clean_rngs.dropout.count[...]) == 2
    # The metrics saw the clean pass's logits.
    expected_accuracy = float(jnp.mean(jnp.argmax(logits, -1) == batch["label"]))
    assert float(metrics.compute()["accuracy"]) == pytest.approx(expected_accuracy, abs=1e-6)


# --------------------------------------------------------------------------
# Linen.
# --------------------------------------------------------------------------


def _linen_state(tx, dropout=0.3):
    net = LinenNet(dropout=dropout)
    x, _ = make_batch()
    variables = net.init({"params": jax.random.key(0)}, x, train=False)
    return net, sam_flax.SAMTrainState.create(
        apply_fn=net.apply, params=variables["params"], tx=tx, batch_stats=variables["batch_stats"]
    )


def _linen_reference(net, state, batch, rng):
    x, y = batch

    def loss_with_stats(p):
        out, mutated = net.apply(
            {"params": p, "batch_stats": state.batch_stats},
            x,
            train=True,
            mutable=["batch_stats"],
            rngs={} if rng is None else {"dropout": rng},
        )
        return xent(out, y), mutated["batch_stats"]

    return _sam_reference(loss_with_stats, state.params)


def test_linen_step_matches_the_hand_written_reference():
    batch, rng = make_batch(), jax.random.key(7)
    net, state = _linen_state(optax.chain(sam_optax.sam(RHO), optax.sgd(LR)))
    expected, stats, _, _ = _linen_reference(net, state, batch, rng)
    step = sam_flax.linen_train_step(sam_flax.linen_loss_fn(net.apply, xent, train=True))
    new, _ = step(state, batch, rng)
    assert_trees_close(new.params, expected, rtol=1e-5, atol=1e-6)
    assert_trees_close(new.batch_stats, stats, rtol=1e-6)
    assert int(new.step) == 1


def test_linen_train_step_passes_the_clean_loss_so_sharpness_is_recorded():
    net, state = _linen_state(optax.chain(sam_optax.sam(RHO), optax.sgd(LR)), dropout=0.0)
    step = sam_flax.linen_train_step(sam_flax.linen_loss_fn(net.apply, xent, train=True))
    state, loss = step(state, make_batch(), jax.random.key(0))
    sharpness = float(optax.tree.get(state.opt_state, "sharpness"))
    perturbed = float(optax.tree.get(state.opt_state, "perturbed_loss"))
    assert np.isfinite(sharpness) and sharpness > 0
    np.testing.assert_allclose(sharpness, perturbed - float(loss), rtol=1e-5)


def test_linen_loss_fn_with_aux_returns_the_criterions_metrics_beside_the_statistics():
    net, state = _linen_state(optax.sgd(LR), dropout=0.0)
    batch = make_batch()

    def criterion(logits, y):
        return xent(logits, y), {"accuracy": jnp.mean(jnp.argmax(logits, -1) == y)}

    plain = sam_flax.linen_loss_fn(net.apply, xent, train=True)
    with_aux = sam_flax.linen_loss_fn(net.apply, criterion, train=True, has_aux=True)
    loss, stats = plain(state.params, batch, state.batch_stats)
    loss_aux, (stats_aux, metrics) = with_aux(state.params, batch, state.batch_stats)
    assert float(loss_aux) == float(loss)
    assert_trees_equal(stats_aux, stats)
    logits = net.apply(
        {"params": state.params, "batch_stats": state.batch_stats},
        batch[0],
        train=True,
        mutable=["batch_stats"],
    )[0]
    assert float(metrics["accuracy"]) == float(jnp.mean(jnp.argmax(logits, -1) == batch[1]))
    # Evaluation mode: nothing mutable, the statistics come back as they went in.
    evaluate = sam_flax.linen_loss_fn(
        net.apply, criterion, update_batch_stats=False, train=False, has_aux=True
    )
    _, (same, _) = evaluate(state.params, batch, state.batch_stats)
    assert same is state.batch_stats


def test_linen_rho_zero_is_plain_sgd_step_for_step():
    batch, rng = make_batch(1), jax.random.key(3)
    net, state_a = _linen_state(optax.chain(sam_optax.sam(0.0), optax.sgd(LR, momentum=0.9)))
    state_b = train_state.TrainState.create(
        apply_fn=net.apply, params=state_a.params, tx=optax.sgd(LR, momentum=0.9)
    )
    stats_b = state_a.batch_stats
    loss = sam_flax.linen_loss_fn(net.apply, xent, train=True)
    sam_step = sam_flax.linen_train_step(loss)

    @jax.jit
    def sgd_step(state, stats, batch, rng):
        (value, stats), grads = jax.value_and_grad(loss, has_aux=True)(
            state.params, batch, stats, rng
        )
        return state.apply_gradients(grads=grads), stats, value

    for t in range(3):
        key = jax.random.fold_in(rng, t)
        state_a, la = sam_step(state_a, batch, key)
        state_b, stats_b, lb = sgd_step(state_b, stats_b, batch, key)
        assert float(la) == float(lb)
    assert_trees_equal(state_a.params, state_b.params)
    assert_trees_equal(state_a.batch_stats, stats_b)


def test_linen_frozen_batch_norm_changes_no_statistic():
    net, state = _linen_state(optax.chain(sam_optax.sam(RHO), optax.sgd(LR)))
    loss = sam_flax.linen_loss_fn(
        net.apply, xent, update_batch_stats=False, train=True, frozen_bn=True
    )
    new, _ = sam_flax.linen_train_step(loss)(state, make_batch(), jax.random.key(0))
    assert_trees_equal(new.batch_stats, state.batch_stats)
    assert not np.allclose(
        np.asarray(new.params["Dense_0"]["kernel"]), np.asarray(state.params["Dense_0"]["kernel"])
    )


def test_linen_step_traces_once_and_without_batch_norm():
    traces = []

    def criterion(out, y):
        traces.append(1)
        return xent(out, y)

    import flax.linen as nn

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x, train=True):
            x = nn.Dropout(0.2, deterministic=not train)(
                nn.relu(nn.Dense(16)(x.reshape(x.shape[0], -1)))
            )
            return nn.Dense(3)(x)

    mlp = MLP()
    x, _ = make_batch()
    params = mlp.init(jax.random.key(0), x, train=False)["params"]
    state = sam_flax.SAMTrainState.create(
        apply_fn=mlp.apply, params=params, tx=optax.chain(sam_optax.sam(RHO), optax.sgd(LR))
    )
    assert state.batch_stats is None
    step = sam_flax.linen_train_step(sam_flax.linen_loss_fn(mlp.apply, criterion, train=True))
    state, _ = step(state, make_batch(0), jax.random.key(0))
    first = len(traces)
    state, _ = step(state, make_batch(1), jax.random.key(1))
    assert len(traces) == first and int(state.step) == 2


def test_sam_train_state_forwards_tx_args():
    seen = {}

    def spy():
        def update(updates, state, params=None, **extra):
            seen.update(extra)
            return updates, state

        return optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)

    state = sam_flax.SAMTrainState.create(apply_fn=None, params={"w": jnp.ones(2)}, tx=spy())
    state.apply_gradients(grads={"w": jnp.ones(2)}, value_fn="f", tx_args={"other": 1})
    assert seen == {"value_fn": "f", "other": 1}
    seen.clear()
    state.apply_gradients(grads={"w": jnp.ones(2)}, value_fn="f", value=0.5)
    assert seen == {"value_fn": "f", "value": 0.5}


# --------------------------------------------------------------------------
# The 8-device step builder with BatchNorm in the model.
# --------------------------------------------------------------------------


def _shards(batch, n=8):
    x, y = batch
    m = x.shape[0] // n
    return [(x[i * m : (i + 1) * m], y[i * m : (i + 1) * m]) for i in range(n)]


def _mean(trees):
    return jax.tree.map(lambda *xs: sum(xs) / len(xs), *trees)


def _nnx_on_eight_devices(model, batch, group_size=None, donate=True):
    """A per-device SAM step for ``model`` on 8 devices, and its placed arguments."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = nnx.as_pure(params), nnx.as_pure(rest)
    mesh = jax.make_mesh((8,), ("data",))
    tx = optax.chain(sam_optax.sam(RHO, axis_name="data"), optax.sgd(LR))
    step = parallel.shard_map_step(
        sam_flax.nnx_loss_fn(graphdef, nnx_loss),
        tx,
        mesh,
        has_aux=True,
        group_size=group_size,
        donate=donate,
    )
    args = (
        parallel.replicate(params, mesh),
        parallel.replicate(tx.init(params), mesh),
        parallel.shard_batch(batch, mesh),
        parallel.replicate(rest, mesh),
    )
    return (graphdef, params, rest), step, args


def test_nnx_under_the_eight_device_builder():
    batch = make_batch(4, size=64)
    (graphdef, params, rest), step, args = _nnx_on_eight_devices(_nnx_model(dropout=0.0), batch)
    new_params, _, _, new_rest = step(*args)
    per_shard = [_nnx_reference(nnx.merge(graphdef, params, rest), s)[0] for s in _shards(batch)]
    v_mean = _mean([r[2] for r in per_shard])
    expected = jax.tree.map(lambda w, d: w - LR * d, params, v_mean)
    assert_trees_close(new_params, expected, rtol=1e-5, atol=1e-6)
    assert_trees_close(new_rest["bn"], _mean([r[1] for r in per_shard])["bn"], rtol=1e-5)
    # Per-device, not synced: the global-batch SAM step is elsewhere.
    global_step = _nnx_reference(nnx.merge(graphdef, params, rest), batch)[0][0]
    diff = jax.tree.map(
        lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), new_params, global_step
    )
    assert max(jax.tree.leaves(diff)) > 1e-4


def test_linen_under_the_eight_device_builder():
    batch = make_batch(5, size=64)
    tx = optax.chain(sam_optax.sam(RHO, axis_name="data"), optax.sgd(LR))
    net, state = _linen_state(tx, dropout=0.0)
    mesh = jax.make_mesh((8,), ("data",))
    loss = sam_flax.linen_loss_fn(net.apply, xent, train=True)
    step = parallel.shard_map_step(loss, tx, mesh, has_aux=True)
    new_params, _, _, new_stats = step(
        parallel.replicate(state.params, mesh),
        parallel.replicate(state.opt_state, mesh),
        parallel.shard_batch(batch, mesh),
        parallel.replicate(state.batch_stats, mesh),
    )
    per_shard = [_linen_reference(net, state, s, None) for s in _shards(batch)]
    expected = jax.tree.map(lambda w, d: w - LR * d, state.params, _mean([r[2] for r in per_shard]))
    assert_trees_close(new_params, expected, rtol=1e-5, atol=1e-6)
    assert_trees_close(new_stats, _mean([r[1] for r in per_shard]), rtol=1e-5)


@pytest.mark.parametrize("group_size", [None, 4])
def test_nnx_loss_fn_reseeds_dropout_per_device_and_keeps_keys(group_size):
    batch = make_batch(6, size=64)
    (_, _, rest), step, args = _nnx_on_eight_devices(
        _nnx_model(dropout=0.5),
        batch,
        group_size,
        donate=False,  # three steps from one state
    )
    a = step(*args, rng=jax.random.key(0))
    b = step(*args, rng=jax.random.key(0))
    c = step(*args, rng=jax.random.key(1))
    assert_trees_close(a[0], b[0], rtol=0)
    assert not np.allclose(np.asarray(a[0]["dense"]["kernel"]), np.asarray(c[0]["dense"]["kernel"]))
    key_before = jax.random.key_data(rest["drop"]["rngs"]["key"])
    key_after = jax.random.key_data(a[3]["drop"]["rngs"]["key"])
    np.testing.assert_array_equal(np.asarray(key_before), np.asarray(key_after))


def test_nnx_loss_fn_passes_rngs_like_the_flax_examples_per_device():
    # The official example's loss(model, batch, rngs) under the 8-device builder:
    # each device gets nnx.Rngs from its folded key, the same in both passes.
    import nnx_example as ex

    batch = ex.make_batch(9, size=32)
    model = ex.ExampleCNN(nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = nnx.as_pure(params), nnx.as_pure(rest)
    mesh = jax.make_mesh((8,), ("data",))
    tx = optax.chain(sam_optax.sam(RHO, axis_name="data"), optax.sgd(LR))
    loss = sam_flax.nnx_loss_fn(graphdef, ex.loss_fn, pass_rngs=True, has_aux=True)
    step = parallel.shard_map_step(loss, tx, mesh, has_aux=True)
    rng = jax.random.key(5)
    new_params, _, _, (_, logits) = step(
        parallel.replicate(params, mesh),
        parallel.replicate(tx.init(params), mesh),
        parallel.shard_batch(batch, mesh),
        parallel.replicate(rest, mesh),
        rng=rng,
    )
    assert logits.shape == (4, 10)  # the clean pass's logits, averaged over devices

    def shard_sam_gradient(d):
        shard = jax.tree.map(lambda x: x[4 * d : 4 * (d + 1)], batch)
        key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(rng, d), 0), 0)

        def f(p):
            m = nnx.merge(graphdef, p, rest)
            return ex.loss_fn(m, shard, nnx.Rngs(dropout=key))[0]

        g = jax.grad(f)(params)
        norm = jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(g)))
        return jax.grad(f)(jax.tree.map(lambda w, v: w + RHO * v / norm, params, g))

    v = _mean([shard_sam_gradient(d) for d in range(8)])
    expected = jax.tree.map(lambda w, d: w - LR * d, params, v)
    assert_trees_close(new_params, expected, rtol=2e-5, atol=1e-6)


def test_plain_train_state_apply_gradients_points_to_sam_train_state():
    # flax's own TrainState drops value_fn before tx.update: the error names the fix.
    from flax.training import train_state

    state = train_state.TrainState.create(
        apply_fn=None,
        params={"w": jnp.ones(2)},
        tx=optax.chain(sam_optax.sam(0.05), optax.sgd(0.1)),
    )
    with pytest.raises(TypeError, match="SAMTrainState"):
        state.apply_gradients(grads={"w": jnp.ones(2)}, value_fn=lambda p: jnp.sum(p["w"]))


def test_normalization_masks_select_the_norm_layers():
    # SAM-ON: NNX by module type, Linen by the names Linen gives its layers.
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.dense = nnx.Linear(3, 4, rngs=rngs)
            self.bn = nnx.BatchNorm(4, rngs=rngs)
            self.head = nnx.Linear(4, 2, rngs=rngs)

    model = Net(nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    mask = sam_flax.nnx_normalization_mask(model)(params)
    selected = {jax.tree_util.keystr(p) for p, m in jax.tree_util.tree_leaves_with_path(mask) if m}
    assert len(selected) == 2 and all("bn" in p for p in selected), selected
    _, state = _linen_state(optax.chain(sam_optax.sam(RHO), optax.sgd(LR)), dropout=0.0)
    linen_mask = sam_flax.linen_normalization_mask()(state.params)
    for path, m in jax.tree_util.tree_leaves_with_path(linen_mask):
        assert m == ("BatchNorm" in jax.tree_util.keystr(path))
    assert any(jax.tree.leaves(linen_mask))


def test_nnx_variable_mask_selects_a_variable_type_in_both_state_forms():
    from flax import nnx

    from sam_optax.flax import nnx_variable_mask

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.hidden = nnx.LoRALinear(4, 6, lora_rank=2, rngs=rngs)
            self.out = nnx.Linear(6, 3, rngs=rngs)

    model = Net(nnx.Rngs(0))
    want = {("hidden", "lora", "lora_a"), ("hidden", "lora", "lora_b")}
    for params in (nnx.state(model, nnx.Param), nnx.as_pure(nnx.state(model, nnx.Param))):
        mask = nnx_variable_mask(model)(params)
        chosen = {path[:3] for path, on in nnx.to_flat_state(nnx.as_pure(mask)) if on}
        assert chosen == want
        assert sum(jax.tree.leaves(mask)) == 2 and len(jax.tree.leaves(mask)) == 6
    # Any type: the plain Linear's params alone.
    mask = nnx_variable_mask(Net(nnx.Rngs(1)), nnx.Param)(nnx.state(model, nnx.Param))
    assert sum(jax.tree.leaves(mask)) == 6  # LoRAParam is a Param: every leaf
