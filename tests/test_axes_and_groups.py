"""The mapped-axes and batch/group helpers every module shares."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from sam_optax import _axes
from sam_optax import _groups


def test_axis_names_normalize():
    assert _axes.axis_names(None) == ()
    assert _axes.axis_names("data") == ("data",)
    assert _axes.axis_names(("a", "b")) == ("a", "b")


def test_varying_axes_reads_the_jax_internal():
    # If JAX moves the varying-axes type, this fails loudly (with the version
    # in the message) instead of letting the shard_map trap through unnoticed.
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))

    def body(x, y):
        assert _axes.varying_axes(x) == frozenset({"data"}), jax.__version__
        assert _axes.varying_axes(y) == frozenset(), jax.__version__
        made = _axes.as_varying({"y": y}, ("data",))
        assert _axes.varying_axes(made["y"]) == frozenset({"data"})
        assert _axes.vma_checked(("data",))
        assert _axes.manual_axes(("data", "other")) == ("data",)
        return _axes.pmean(x, ("data",))

    f = jax.shard_map(body, mesh=mesh, in_specs=(P("data"), P()), out_specs=P())
    out = f(jnp.arange(8.0), jnp.ones(3))
    np.testing.assert_allclose(np.asarray(out), [3.5])
    assert _axes.varying_axes(jnp.ones(2)) == frozenset()
    assert _axes.manual_axes(("data",)) == ()


def test_varying_axes_fails_loudly_naming_jax_when_the_internal_moves(monkeypatch):
    class Moved:  # an abstract type without .mat.varying or .vma
        pass

    monkeypatch.setattr(jax, "typeof", lambda x: Moved())
    with pytest.raises(RuntimeError, match=f"jax {jax.__version__} does not provide.*Moved"):
        _axes.varying_axes(jnp.ones(2))


def test_check_bound_names_the_axis():
    with pytest.raises(ValueError, match="'devices'"):
        _axes.check_bound(("devices",))
    jax.vmap(lambda x: _axes.check_bound(("i",)) or x, axis_name="i")(jnp.ones(2))


def test_fold_in_axis_index_differs_per_device():
    keys = jax.vmap(
        lambda _: jax.random.key_data(_axes.fold_in_axis_index(jax.random.key(0), ("i",))),
        axis_name="i",
    )(jnp.arange(4))
    assert len({np.asarray(k).tobytes() for k in keys}) == 4


def test_batch_and_group_arithmetic():
    batch = (np.zeros((12, 3)), np.zeros(12))
    assert _groups.batch_size(batch) == 12
    assert _groups.shard_size(batch, 4) == 3
    assert _groups.groups_per_shard(6, 2, 2) == 3
    assert _groups.groups_per_shard(6, None) == 1
    parts = _groups.split_groups((np.arange(6),), 3)
    assert [p[0].tolist() for p in parts] == [[0, 1], [2, 3], [4, 5]]
    stacked = _groups.stack_groups(np.arange(6), 2)
    assert stacked.shape == (3, 2)


def test_batch_and_group_errors_give_the_sizes():
    with pytest.raises(ValueError, match=r"same leading size, got \[3, 4\]"):
        _groups.batch_size((np.zeros(3), np.zeros(4)))
    with pytest.raises(ValueError, match=r"10 examples does not split over the 4 devices of axis"):
        _groups.shard_size(np.zeros(10), 4, "data")
    with pytest.raises(ValueError, match=r"each device gets 5, which is not a multiple of 2"):
        _groups.groups_per_shard(5, 2, 4)
    for bad in (0, -1, 1.5, True, "4"):
        with pytest.raises(ValueError, match="group_size must be a positive int"):
            _groups.check_group_size(bad)
    with pytest.raises(ValueError, match="m=4 must divide the batch of 6"):
        _groups.stack_groups(np.zeros(6), 4)
