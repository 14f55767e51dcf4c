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
m that divides the per-device batch works. ``sam`` takes the groups one after
the other into one running sum (:class:`sam_optax.GroupedObjective`), so the
step holds one group's buffers and the sum whatever the number of groups
(``benchmarks/memory.py``), for about the time of one plain SAM step
(``benchmarks/msharpness.py``).

The optimizer ``tx`` must contain :func:`sam_optax.sam` with ``axis_name``
equal to the step's data axis for the multi-device steps (that is where the
SAM gradients are averaged); for a plain data-parallel baseline use
``sam(0.0, axis_name=...)``, which averages the gradient and does nothing else.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import math
from collections.abc import Callable
from collections.abc import Hashable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sam_optax import _axes
from sam_optax import _family
from sam_optax import _groups
from sam_optax._family import GroupedObjective
from sam_optax._groups import split_groups
from sam_optax._sampa import SAMPaMemory

__all__ = [
    "CPU_STEPS_IN_FLIGHT",
    "grouped_step",
    "place",
    "pmap_step",
    "replicate",
    "sampa_step",
    "shard_batch",
    "shard_map_step",
    "split_groups",
    "state_specs",
]

LossFn = Callable[..., Any]
Step = Callable[..., tuple[Any, ...]]


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

    def over_devices(x):
        if _is_key(x):
            return x
        if jnp.issubdtype(jnp.result_type(x), jnp.inexact):
            return jax.lax.pmean(x, names)
        return jax.lax.pmax(x, names)

    out = jax.tree.map(over_groups, *aux)
    return jax.tree.map(over_devices, out) if names else out


def _check_updates_averaged(updates: Any, manual: tuple[Hashable, ...]) -> None:
    """The chain must hand back updates that are the same on every device."""
    for u in jax.tree.leaves(updates):
        for name in manual:
            if name in _axes.varying_axes(u):
                raise ValueError(
                    "the optimizer's updates still differ between the devices of axis "
                    f"{name!r}: tx must average the gradients over that axis. Put "
                    f"sam_optax.sam(..., axis_name={name!r}) first in the chain "
                    f"(for a plain data-parallel baseline, sam(0.0, axis_name={name!r}))."
                )


class _WithPrevious(NamedTuple):
    """A step's batch and the last step's (``previous_batch``, for :func:`sam_optax.sampa`)."""

    batch: Any
    previous: Any


def _device_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    has_aux: bool,
    per_example: bool,
    sequential: bool,
    group_size: int | None,
    names: tuple[Hashable, ...],
    params: Any,
    opt_state: Any,
    batch: Any,
    args: tuple[Any, ...],
    rng: jax.Array | None,
) -> tuple[Any, ...]:
    """One SAM step on this device's share of the batch (inside a mapped context or not).

    The share splits into groups of ``group_size`` examples. One group: the
    clean gradient is taken here, with respect to params made varying over
    the ``shard_map`` axes (so it stays per device), and ``tx`` gets the loss
    closure. Several: ``tx`` gets a :class:`~sam_optax.GroupedObjective` and
    takes each group's clean and perturbed gradients itself (``sam``: one
    group after the other), handing back the clean losses and aux through
    ``on_clean``.
    """
    manual = _axes.manual_axes(names)
    previous = None
    if isinstance(batch, _WithPrevious):
        batch, previous = batch
    n_groups = _groups.groups_per_shard(_groups.batch_size(batch), group_size)
    if previous is not None and (n_groups > 1 or per_example):
        raise ValueError(
            "previous_batch is for sam_optax.sampa (its perturbed gradient is taken on the "
            "last step's batch), which takes neither group_size nor per-example losses."
        )
    groups = split_groups(batch, n_groups)
    if rng is not None:
        rng = _axes.fold_in_axis_index(rng, names)

    def group_loss(i: int, point: Any, data: Any = None) -> tuple[jax.Array, Any]:
        kwargs = {} if rng is None else {"rng": jax.random.fold_in(rng, i)}
        out = loss_fn(point, groups[i] if data is None else data, *args, **kwargs)
        return out if has_aux else (out, None)

    if per_example:  # loss_fn gives one loss per example (ESAM); the step descends their mean
        local = _axes.as_varying(params, manual)

        def mean_loss(p: Any) -> tuple[jax.Array, tuple[jax.Array, Any]]:
            losses, aux = group_loss(0, p)
            return jnp.mean(losses), (losses, aux)

        (loss, (losses, aux)), grads = jax.value_and_grad(mean_loss, has_aux=True)(local)
        extra = {"value_fn": lambda p: group_loss(0, p)[0], "value": losses}
        updates, opt_state = tx.update(grads, opt_state, params, **extra)
        auxes = [aux]
    elif n_groups == 1:
        local = _axes.as_varying(params, manual)
        (loss, aux), grads = jax.value_and_grad(lambda p: group_loss(0, p), has_aux=True)(local)
        extra = {"value_fn": lambda p: group_loss(0, p)[0], "value": loss}
        if previous is not None:
            extra["previous_value_fn"] = lambda p: group_loss(0, p, previous)[0]
        updates, opt_state = tx.update(grads, opt_state, params, **extra)
        auxes = [aux]
    else:
        clean: dict[int, tuple[jax.Array, Any]] = {}
        grouped = GroupedObjective(
            value_fn=group_loss,
            n_groups=n_groups,
            on_clean=lambda i, loss, aux: clean.setdefault(i, (loss, aux)),
            sequential=sequential,
        )
        zeros = jax.tree.map(jnp.zeros_like, params)  # not read: tx takes the gradients
        updates, opt_state = tx.update(zeros, opt_state, params, grouped_objective=grouped)
        if len(clean) != n_groups:
            raise ValueError(
                f"group_size splits the batch into {n_groups} groups, but tx did not take "
                "them: its first transformation must be a method of sam_optax (sam, gsam, ...) "
                "with the step's axis_name; for a plain baseline use sam(0.0)."
            )
        loss = sum(clean[i][0] for i in range(n_groups)) / n_groups
        auxes = [clean[i][1] for i in range(n_groups)]
    _check_updates_averaged(updates, manual)
    params = optax.apply_updates(params, updates)
    out = (params, opt_state, _axes.pmean(loss, names))
    return (*out, _reduce_aux(auxes, names)) if has_aux else out


# --------------------------------------------------------------------------
# The step builder under shard_map_step, pmap_step and grouped_step.
# --------------------------------------------------------------------------


def _build_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    *,
    has_aux: bool,
    group_size: int | None,
    axis_name: str | None,
    per_example: bool = False,
    sequential: bool = True,
    n_devices: int,
    compile_body: Callable[[Callable[..., Any]], Callable[..., Any]],
    shape_batch: Callable[[Any], Any] = lambda batch: batch,
    kind: str,
    devices: Any = (),
    donate: bool = False,
) -> Step:
    """``step(params, opt_state, batch, *args, rng=None)`` around one compiled body.

    ``compile_body`` maps (``shard_map`` + ``jit``, ``pmap``, or ``jit``) the
    per-device body over ``axis_name``; ``jax.jit``/``jax.pmap`` cache the
    compiled program per batch shape, number of extra arguments and presence
    of ``rng``. The batch sizes are checked here first, so a batch that does
    not split into devices x groups gets a message with the numbers. On
    several CPU devices of this process (``devices``) a call first waits until
    fewer than :data:`CPU_STEPS_IN_FLIGHT` earlier steps are unfinished (see
    :func:`_bounds_steps_in_flight`).
    """
    _groups.check_group_size(group_size)
    names = _axes.axis_names(axis_name)

    if per_example and group_size is not None:
        raise ValueError(
            "per_example=True (per-example losses, for ESAM) takes no group_size: ESAM "
            "selects examples within each device's share."
        )

    def body(params, opt_state, batch, args, rng):
        return _device_step(
            loss_fn,
            tx,
            has_aux,
            per_example,
            sequential,
            group_size,
            names,
            params,
            opt_state,
            batch,
            args,
            rng,
        )

    compiled = compile_body(body)
    # The losses (replicated on every device) of the steps still running.
    in_flight = _StepsInFlight(devices)
    check_order = _family.OrderCheck(f"sam_optax.parallel ({kind})")

    def step(params, opt_state, batch, *args, rng=None, previous_batch=None):
        if previous_batch is not None:
            batch = _WithPrevious(batch, previous_batch)
        per_device = _groups.shard_size(batch, n_devices, axis_name)
        _groups.groups_per_shard(per_device, group_size, n_devices)
        if donate:
            _check_not_donated(params, opt_state)
        in_flight.wait()
        out = compiled(params, opt_state, shape_batch(batch), tuple(args), rng)
        in_flight.add(out[2])
        check_order(out[1])
        return out

    def lower(params, opt_state, batch, *args, rng=None, previous_batch=None):
        """The step lowered for these arguments (``jax.jit``'s ``lower``): ``.compile()``,
        ``.memory_analysis()``, ``.as_text()``."""
        if previous_batch is not None:
            batch = _WithPrevious(batch, previous_batch)
        _groups.groups_per_shard(
            _groups.shard_size(batch, n_devices, axis_name), group_size, n_devices
        )
        return compiled.lower(params, opt_state, shape_batch(batch), tuple(args), rng)

    step.lower = lower
    step.__doc__ = f"""Returns ``step(params, opt_state, batch, *args, rng=None, previous_batch=None)`` ({kind}).

    ``loss_fn(params, batch, *args) -> loss`` (or ``(loss, aux)`` with
    ``has_aux=True``) is the mean loss of a batch; ``args`` are replicated
    extra inputs (e.g. model state). With ``rng`` given, ``loss_fn`` is
    called with ``rng=key``, the key folded with the device index and the
    group index, and the same key serves both SAM passes (the paper's dropout
    semantics). The step returns ``(params, opt_state, loss)`` and, with
    ``has_aux``, ``aux`` last: the clean pass's aux (at ``w``, not at the
    perturbed point), averaged over groups and devices (non-float leaves:
    their maximum). ``previous_batch`` (the last step's, split over the
    devices the same way) is for :func:`sam_optax.sampa`, which takes its
    perturbed gradient on it (``previous_value_fn``).
    """
    return step


def _check_not_donated(params: Any, opt_state: Any) -> None:
    """Refuses params or state an earlier call of a donating step already consumed.

    Passing a donated array again fails inside XLA (on several CPU devices,
    jaxlib 0.10, by crashing the process); this names the fix instead.
    """
    for name, tree in (("params", params), ("opt_state", opt_state)):
        for leaf in jax.tree.leaves(tree):
            if _deleted(leaf):
                raise ValueError(
                    f"the {name} passed to the step were donated to an earlier call (the "
                    "step builders donate params and optimizer state by default): pass the "
                    "ones that call returned, or build the step with donate=False to keep "
                    "your arrays."
                )


def _deleted(x: Any) -> bool:
    """Whether ``x`` is an array whose buffer was deleted (a traced value is not)."""
    try:
        return isinstance(x, jax.Array) and x.is_deleted()
    except jax.errors.ConcretizationTypeError:  # the step called inside a trace
        return False


def _bounds_steps_in_flight(devices: Any) -> bool:
    """Whether steps over ``devices`` must be kept at most :data:`CPU_STEPS_IN_FLIGHT` ahead.

    XLA:CPU runs a step's collectives over the devices of one process by a
    rendezvous of one thread per device, and bounds the computations in
    flight on each device. A training loop that never reads a value back
    dispatches steps faster than they run; past that bound a device's launch
    waits inside the runtime's thread pool, a rendezvous is left one
    participant short, and XLA aborts the whole process after its termination
    timeout (40 s). Measured here (jaxlib 0.10.2, 2 cores; 0.10.0 alike): a
    shard_map or pmap step over 8 CPU devices deadlocked with 40 or more steps
    dispatched ahead and finished 3000 steps with 2 to 32 ahead
    (``tests/test_parallel.py::test_long_unsynchronized_loops_on_cpu_devices_finish``
    fails without this bound). Two steps in flight cost 1-4% against
    unbounded dispatch (``benchmarks/cpu_dispatch.py``). GPUs and TPUs, and
    one device, are left to JAX's asynchronous dispatch.
    """
    all_devices = np.ravel(np.asarray(devices, dtype=object))
    local = [d for d in all_devices if d.process_index == jax.process_index()]
    return len(local) > 1 and all(d.platform == "cpu" for d in local)


#: Steps of a multi-device CPU step function allowed in flight at once.
CPU_STEPS_IN_FLIGHT = 2


class _StepsInFlight:
    """The outputs of the steps still running, where they must be bounded (see above)."""

    def __init__(self, devices: Any) -> None:
        self.running = collections.deque() if _bounds_steps_in_flight(devices) else None

    def wait(self) -> None:
        """Waits until fewer than :data:`CPU_STEPS_IN_FLIGHT` earlier steps are unfinished."""
        while self.running is not None and len(self.running) >= CPU_STEPS_IN_FLIGHT:
            earlier = self.running.popleft()
            if not earlier.is_deleted():
                earlier.block_until_ready()

    def add(self, output: jax.Array) -> None:
        if self.running is not None:
            self.running.append(output)


def shard_map_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    *,
    axis_name: str | tuple[str, ...] = "data",
    group_size: int | None = None,
    has_aux: bool = False,
    per_example: bool = False,
    sequential: bool = True,
    donate: bool = True,
) -> Step:
    """A jitted data-parallel SAM step on ``jax.shard_map`` over ``mesh``.

    The batch is split along its leading axis over ``axis_name`` (a mesh axis,
    or a tuple of them); params, optimizer state and extra ``args`` are not
    split along it: replicated (use :func:`shard_batch` and :func:`replicate`
    to place them, one host or many), or, on a mesh with more axes (``data x
    model``), sharded over the other axes as they were placed
    (:func:`place`, :func:`state_specs`): tensor-parallel or FSDP layouts
    within each data replica. Only the data axes are manual in the
    ``shard_map``; the others stay automatic, so make them
    ``AxisType.Auto`` (XLA partitions the model-sharded contractions). Each
    data replica differentiates its own shard with respect to params made
    varying (so the gradient is not summed over the replicas: the
    ``shard_map`` trap), ``sam`` perturbs with it and averages the SAM
    gradients; ``tx`` must contain ``sam_optax.sam(axis_name=axis_name)``.
    ``group_size=m`` splits each replica's share into groups of m examples
    with one perturbation each. Params and state come back with the
    shardings they went in with.

    Args:
      loss_fn: ``loss_fn(params, batch, *args[, rng=key]) -> loss`` (or
        ``(loss, aux)``), the mean loss of a batch; ``args`` are replicated
        extra inputs (e.g. model state). With ``rng`` given to the step,
        ``loss_fn`` gets ``rng=key``, the key folded with the device and the
        group index, and the same key serves both SAM passes (the paper's
        dropout semantics).
      tx: an optax transformation containing ``sam(axis_name=axis_name)``.
      mesh: the device mesh; ``axis_name`` must name its data axes.
      axis_name: the data axis, or a tuple of data axes.
      group_size: examples per perturbation within a replica (None: the whole share).
      has_aux: ``loss_fn`` returns ``(loss, aux)``.
      per_example: ``loss_fn`` returns the per-example losses of the batch
        (a vector; the step descends their mean), for
        :func:`sam_optax.esam`; no ``group_size`` then.
      sequential: with ``group_size``, ``sam`` takes the groups one after the
        other (one group's memory, whatever their number); ``False`` takes
        them in one pass (one params-sized buffer per group; faster on small
        models, see :class:`sam_optax.GroupedObjective`).
      donate: donate the params and optimizer state passed in to the step
        (their buffers hold the results: a training loop that rebinds
        ``params, state, loss = step(params, state, batch)`` holds one copy);
        the arrays passed in are deleted. ``donate=False`` keeps them.

    Returns:
      ``step(params, opt_state, batch, *args, rng=None) -> (params, opt_state,
      loss)`` and, with ``has_aux``, ``aux`` last: the mean clean loss and the
      clean pass's aux (at ``w``, not at the perturbed point), averaged over
      groups and devices (non-float leaves: their maximum).

    Raises:
      ValueError: at call time, when the batch does not split into devices x
        groups (the message gives the sizes).
    """
    names = _axes.axis_names(axis_name)
    for name in names:
        if name not in mesh.axis_names:
            raise ValueError(f"axis_name={name!r} is not an axis of the mesh {mesh.axis_names}.")
    data_spec = P(names if len(names) > 1 else names[0])
    manual = set(names) if len(names) < len(mesh.axis_names) else None

    replicas = math.prod(mesh.shape[n] for n in names)

    def compile_body(body):
        if replicas == 1 and manual:
            mapped = _one_replica(body, names)
        else:
            mapped = jax.shard_map(
                body,
                mesh=mesh,
                in_specs=(P(), P(), data_spec, P(), P()),
                out_specs=P(),
                **({"axis_names": manual} if manual else {}),
            )

        # Without shard_map (one replica) the loss's PartitionSpecs need the mesh in context.
        one = replicas == 1 and bool(manual)
        return _jit_on_mesh(
            mapped, mesh, names, donate, one_replica=one, batch_spec=None if one else data_spec
        )

    return _build_step(
        loss_fn,
        tx,
        has_aux=has_aux,
        group_size=group_size,
        axis_name=names if len(names) > 1 else names[0],
        n_devices=math.prod(mesh.shape[n] for n in names),
        per_example=per_example,
        sequential=sequential,
        compile_body=compile_body,
        kind="shard_map",
        devices=mesh.devices,
        donate=donate,
    )


def _jit_on_mesh(
    mapped: Callable[..., Any],
    mesh: Mesh,
    names: tuple[Hashable, ...],
    donate: bool,
    one_replica: bool = False,
    batch_spec: P | None = None,
) -> Callable[..., Any]:
    """``call(params, opt_state, *rest)``: ``mapped`` jitted, params and state kept where they were.

    The placement of params and state is not part of the traced types (the
    model axes are automatic), so it keys a cache of compiled steps: the
    step hands them back with the shardings they came in with. JAX's
    sharding errors come back with the edit (:func:`_sharding_errors_explained`);
    ``call.lower(...)`` lowers the step. ``one_replica``: ``mapped`` has no
    ``shard_map`` to give the loss's PartitionSpecs a mesh, so the call sets it.
    ``batch_spec``: the batch (the argument after the state) is placed so
    first where a data axis is Explicit (``jax.make_mesh``'s default), which
    ``shard_map`` requires of its inputs there; Auto axes reshard by
    themselves.
    """
    explicit = batch_spec is not None and any(
        t == AxisType.Explicit for n, t in zip(mesh.axis_names, mesh.axis_types) if n in names
    )

    @functools.lru_cache(maxsize=8)
    def compiled(treedef: Any, shardings: tuple[Any, ...]) -> Callable[..., Any]:
        def step(params, opt_state, batch, *rest):
            if explicit:
                batch = jax.sharding.reshard(batch, NamedSharding(mesh, batch_spec))
            out = mapped(params, opt_state, batch, *rest)
            leaves = jax.tree.leaves((out[0], out[1]))
            kept = [
                x if s is None else jax.lax.with_sharding_constraint(x, s)
                for x, s in zip(leaves, shardings)
            ]
            return (*jax.tree.unflatten(treedef, kept), *out[2:])

        return jax.jit(step, donate_argnums=(0, 1) if donate else ())

    def jitted(params, opt_state):
        leaves, treedef = jax.tree.flatten((params, opt_state))
        return compiled(treedef, tuple(_named_sharding(x, mesh) for x in leaves))

    context = (lambda: jax.set_mesh(mesh)) if one_replica else contextlib.nullcontext

    def call(params, opt_state, *rest):
        with _sharding_errors_explained(mesh, names), context():
            return jitted(params, opt_state)(params, opt_state, *rest)

    def lower(params, opt_state, *rest):
        with _sharding_errors_explained(mesh, names), context():
            return jitted(params, opt_state).lower(params, opt_state, *rest)

    call.lower = lower
    return call


def _one_replica(body: Callable[..., Any], names: tuple[Hashable, ...]) -> Callable[..., Any]:
    """``body`` with the data axes (all of size 1) bound by ``jax.vmap`` instead of ``shard_map``.

    On a ``(1, n)`` mesh a ``shard_map`` manual over the data axis alone makes
    XLA's partitioner abort on the averaging collective (jaxlib 0.10.2 and
    0.12.1: "Cross-partition allreduce must be in (partial) manual
    partitioning mode"); one replica needs no collective, and a ``vmap`` of
    size 1 binds the axis names the optimizer averages over.
    """
    mapped = body
    for name in reversed(names):
        mapped = jax.vmap(mapped, in_axes=(None, None, 0, None, None), axis_name=name, axis_size=1)

    def call(params, opt_state, batch, args, rng):
        batch = jax.tree.map(lambda x: x.reshape((1,) * len(names) + x.shape), batch)
        out = mapped(params, opt_state, batch, args, rng)
        return jax.tree.map(lambda x: x[(0,) * len(names)], out)

    return call


@contextlib.contextmanager
def _sharding_errors_explained(mesh: Mesh, names: tuple[Hashable, ...]) -> Any:
    """Re-raises JAX's sharding errors met while tracing the loss with the edit that fixes them.

    Two come from models written for a plain ``jit`` step: an activation
    constraint naming a data axis, which is manual inside the per-device step
    (JAX: "can only refer to Auto axes ... You probably meant to use
    `reshard` API?"), and a model-sharded contraction on a mesh of Explicit
    axes, ``jax.make_mesh``'s default (JAX: "Contracting dimensions are
    sharded ...").
    """
    try:
        yield
    except Exception as err:
        text = str(err)
        explicit = [
            n
            for n, t in zip(mesh.axis_names, mesh.axis_types)
            if n not in names and t == AxisType.Explicit
        ]
        if explicit and (type(err).__name__ == "ShardingTypeError" or "Auto" in text):
            raise ValueError(
                f"the mesh's axes {tuple(explicit)!r} are Explicit (jax.make_mesh's default "
                f"since jax 0.10), and the loss is not written for them: {text.splitlines()[0]} "
                f"Build the mesh with axis_types=(jax.sharding.AxisType.Auto,) * "
                f"{len(mesh.axis_names)} to let XLA partition the model-sharded operations "
                "(what models written for GSPMD, such as the Flax guide's, expect), or write "
                "the loss for Explicit sharding (out_sharding=, jax.sharding.reshard)."
            ) from err
        named = [n for n in names if repr(n) in text.split("mesh=")[0]]
        if not isinstance(err, ValueError) or "only refer to Auto axes" not in text or not named:
            raise
        others = [n for n in mesh.axis_names if n not in names]
        written = ", ".join(map(repr, [named[0], *others[:1]]))
        edit = ", ".join(["P.UNCONSTRAINED", *map(repr, others[:1])])
        raise ValueError(
            f"the loss constrains an activation's sharding over the data axis {named[0]!r} "
            "(jax.lax.with_sharding_constraint or nnx.with_sharding_constraint with a "
            f"PartitionSpec naming {named[0]!r}), but inside sam_optax's per-device step "
            "that axis is manual: each device computes its own shard of the batch. Leave "
            f"the batch dimension to the step: write P({edit}) where the model writes "
            f"P({written}). Under a plain jit step P.UNCONSTRAINED keeps the batch's data "
            "sharding (None would replicate it)."
        ) from err


def _named_sharding(x: Any, mesh: Mesh) -> NamedSharding | None:
    """``x``'s sharding when it is a ``NamedSharding`` on ``mesh``, else ``None``."""
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, NamedSharding) and sharding.mesh == mesh:
        return sharding
    return None


def sampa_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    *,
    axis_name: str = "data",
    donate: bool = True,
) -> Step:
    r"""SAMPa's two gradients at the same time, on the two halves of a mesh axis.

    ``tx`` is :func:`sam_optax.sampa` (its base optimizer inside). The axis's
    2k devices split in two halves of k: the first takes
    :math:`\nabla f(\tilde x_t)` on the previous batch, the second
    :math:`\nabla f(y_{t+1})` on the current one, each half data-parallel
    over its own devices (k shards of its batch), each device one gradient;
    one all-reduce over the axis gives both halves' means, and every device
    takes the base optimizer's step. On devices that compute independently
    (two GPUs) a step then takes one gradient's time (on CPU devices that
    share cores it does not: ``benchmarks/sampa.py``), and equals
    :func:`sam_optax.sampa`'s one-device form, which takes the two in
    sequence, to float rounding. Params and state are replicated over the
    axis; on a mesh with more axes (data x model) only ``axis_name`` is
    manual and the params keep their shardings over the others (as in
    :func:`shard_map_step`).

    Args:
      loss_fn: ``loss_fn(params, batch, *args) -> loss``, the mean loss of a batch.
      tx: ``sam_optax.sampa(base, rho, lam)`` (without ``axis_name``).
      mesh: the device mesh.
      axis_name: the mesh axis whose two halves take the two gradients; its
        size must be even.
      donate: donate params and optimizer state (as in :func:`shard_map_step`).

    Returns:
      ``step(params, opt_state, batch, *args, previous_batch=None) ->
      (params, opt_state, loss)``: ``previous_batch`` is the last step's batch
      (``None``: ``batch``, as at the first step); ``loss`` is
      :math:`f(\tilde x_t)` on it, the loss SAM's perturbed pass sees.
      ``step.lower(...)`` lowers it.

    Raises:
      ValueError: when the step is built, for an axis of odd size or one not
        in the mesh; at the first call, for a ``tx`` that is not ``sampa``
        or a batch that does not split over a half.
    """
    if not isinstance(axis_name, str) or axis_name not in mesh.axis_names:
        raise ValueError(
            f"sampa_step: axis_name must name one axis of the mesh {mesh.axis_names}, got "
            f"axis_name={axis_name!r}."
        )
    size = mesh.shape[axis_name]
    if size % 2:
        raise ValueError(
            f"sampa_step: the axis {axis_name!r} has {size} device(s); its two halves take "
            "SAMPa's two gradients, so its size must be even (2 or more devices per pair: "
            f"jax.make_mesh((2 * k, ...), ({axis_name!r}, ...)))."
        )
    if jax.process_count() > 1:
        raise ValueError(
            "sampa_step runs in one process: the two batches are laid out over the pair "
            "axis here; with jax.distributed use sam_optax.sampa(base, axis_name=...) under "
            "shard_map_step, which takes the two gradients in sequence."
        )
    half = size // 2
    manual = {axis_name} if len(mesh.axis_names) > 1 else None
    names = (axis_name,)

    def body(params, opt_state, batch, args):
        def value_fn(p):
            return loss_fn(p, batch, *args)

        zeros = jax.tree.map(jnp.zeros_like, params)  # not read: sampa takes its gradients
        updates, opt_state = tx.update(
            zeros, opt_state, params, value_fn=value_fn, pair_axis=axis_name
        )
        _check_updates_averaged(updates, _axes.manual_axes(names))
        params = optax.apply_updates(params, updates)
        return params, opt_state, optax.tree.get(opt_state, "perturbed_loss")

    mapped = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(P(), P(), P(axis_name), P()),
        out_specs=P(),
        **({"axis_names": manual} if manual else {}),
    )
    compiled = _jit_on_mesh(mapped, mesh, names, donate, batch_spec=P(axis_name))
    in_flight = _StepsInFlight(mesh.devices)

    def arguments(opt_state, batch, previous_batch):
        if not any(
            isinstance(x, SAMPaMemory)
            for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, SAMPaMemory))
        ):
            raise ValueError(
                "sampa_step takes the state of sam_optax.sampa(base, rho, lam) as tx: got a "
                "state without SAMPa's memory. Build tx = sam_optax.sampa(optax.sgd(lr, "
                "momentum=0.9), rho=0.1, lam=0.2)."
            )
        previous = batch if previous_batch is None else previous_batch
        sizes = _groups.batch_size(previous), _groups.batch_size(batch)
        if sizes[0] != sizes[1]:
            raise ValueError(
                f"sampa_step: previous_batch has {sizes[0]} examples and batch {sizes[1]}: the "
                f"two halves of axis {axis_name!r} take one each, so they must be the same "
                "size. Drop the short last batch of an epoch (e.g. drop_remainder=True in the "
                "loader) or pad it to the others' size."
            )
        for which, b in (("batch", batch), ("previous_batch", previous)):
            n = _groups.batch_size(b)
            if n % half:
                raise ValueError(
                    f"sampa_step: {which} has {n} examples, which do not split over the {half} "
                    f"devices of each half of axis {axis_name!r}."
                )
        return jax.tree.map(lambda a, b: jnp.concatenate([a, b]), previous, batch)

    def step(params, opt_state, batch, *args, previous_batch=None):
        pair = arguments(opt_state, batch, previous_batch)
        if donate:
            _check_not_donated(params, opt_state)
        in_flight.wait()
        out = compiled(params, opt_state, pair, tuple(args))
        in_flight.add(out[2])
        return out

    def lower(params, opt_state, batch, *args, previous_batch=None):
        return compiled.lower(
            params, opt_state, arguments(opt_state, batch, previous_batch), tuple(args)
        )

    step.lower = lower
    return step


def pmap_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    *,
    axis_name: str = "batch",
    group_size: int | None = None,
    has_aux: bool = False,
    per_example: bool = False,
    sequential: bool = True,
    devices: list[Any] | None = None,
    donate: bool = True,
) -> Step:
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
      per_example: ``loss_fn`` returns per-example losses (ESAM; as in
        :func:`shard_map_step`).
      sequential: the groups one after the other (as in :func:`shard_map_step`).
      devices: the devices to map over (default: all local devices).
      donate: donate the params and optimizer state passed in (as in
        :func:`shard_map_step`).

    Returns:
      ``step(params, opt_state, batch, *args, rng=None)``, returning as
      :func:`shard_map_step`'s does.
    """
    devs = list(devices) if devices is not None else jax.local_devices()
    n_dev = len(devs)

    def compile_body(body):
        return jax.pmap(
            body,
            axis_name=axis_name,
            in_axes=(None, None, 0, None, None),
            out_axes=None,
            devices=devs,
            donate_argnums=(0, 1) if donate else (),
        )

    def per_device(batch):
        return jax.tree.map(lambda x: x.reshape(n_dev, x.shape[0] // n_dev, *x.shape[1:]), batch)

    return _build_step(
        loss_fn,
        tx,
        has_aux=has_aux,
        group_size=group_size,
        axis_name=axis_name,
        n_devices=n_dev,
        per_example=per_example,
        sequential=sequential,
        compile_body=compile_body,
        shape_batch=per_device,
        kind="pmap",
        devices=devs,
        donate=donate,
    )


def grouped_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    *,
    group_size: int | None = None,
    has_aux: bool = False,
    per_example: bool = False,
    sequential: bool = True,
    donate: bool = True,
) -> Step:
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
      per_example: ``loss_fn`` returns per-example losses (ESAM; as in
        :func:`shard_map_step`).
      sequential: the groups one after the other (as in :func:`shard_map_step`).
      donate: donate the params and optimizer state passed in (as in
        :func:`shard_map_step`).

    Returns:
      ``step(params, opt_state, batch, *args, rng=None)``, returning as
      :func:`shard_map_step`'s does.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> from sam_optax.parallel import grouped_step
      >>> loss = lambda w, b: jnp.mean((b[:, 0] * w - b[:, 1]) ** 2)
      >>> tx = optax.chain(sam_optax.sam(0.1), optax.sgd(0.1))
      >>> step = grouped_step(loss, tx, group_size=2)
      >>> batch = jnp.array([[1.0, 2.0], [2.0, 3.0], [1.0, 1.0], [3.0, 2.0]])
      >>> w = jnp.zeros(())
      >>> w, state, value = step(w, tx.init(w), batch)
      >>> print(round(float(value), 3))
      4.5
    """
    return _build_step(
        loss_fn,
        tx,
        has_aux=has_aux,
        group_size=group_size,
        axis_name=None,
        n_devices=1,
        per_example=per_example,
        sequential=sequential,
        compile_body=lambda body: jax.jit(body, donate_argnums=(0, 1) if donate else ()),
        kind="one device",
        donate=donate,
    )


# --------------------------------------------------------------------------
# Placing data on a mesh (one process or many).
# --------------------------------------------------------------------------


def _names_spec(axis_name: str | tuple[str, ...]) -> P:
    names = _axes.axis_names(axis_name)
    return P(names if len(names) > 1 else names[0])


def shard_batch(batch: Any, mesh: Mesh, axis_name: str | tuple[str, ...] = "data") -> Any:
    """Makes a global batch sharded along ``axis_name`` from this process's part.

    With one process the local batch is the global batch. After
    ``jax.distributed.initialize`` each process passes its own slice (in
    process order) and gets the global array whose shards live on its devices.
    ``axis_name`` may be a tuple of data axes (the batch splits over all).
    """
    n_dev = math.prod(mesh.shape[n] for n in _axes.axis_names(axis_name))
    size = _groups.batch_size(batch) * jax.process_count()
    if size % n_dev:
        raise ValueError(
            f"batch of {size} examples does not split over the {n_dev} devices of "
            f"axis {axis_name!r}."
        )
    sharding = NamedSharding(mesh, _names_spec(axis_name))
    return jax.tree.map(lambda x: _place_local(x, sharding), batch)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places a pytree replicated over ``mesh`` (every process passes the same values)."""
    return place(tree, mesh)


def place(tree: Any, mesh: Mesh, specs: Any = None) -> Any:
    """Places a pytree on ``mesh`` with the given ``PartitionSpec``\\s (``None``: replicated).

    ``specs`` is a tree of ``PartitionSpec`` matching ``tree`` (or a prefix
    of it), e.g. ``{'w1': P(None, 'model'), 'w2': P('model', None)}`` for
    tensor-parallel layers. Every process passes the full values; each keeps
    the pieces its devices hold (one host or many).
    """
    if specs is None:
        specs = P()
    shardings = jax.tree.map(
        lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P)
    )
    return jax.tree.map(
        lambda s, sub: jax.tree.map(lambda x: _place_full(x, s), sub), shardings, tree
    )


def state_specs(tx: optax.GradientTransformation, opt_state: Any, param_specs: Any) -> Any:
    """``PartitionSpec``\\s for an optimizer state: each params-like leaf (momentum,
    LookSAM's direction, ...) takes its param's spec, everything else is replicated.

    ``param_specs`` is the full tree of specs for the params (one per leaf).
    Built with ``optax.tree_map_params``.
    """
    return optax.tree_map_params(
        tx,
        lambda _, spec: spec,
        opt_state,
        param_specs,
        transform_non_params=lambda _: P(),
        is_leaf=lambda x: isinstance(x, P),
    )


def _place_local(x: Any, sharding: NamedSharding) -> jax.Array:
    """This process's part of a global array (the batch)."""
    if _is_key(x):  # typed PRNG keys travel as their raw data
        data = _place_local(jax.random.key_data(x), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    return jax.make_array_from_process_local_data(sharding, np.asarray(x))


def _place_full(x: Any, sharding: NamedSharding) -> jax.Array:
    """A global array from the full value every process holds."""
    if _is_key(x):
        data = _place_full(jax.random.key_data(x), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    value = np.asarray(x)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])
