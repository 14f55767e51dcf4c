"""Data parallelism the paper's way, and m-sharpness on any number of devices.

The paper (§3.1, footnote 5, §4.1) splits each batch over the accelerators;
every accelerator computes the perturbation :math:`\\hat\\epsilon` from ITS OWN
sub-batch gradient, takes the gradient at its own :math:`w + \\hat\\epsilon`,
and only those SAM gradients are averaged. The number of examples per
perturbation, m, is then the per-device batch, and smaller m generalizes
better (m-sharpness). This module gives that step three ways:

* :func:`shard_map_step`: ``jax.shard_map`` over a ``Mesh`` (one host, or many
  after ``jax.distributed.initialize``), params and optimizer state
  replicated, the batch sharded along the data axis;
* :func:`pmap_step`: the same under ``jax.pmap``;
* :func:`grouped_step`: one device, the batch split into groups of m examples,
  one perturbation per group.

All three take ``group_size=m`` to split each device's share further, so any
m that divides the per-device batch works. The groups are differentiated in
one pass of an unrolled function, each group against its own copy of the
params (:class:`sam_optax.GroupedObjective`): measured here it costs about as
much as one plain SAM step, where ``vmap`` over groups costs several times
more (``benchmarks/msharpness.py``).

The optimizer ``tx`` must contain :func:`sam_optax.sam` with ``axis_name``
equal to the step's data axis for the multi-device steps (that is where the
SAM gradients are averaged); for a plain data-parallel baseline use
``sam(0.0, axis_name=...)``, which averages the gradient and does nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Hashable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sam_optax._sam import GroupedObjective
from sam_optax._sam import _as_varying
from sam_optax._sam import _manual_axes
from sam_optax._sam import _varying_axes

__all__ = [
    "grouped_step",
    "pmap_step",
    "replicate",
    "shard_batch",
    "shard_map_step",
    "split_groups",
]

LossFn = Callable[..., Any]


# --------------------------------------------------------------------------
# Batches and groups.
# --------------------------------------------------------------------------


def _batch_size(batch: Any) -> int:
    sizes = {int(np.shape(x)[0]) for x in jax.tree.leaves(batch)}
    if len(sizes) != 1:
        raise ValueError(
            f"every leaf of batch must have the same leading size, got {sorted(sizes)}."
        )
    return sizes.pop()


def _check_group_size(group_size: int | None) -> None:
    if group_size is not None and (not isinstance(group_size, int) or group_size < 1):
        raise ValueError(
            f"group_size must be a positive int or None, got group_size={group_size!r}."
        )


def _n_groups(per_device: int, group_size: int | None, n_devices: int) -> int:
    if group_size is None:
        return 1
    if per_device % group_size:
        raise ValueError(
            f"batch of {per_device * n_devices} examples does not split into "
            f"{n_devices} device(s) x groups of group_size={group_size}: each "
            f"device gets {per_device}, which is not a multiple of {group_size}."
        )
    return per_device // group_size


def split_groups(batch: Any, n_groups: int) -> list[Any]:
    """Splits the leading axis of every leaf into ``n_groups`` equal consecutive parts."""
    size = _batch_size(batch)
    m = size // n_groups
    return [jax.tree.map(lambda x, i=i: x[i * m : (i + 1) * m], batch) for i in range(n_groups)]


# --------------------------------------------------------------------------
# The per-device step body, shared by every builder.
# --------------------------------------------------------------------------


def _is_key(x: Any) -> bool:
    return jax.dtypes.issubdtype(jnp.result_type(x), jax.dtypes.prng_key)


def _reduce_aux(aux: list[Any], names: tuple[Hashable, ...]) -> Any:
    """Averages aux over the groups, then the devices (floats).

    Integer and boolean leaves (counters) take their maximum; PRNG keys are
    passed through (they must be the same on every device).
    """

    def over_groups(*xs):
        if not _is_key(xs[0]) and jnp.issubdtype(jnp.result_type(xs[0]), jnp.inexact):
            return sum(xs[1:], xs[0]) / len(xs)
        return xs[0]

    out = jax.tree.map(over_groups, *aux)
    if not names:
        return out

    def over_devices(x):
        if _is_key(x):
            return x
        if jnp.issubdtype(jnp.result_type(x), jnp.inexact):
            return jax.lax.pmean(x, names)
        return jax.lax.pmax(x, names)

    return jax.tree.map(over_devices, out)


def _device_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    has_aux: bool,
    n_groups: int,
    names: tuple[Hashable, ...],
    params: Any,
    opt_state: Any,
    batch: Any,
    args: tuple[Any, ...],
    rng: jax.Array | None,
) -> tuple[Any, ...]:
    """One SAM step on this device's share of the batch (inside a mapped context or not)."""
    manual = _manual_axes(names)
    groups = split_groups(batch, n_groups) if n_groups > 1 else [batch]
    if rng is not None:
        for name in names:
            rng = jax.random.fold_in(rng, jax.lax.axis_index(name))
        keys = [jax.random.fold_in(rng, i) for i in range(n_groups)]

    def group_loss(i: int, p: Any) -> tuple[jax.Array, Any]:
        kwargs = {} if rng is None else {"rng": keys[i]}
        out = loss_fn(p, groups[i], *args, **kwargs)
        return out if has_aux else (out, None)

    def objective(ps: tuple[Any, ...]) -> tuple[jax.Array, list[Any]]:
        losses, auxes = zip(*(group_loss(i, p) for i, p in enumerate(ps)), strict=True)
        return sum(losses[1:], losses[0]) / n_groups, list(auxes)

    local = jax.tree.unflatten(
        jax.tree.structure(params), _as_varying(jax.tree.leaves(params), manual)
    )
    (loss, auxes), grads = jax.value_and_grad(objective, has_aux=True)((local,) * n_groups)

    def value_fn(p: Any) -> jax.Array:
        return objective((p,) * n_groups)[0]

    extra: dict[str, Any] = {"value_fn": value_fn}
    mean_grad = grads[0]
    if n_groups > 1:
        mean_grad = jax.tree.map(lambda *g: sum(g[1:], g[0]), *grads)
        per_group = [jax.tree.map(lambda g: g * n_groups, gi) for gi in grads]
        extra["grouped_objective"] = GroupedObjective(
            value_fn=lambda ps: objective(ps)[0], grads=per_group
        )
    updates, opt_state = tx.update(mean_grad, opt_state, params, **extra)
    if manual:
        varying = [n for u in jax.tree.leaves(updates) for n in manual if n in _varying_axes(u)]
        if varying:
            raise ValueError(
                f"the optimizer's updates still differ between the devices of axis "
                f"{varying[0]!r}: tx must average the gradients over that axis. Put "
                f"sam_optax.sam(..., axis_name={varying[0]!r}) first in the chain "
                f"(for a plain data-parallel baseline, sam(0.0, axis_name={varying[0]!r}))."
            )
    params = optax.apply_updates(params, updates)
    loss = jax.lax.pmean(loss, names) if names else loss
    out = (params, opt_state, loss)
    if has_aux:
        out = (*out, _reduce_aux(auxes, names))
    return out


# --------------------------------------------------------------------------
# Builders.
# --------------------------------------------------------------------------


def _doc_step(kind: str) -> str:
    return f"""Returns ``step(params, opt_state, batch, *args, rng=None)`` ({kind}).

    ``loss_fn(params, batch, *args) -> loss`` (or ``(loss, aux)`` with
    ``has_aux=True``) is the mean loss of a batch; ``args`` are replicated
    extra inputs (e.g. model state). With ``rng`` given, ``loss_fn`` is
    called with ``rng=key``, the key folded with the device index and the
    group index, and the same key serves both SAM passes (the paper's dropout
    semantics). The step returns ``(params, opt_state, loss)`` and, with
    ``has_aux``, ``aux`` last: the clean pass's aux (at ``w``, not at the
    perturbed point), averaged over groups and devices (non-float leaves:
    their maximum).
    """


def shard_map_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    *,
    axis_name: str = "data",
    group_size: int | None = None,
    has_aux: bool = False,
    donate: bool = False,
) -> Callable[..., tuple[Any, ...]]:
    """A jitted data-parallel SAM step on ``jax.shard_map`` over ``mesh``.

    Params, optimizer state and extra ``args`` are replicated; the batch is
    split along its leading axis over ``axis_name`` (use :func:`shard_batch`
    and :func:`replicate` to place them, one host or many). Each device
    differentiates its own shard with respect to params made varying (so the
    gradient is not summed over the devices: the ``shard_map`` trap), ``sam``
    perturbs with it and averages the SAM gradients; ``tx`` must contain
    ``sam_optax.sam(axis_name=axis_name)``. ``group_size=m`` splits each
    device's share into groups of m examples with one perturbation each.

    Args:
      loss_fn: ``loss_fn(params, batch, *args[, rng=key]) -> loss`` or ``(loss, aux)``.
      tx: an optax transformation containing ``sam(axis_name=axis_name)``.
      mesh: the device mesh; ``axis_name`` must be one of its axes.
      axis_name: the data axis.
      group_size: examples per perturbation within a device (None: the whole share).
      has_aux: ``loss_fn`` returns ``(loss, aux)``.
      donate: donate params and optimizer state buffers to the step.

    Returns:
      ``step(params, opt_state, batch, *args, rng=None)``; see below.

    Raises:
      ValueError: at call time, when the batch does not split into devices x
        groups (the message gives the sizes).
    """
    _check_group_size(group_size)
    if axis_name not in mesh.axis_names:
        raise ValueError(f"axis_name={axis_name!r} is not an axis of the mesh {mesh.axis_names}.")
    n_dev = mesh.shape[axis_name]
    compiled: dict[Any, Callable[..., Any]] = {}

    def build(n_groups: int, n_args: int, with_rng: bool) -> Callable[..., Any]:
        del with_rng

        def body(params, opt_state, batch, args, rng):
            return _device_step(
                loss_fn, tx, has_aux, n_groups, (axis_name,), params, opt_state, batch, args, rng
            )

        out_specs = (P(), P(), P()) + ((P(),) if has_aux else ())
        mapped = jax.shard_map(
            body,
            mesh=mesh,
            in_specs=(P(), P(), P(axis_name), (P(),) * n_args, P()),
            out_specs=out_specs,
        )
        return jax.jit(mapped, donate_argnums=(0, 1) if donate else ())

    def step(params, opt_state, batch, *args, rng=None):
        size = _batch_size(batch)
        if size % n_dev:
            raise ValueError(
                f"batch of {size} examples does not split over the {n_dev} devices of "
                f"axis {axis_name!r}."
            )
        n_groups = _n_groups(size // n_dev, group_size, n_dev)
        key = (n_groups, len(args), rng is not None)
        if key not in compiled:
            compiled[key] = build(*key)
        return compiled[key](params, opt_state, batch, args, rng)

    step.__doc__ = _doc_step("shard_map")
    return step


def pmap_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    *,
    axis_name: str = "batch",
    group_size: int | None = None,
    has_aux: bool = False,
    devices: list[Any] | None = None,
) -> Callable[..., tuple[Any, ...]]:
    """The same step under ``jax.pmap`` (params and state in and out unreplicated).

    ``tx`` must contain ``sam_optax.sam(axis_name=axis_name)``. The batch's
    leading axis is split over the devices here (no manual reshaping), then
    into groups of ``group_size``. ``jax.pmap`` is in maintenance mode;
    :func:`shard_map_step` is the road for new code.

    Args:
      loss_fn: as in :func:`shard_map_step`.
      tx: an optax transformation containing ``sam(axis_name=axis_name)``.
      axis_name: the pmap axis name.
      group_size: examples per perturbation within a device.
      has_aux: ``loss_fn`` returns ``(loss, aux)``.
      devices: the devices to map over (default: all local devices).

    Returns:
      ``step(params, opt_state, batch, *args, rng=None)``.
    """
    _check_group_size(group_size)
    devs = list(devices) if devices is not None else jax.local_devices()
    n_dev = len(devs)
    compiled: dict[Any, Callable[..., Any]] = {}

    def build(n_groups: int, n_args: int, with_rng: bool) -> Callable[..., Any]:
        del n_args, with_rng

        def body(params, opt_state, batch, args, rng):
            return _device_step(
                loss_fn, tx, has_aux, n_groups, (axis_name,), params, opt_state, batch, args, rng
            )

        return jax.pmap(
            body,
            axis_name=axis_name,
            in_axes=(None, None, 0, None, None),
            out_axes=None,
            devices=devs,
        )

    def step(params, opt_state, batch, *args, rng=None):
        size = _batch_size(batch)
        if size % n_dev:
            raise ValueError(f"batch of {size} examples does not split over {n_dev} devices.")
        n_groups = _n_groups(size // n_dev, group_size, n_dev)
        per_device = jax.tree.map(lambda x: x.reshape(n_dev, size // n_dev, *x.shape[1:]), batch)
        key = (n_groups, len(args), rng is not None)
        if key not in compiled:
            compiled[key] = build(*key)
        return compiled[key](params, opt_state, per_device, tuple(args), rng)

    step.__doc__ = _doc_step("pmap")
    return step


def grouped_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    *,
    group_size: int | None = None,
    has_aux: bool = False,
    donate: bool = False,
) -> Callable[..., tuple[Any, ...]]:
    """A jitted SAM step on one device, one perturbation per group of ``group_size`` examples.

    The batch splits into consecutive groups of m = ``group_size`` examples;
    group i gets its own :math:`\\hat\\epsilon_i` from its own gradient and
    the SAM gradient is the mean of :math:`\\nabla L_i(w + \\hat\\epsilon_i)`:
    what ``batch / m`` devices with m examples each would compute, on one
    device. ``tx`` holds a plain ``sam`` (no ``axis_name``).
    ``group_size=None`` is ordinary SAM on the whole batch.

    Args:
      loss_fn: ``loss_fn(params, batch, *args[, rng=key]) -> loss`` or ``(loss, aux)``.
      tx: an optax transformation containing ``sam_optax.sam(...)``.
      group_size: examples per perturbation (m).
      has_aux: ``loss_fn`` returns ``(loss, aux)``.
      donate: donate params and optimizer state buffers to the step.

    Returns:
      ``step(params, opt_state, batch, *args, rng=None)``.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> from sam_optax.parallel import grouped_step
      >>> loss = lambda w, b: jnp.mean((b[:, 0] * w - b[:, 1]) ** 2)
      >>> tx = optax.chain(sam_optax.sam(0.1), optax.sgd(0.1))
      >>> step = grouped_step(loss, tx, group_size=2)
      >>> batch = jnp.array([[1.0, 2.0], [2.0, 3.0], [1.0, 1.0], [3.0, 2.0]])
      >>> w, state, value = step(jnp.zeros(()), tx.init(jnp.zeros(())), batch)
      >>> print(round(float(value), 3))
      4.5
    """
    _check_group_size(group_size)
    compiled: dict[Any, Callable[..., Any]] = {}

    def build(n_groups: int, n_args: int, with_rng: bool) -> Callable[..., Any]:
        del n_args, with_rng

        def body(params, opt_state, batch, args, rng):
            return _device_step(
                loss_fn, tx, has_aux, n_groups, (), params, opt_state, batch, args, rng
            )

        return jax.jit(body, donate_argnums=(0, 1) if donate else ())

    def step(params, opt_state, batch, *args, rng=None):
        n_groups = _n_groups(_batch_size(batch), group_size, 1)
        key = (n_groups, len(args), rng is not None)
        if key not in compiled:
            compiled[key] = build(*key)
        return compiled[key](params, opt_state, batch, tuple(args), rng)

    step.__doc__ = _doc_step("one device")
    return step


# --------------------------------------------------------------------------
# Placing data on a mesh (one process or many).
# --------------------------------------------------------------------------


def shard_batch(batch: Any, mesh: Mesh, axis_name: str = "data") -> Any:
    """Makes a global batch sharded along ``axis_name`` from this process's part.

    With one process the local batch is the global batch. After
    ``jax.distributed.initialize`` each process passes its own slice (in
    process order) and gets the global array whose shards live on its devices.
    """
    n_dev = mesh.shape[axis_name]
    size = _batch_size(batch) * jax.process_count()
    if size % n_dev:
        raise ValueError(
            f"batch of {size} examples does not split over the {n_dev} devices of "
            f"axis {axis_name!r}."
        )
    sharding = NamedSharding(mesh, P(axis_name))
    return jax.tree.map(lambda x: _place(x, sharding), batch)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places a pytree replicated over ``mesh`` (every process passes the same values)."""
    sharding = NamedSharding(mesh, P())
    return jax.tree.map(lambda x: _place(x, sharding), tree)


def _place(x: Any, sharding: NamedSharding) -> jax.Array:
    if _is_key(x):  # typed PRNG keys travel as their raw data
        data = jax.make_array_from_process_local_data(sharding, np.asarray(jax.random.key_data(x)))
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    return jax.make_array_from_process_local_data(sharding, np.asarray(x))
