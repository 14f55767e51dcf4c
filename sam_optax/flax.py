"""Flax integration (NNX and Linen) with the paper's BatchNorm and dropout semantics.

What the paper's JAX implementation does, and what every helper here does:

* **BatchNorm**: both passes run the model in training mode (each pass is
  normalized with its own batch statistics); the running statistics kept are
  those of the clean pass at ``w``; the perturbed pass's statistics are
  dropped. Nothing is updated twice.
* **Dropout** (any randomness): the same key in both passes, so the
  perturbation is measured on the same sub-network.
* **Finetuning** (appendix C.2): frozen BatchNorm, normalizing with the
  running averages and updating nothing (:func:`freeze_batch_norm` for NNX,
  ``update_batch_stats=False`` for Linen).
* **Data parallel**: the loss adapters (:func:`nnx_loss_fn`,
  :func:`linen_loss_fn`) plug into :mod:`sam_optax.parallel`; each device
  normalizes with its own batch statistics (as the paper) and the updated
  running statistics are averaged over the devices, so evaluation and
  checkpoints see one set. For cross-device statistics, build the model's
  BatchNorm with ``axis_name`` equal to the data axis.

Flax is an optional extra (``pip install 'flax>=0.12.7'``, or from a clone
``pip install -e '.[flax]'``): ``import sam_optax`` does not import this
module, and importing it without Flax says what to install.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import optax

try:
    from flax import nnx
    from flax.training import train_state
except ModuleNotFoundError as err:  # pragma: no cover - exercised in a subprocess
    raise ModuleNotFoundError(
        f"sam_optax.flax needs Flax, which is not installed here ({err}). Install it with "
        "pip install 'flax>=0.12.7'; from a clone of the sam_optax repository, "
        "pip install -e '.[flax]' in its root installs the package with that extra."
    ) from err

from sam_optax import _family

__all__ = [
    "SAMTrainState",
    "freeze_batch_norm",
    "linen_loss_fn",
    "linen_normalization_mask",
    "linen_train_step",
    "nnx_loss_fn",
    "nnx_normalization_mask",
    "nnx_shard_map_step",
    "nnx_train_step",
    "nnx_value_and_grad",
    "nnx_value_fn",
    "nnx_variable_mask",
]


# --------------------------------------------------------------------------
# NNX.
# --------------------------------------------------------------------------


def _graph_nodes(args: tuple[Any, ...]) -> tuple[list[Any], Callable[[list[Any]], tuple[Any, ...]]]:
    """The NNX graph nodes among ``args`` (at any depth of their pytrees), and a rebuild.

    ``rebuild(copies)`` returns ``args`` with each node replaced by its copy.
    """
    leaves, treedef = jax.tree.flatten(args, is_leaf=nnx.graph.is_graph_node)
    where = [i for i, x in enumerate(leaves) if nnx.graph.is_graph_node(x)]

    def rebuild(copies: list[Any]) -> tuple[Any, ...]:
        new = list(leaves)
        for i, c in zip(where, copies, strict=True):
            new[i] = c
        return jax.tree.unflatten(treedef, new)

    return [leaves[i] for i in where], rebuild


def nnx_value_fn(
    model: nnx.Module,
    loss_fn: Callable[..., Any],
    *args: Any,
    wrt: Any = nnx.Param,
    has_aux: bool = False,
) -> Callable[[Any], Any]:
    """The ``value_fn`` for ``nnx.Optimizer.update(model, grads, value_fn=...)``.

    Call it BEFORE the clean forward/backward pass (or use
    :func:`nnx_value_and_grad`, which does): it takes a pure snapshot of the
    model and of every NNX object among ``args`` (an ``nnx.Rngs`` passed to
    the loss, as in the Flax examples, another module...), jointly, so shared
    references stay shared. Each call of the closure works on fresh copies of
    that snapshot with the params it is given: the perturbed pass draws the
    same RNG counters as the clean pass (the same dropout masks), runs
    BatchNorm on a throw-away copy, and mutates nothing the caller holds
    (inside ``sam``'s ``jax.grad`` that would raise a ``TraceContextError``).
    ``nnx.Optimizer`` hands the params to ``tx.update`` as an ``nnx.State``;
    it replaces the copy's params.

    Args:
      model: the NNX model.
      loss_fn: ``loss_fn(model, *args) -> loss`` (or ``(loss, aux)``).
      *args: the batch, an ``nnx.Rngs`` and any other inputs of ``loss_fn``.
      wrt: accepted for symmetry with ``nnx.Optimizer``; the params passed to
        the closure decide what is replaced.
      has_aux: ``loss_fn`` returns ``(loss, aux)``; the closure returns the loss.

    Returns:
      ``value_fn(params_state) -> loss``.
    """
    del wrt  # the params given to the closure say which variables they replace
    nodes, rebuild = _graph_nodes(args)
    graphdef, state = nnx.split((model, *nodes))
    snapshot = nnx.as_pure(state)

    def value_fn(params: Any) -> Any:
        model_copy, *copies = nnx.merge(graphdef, snapshot)
        nnx.update(model_copy, nnx.as_pure(params))
        out = loss_fn(model_copy, *rebuild(copies))
        return out[0] if has_aux else out

    return value_fn


def nnx_value_and_grad(
    loss_fn: Callable[..., Any], *, has_aux: bool = False, wrt: Any = nnx.Param
) -> Callable[..., tuple[Any, Any, Callable[[Any], Any]]]:
    """``nnx.value_and_grad`` that also returns SAM's closure, taken at the right time.

    ``f(model, *args) -> (out, grads, value_fn)``: the snapshot for
    :func:`nnx_value_fn` is taken first, then the clean pass runs (updating
    BatchNorm statistics and advancing the ``nnx.Rngs`` in ``args`` once, as
    a plain step does). A drop-in for the Flax examples' step::

        (loss, logits), grads, value_fn = sam_flax.nnx_value_and_grad(loss_fn, has_aux=True)(
            model, batch, rngs
        )
        metrics.update(loss=loss, logits=logits, labels=batch["label"])
        optimizer.update(model, grads, value_fn=value_fn)

    Args:
      loss_fn: ``loss_fn(model, *args) -> loss`` (or ``(loss, aux)``).
      has_aux: ``loss_fn`` returns ``(loss, aux)``.
      wrt: the filter of the differentiated state (``nnx.Optimizer``'s ``wrt``).

    Returns:
      ``f(model, *args) -> (out, grads, value_fn)``.
    """
    grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt), has_aux=has_aux)

    def value_and_grad(model: nnx.Module, *args: Any) -> tuple[Any, Any, Callable[[Any], Any]]:
        value_fn = nnx_value_fn(model, loss_fn, *args, has_aux=has_aux)
        out, grads = grad_fn(model, *args)
        return out, grads, value_fn

    return value_and_grad


def nnx_train_step(loss_fn: Callable[..., Any], *, has_aux: bool = False) -> Callable[..., Any]:
    """A jit-compiled SAM train step for an ``nnx.Optimizer`` whose ``tx`` contains ``sam``.

    ``step(model, optimizer, *args)`` runs the clean pass (updating BatchNorm
    statistics and the RNG counters of the model and of any ``nnx.Rngs`` in
    ``args`` in place, once), then ``optimizer.update(model, grads,
    value_fn=..., value=loss)`` whose perturbed pass runs on a snapshot taken
    before the clean pass (:func:`nnx_value_and_grad`); the clean ``value``
    makes the sharpness diagnostic available
    (``optax.tree.get(optimizer.opt_state, 'sharpness')``). Returns the clean pass's output:
    the loss, or ``(loss, aux)`` with ``has_aux``. To update
    ``nnx.MultiMetric`` inside the compiled step, call it from your own
    ``nnx.jit`` function::

        sam_step = sam_flax.nnx_train_step(loss_fn, has_aux=True)

        @nnx.jit
        def train_step(model, optimizer, metrics, batch, rngs):
            loss, logits = sam_step(model, optimizer, batch, rngs)
            metrics.update(loss=loss, logits=logits, labels=batch["label"])

    Args:
      loss_fn: ``loss_fn(model, *args) -> loss`` (or ``(loss, aux)``).
      has_aux: ``loss_fn`` returns ``(loss, aux)``.

    Returns:
      ``step(model, optimizer, *args)``, an ``nnx.jit`` function.
    """

    @nnx.jit
    def jitted(model: nnx.Module, optimizer: nnx.Optimizer, *args: Any) -> Any:
        out, grads, value_fn = nnx_value_and_grad(loss_fn, has_aux=has_aux, wrt=optimizer.wrt)(
            model, *args
        )
        value = out[0] if has_aux else out
        optimizer.update(model, grads, value_fn=value_fn, value=value)
        return out

    return _checked_first_call(jitted, lambda a: a[1].opt_state, "sam_optax.flax.nnx_train_step")


def _checked_first_call(
    step: Callable[..., Any], opt_state_of: Callable[[tuple[Any, ...]], Any], where: str
) -> Callable[..., Any]:
    """``step``, which after its first calls outside a trace checks the chain's order.

    ``opt_state_of(args_and_result)`` finds the optimizer state after the call
    (see :class:`sam_optax._family.OrderCheck`).
    """
    check_order = _family.OrderCheck(where)

    @functools.wraps(step)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        out = step(*args, **kwargs)
        check_order(opt_state_of((*args, out)))
        return out

    return wrapped


def freeze_batch_norm(model: nnx.Module, frozen: bool = True) -> nnx.Module:
    """Makes every ``nnx.BatchNorm`` normalize with its running averages and update nothing.

    The finetuning setting of the paper (appendix C.2). ``frozen=False``
    undoes it. Returns the model (modified in place).
    """
    for _, module in nnx.iter_modules(model):
        if isinstance(module, nnx.BatchNorm):
            module.use_running_average = frozen
    return model


def nnx_loss_fn(
    graphdef: Any,
    loss_fn: Callable[..., Any],
    *,
    rng_streams: tuple[str, ...] = ("dropout",),
    pass_rngs: bool = False,
    has_aux: bool = False,
) -> Callable[..., tuple[Any, Any]]:
    """Adapts an NNX loss to :mod:`sam_optax.parallel` (``has_aux=True`` there).

    With ``graphdef, params, rest = nnx.split(model, nnx.Param, ...)``, the
    returned ``f(params, batch, rest, rng=None) -> (loss, new_rest)`` merges
    the model, calls ``loss_fn(model, batch)`` and returns the non-parameter
    state after that pass (BatchNorm statistics, RNG counters). Used as the
    step builders' loss, ``new_rest`` comes from the clean pass and is
    averaged over groups and devices. With ``rng`` given (the builders fold
    it per device and group), the model's streams in ``rng_streams`` are
    reseeded from it, the same way in both SAM passes; the RNG keys in
    ``new_rest`` stay those of ``rest``. With ``pass_rngs=True`` the loss is
    the Flax examples' ``loss_fn(model, batch, rngs)`` and gets an
    ``nnx.Rngs`` of those streams built from ``rng`` (``None`` without one).

    Args:
      graphdef: from ``nnx.split(model, nnx.Param, ...)``.
      loss_fn: ``loss_fn(model, batch) -> loss``, or ``loss_fn(model, batch,
        rngs)`` with ``pass_rngs=True``.
      rng_streams: the RNG streams made from ``rng``.
      pass_rngs: pass an ``nnx.Rngs`` to ``loss_fn`` instead of reseeding the model.
      has_aux: ``loss_fn`` returns ``(loss, aux)``; ``f`` then returns
        ``(loss, (new_rest, aux))``.

    Returns:
      ``f(params, batch, rest, rng=None) -> (loss, new_rest)``.
    """

    def streams(rng: jax.Array) -> dict[str, jax.Array]:
        return {name: jax.random.fold_in(rng, i) for i, name in enumerate(rng_streams)}

    def f(params: Any, batch: Any, rest: Any, rng: jax.Array | None = None) -> tuple[Any, Any]:
        model = nnx.merge(graphdef, params, rest)
        keys = None
        if pass_rngs:
            out = loss_fn(model, batch, None if rng is None else nnx.Rngs(**streams(rng)))
        else:
            if rng is not None:
                keys = nnx.as_pure(nnx.state(model, nnx.RngKey))
                nnx.reseed(model, **streams(rng))
            out = loss_fn(model, batch)
        loss, aux = out if has_aux else (out, None)
        new_rest = nnx.as_pure(nnx.state(model, nnx.Not(nnx.Param)))
        if keys is not None:
            new_rest = nnx.merge_state(new_rest, keys)
        return loss, ((new_rest, aux) if has_aux else new_rest)

    return f


def nnx_shard_map_step(
    loss_fn: Callable[..., Any],
    mesh: jax.sharding.Mesh,
    *,
    axis_name: str | tuple[str, ...] = "data",
    group_size: int | None = None,
    has_aux: bool = False,
    rng_streams: tuple[str, ...] = ("dropout",),
    pass_rngs: bool = False,
    sequential: bool = True,
    donate: bool = True,
) -> Callable[..., Any]:
    """Per-device SAM (m-sharpness) for an NNX model and its ``nnx.Optimizer`` on a mesh.

    ``step(model, optimizer, batch, rngs=None)`` runs one step of
    :func:`sam_optax.parallel.shard_map_step` on the model's params and the
    optimizer's state and writes the results back: the model and the
    optimizer go in and come out updated, as with ``nnx.jit`` and
    ``optimizer.update``, and the training step stays yours. Each data
    replica differentiates its own shard of ``batch`` and perturbs with its own
    gradient (the paper's per-device ε; ``group_size=m`` splits each
    replica's share into groups of m); the SAM gradients are averaged. The
    optimizer's ``tx`` must hold a method of the family with
    ``axis_name`` equal to the step's data axis (``sam(rho,
    axis_name='data')``).

    On a ``('data', 'model')`` mesh the params keep the shardings they were
    placed with (``nnx.with_partitioning`` over ``'model'``, then
    ``jax.device_put`` or ``jax.lax.with_sharding_constraint`` as the Flax
    GSPMD guide does); only the data axes are manual inside the step. So
    activation constraints inside the model cannot name a data axis: write
    ``P(P.UNCONSTRAINED, 'model')`` where the guide writes ``P('data',
    'model')`` (under plain ``jit`` that still keeps the batch's data
    sharding; ``None`` would replicate it). A model that names the data
    axis is refused with that edit.

    BatchNorm and randomness, as in the paper's code: each replica normalizes
    with its own batch's statistics, the clean pass's statistics are kept and
    averaged over the replicas, the perturbed pass's dropped. One key per
    step is drawn from ``rngs`` (an ``nnx.Rngs``: advanced once per step, like
    a plain step; or a key), else from the model's own stream among
    ``rng_streams`` (``nnx.Dropout(..., rngs=...)``), and folded with the
    replica and group index: each replica draws its own dropout masks, the
    same in both passes. The model's streams are reseeded from it for the
    step (or, with ``pass_rngs``, ``loss_fn`` gets an ``nnx.Rngs`` of those
    streams, as in the Flax examples); their own keys and counts are left as
    the draw left them.

    Args:
      loss_fn: ``loss_fn(model, batch) -> loss`` (or ``(loss, aux)`` with
        ``has_aux``; ``loss_fn(model, batch, rngs)`` with ``pass_rngs``), the
        mean loss of a batch.
      mesh: the device mesh; ``axis_name`` names its data axes.
      axis_name: the data axis, or a tuple of data axes.
      group_size: examples per perturbation within a replica (``None``: the
        replica's whole share).
      has_aux: ``loss_fn`` returns ``(loss, aux)``; the step returns ``(loss,
        aux)`` with ``aux`` the clean pass's, averaged over groups and replicas.
      rng_streams: the RNG streams reseeded (or passed) from the step's key.
      pass_rngs: call ``loss_fn(model, batch, rngs)``.
      sequential: the groups one after the other (see
        :func:`sam_optax.parallel.shard_map_step`).
      donate: donate the params and optimizer state to the step (their
        buffers hold the results).

    Returns:
      ``step(model, optimizer, batch, rngs=None) -> loss`` (or ``(loss,
      aux)``), the mean clean loss; ``step.lower(model, optimizer, batch,
      rngs=None)`` lowers it (``.compile().memory_analysis()``).
    """
    from sam_optax import parallel

    built: dict[Any, tuple[Any, Callable[..., Any]]] = {}
    check_order = _family.OrderCheck("sam_optax.flax.nnx_shard_map_step")

    def functional(graphdef: Any, optimizer: nnx.Optimizer) -> Callable[..., Any]:
        key = (graphdef, optimizer.wrt)
        tx, fn = built.get(key, (None, None))
        if tx is not optimizer.tx:
            device_loss = nnx_loss_fn(
                graphdef,
                loss_fn,
                rng_streams=rng_streams,
                pass_rngs=pass_rngs,
                has_aux=has_aux,
            )
            fn = parallel.shard_map_step(
                device_loss,
                optimizer.tx,
                mesh,
                axis_name=axis_name,
                group_size=group_size,
                has_aux=True,
                sequential=sequential,
                donate=donate,
            )
            built[key] = (optimizer.tx, fn)
        return fn

    def arguments(model: nnx.Module, optimizer: nnx.Optimizer, rngs: Any) -> tuple[Any, ...]:
        graphdef, params, rest = nnx.split(model, optimizer.wrt, ...)
        _check_params_filter(params)
        rng = _step_key(model, rngs, rng_streams)
        opt_state = nnx.as_pure(optimizer.opt_state)
        return graphdef, nnx.as_pure(params), opt_state, nnx.as_pure(rest), rng

    def step(model: nnx.Module, optimizer: nnx.Optimizer, batch: Any, rngs: Any = None) -> Any:
        graphdef, params, opt_state, rest, rng = arguments(model, optimizer, rngs)
        streams = nnx.as_pure(nnx.state(model, nnx.RngState))  # as the draw left them
        params, opt_state, loss, (new_rest, *aux) = _unpack(
            functional(graphdef, optimizer)(params, opt_state, batch, rest, rng=rng), has_aux
        )
        # The clean pass's statistics; the streams keep their keys and counts.
        nnx.update(model, params, new_rest, streams)
        nnx.update(optimizer.opt_state, nnx.state(opt_state))
        optimizer.step[...] += 1
        check_order(optimizer.opt_state)
        return (loss, aux[0]) if has_aux else loss

    def lower(model: nnx.Module, optimizer: nnx.Optimizer, batch: Any, rngs: Any = None) -> Any:
        graphdef, params, opt_state, rest, rng = arguments(model, optimizer, rngs)
        return functional(graphdef, optimizer).lower(params, opt_state, batch, rest, rng=rng)

    step.lower = lower  # type: ignore[attr-defined]
    return step


def _unpack(out: tuple[Any, ...], has_aux: bool) -> tuple[Any, ...]:
    """``(params, opt_state, loss, (new_rest, aux?))`` from the functional step's output."""
    params, opt_state, loss, extra = out
    if has_aux:
        new_rest, aux = extra
        return params, opt_state, loss, (new_rest, aux)
    return params, opt_state, loss, (extra,)


def _check_params_filter(params: Any) -> None:
    """The optimizer's ``wrt`` selects params (``nnx.Param`` and its subclasses)."""
    for path, variable in nnx.to_flat_state(params):
        if not isinstance(variable, nnx.Param):
            raise ValueError(
                "nnx_shard_map_step: the optimizer's wrt selects "
                f"{type(variable).__name__} at {'/'.join(map(str, path))}, which is not an "
                "nnx.Param; the step writes the clean pass's other state (BatchNorm "
                "statistics, ...) back itself. Build the optimizer with wrt=nnx.Param (or a "
                "subclass such as nnx.LoRAParam)."
            )


def _step_key(model: nnx.Module, rngs: Any, streams: tuple[str, ...]) -> jax.Array | None:
    """One key for this step: from ``rngs`` (advanced once), else from the model's own stream."""
    if rngs is None:
        found = {
            node.tag: node
            for _, node in nnx.iter_graph(model)
            if isinstance(node, nnx.RngStream) and node.tag in streams
        }
        named = [found[name] for name in streams if name in found]
        return named[0]() if named else None
    if isinstance(rngs, nnx.Rngs):
        for name in streams:
            if name in rngs:
                return rngs[name]()
        return rngs()
    return rngs


# --------------------------------------------------------------------------
# Linen.
# --------------------------------------------------------------------------


class SAMTrainState(train_state.TrainState):
    """``flax.training.train_state.TrainState`` that forwards ``value_fn`` to ``tx.update``.

    Linen's ``TrainState.apply_gradients(grads=..., **kwargs)`` treats extra
    keywords as fields to replace, so ``sam`` never sees its closure. Here
    ``value_fn``, the clean loss ``value`` (for the sharpness diagnostic) and
    any ``tx_args`` go to ``tx.update``; other keywords replace fields as
    before. ``batch_stats`` holds BatchNorm running statistics (``None`` for
    models without BatchNorm).
    """

    batch_stats: Any = None

    def apply_gradients(  # type: ignore[override]
        self,
        *,
        grads: Any,
        value_fn: Callable[[Any], Any] | None = None,
        value: Any = None,
        tx_args: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> SAMTrainState:
        extra = dict(tx_args or {})
        if value_fn is not None:
            extra["value_fn"] = value_fn
        if value is not None:
            extra["value"] = value
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params, **extra)
        return self.replace(
            step=self.step + 1,
            params=optax.apply_updates(self.params, updates),
            opt_state=opt_state,
            **kwargs,
        )


def _linen_variables(params: Any, batch_stats: Any) -> dict[str, Any]:
    """``{'params': params}``, plus ``'batch_stats'`` when the model has BatchNorm."""
    if batch_stats is None:
        return {"params": params}
    return {"params": params, "batch_stats": batch_stats}


def linen_loss_fn(
    apply_fn: Callable[..., Any],
    criterion: Callable[[Any, Any], Any],
    *,
    update_batch_stats: bool = True,
    rng_collection: str = "dropout",
    has_aux: bool = False,
    **model_kwargs: Any,
) -> Callable[..., tuple[Any, Any]]:
    """A Linen loss with BatchNorm statistics as state: ``f(params, batch, batch_stats, rng=None)``.

    Calls ``apply_fn({'params': params, 'batch_stats': batch_stats}, x,
    **model_kwargs, mutable=['batch_stats'], rngs={rng_collection: rng})``
    for ``batch = (x, y)`` and returns ``(criterion(outputs, y),
    new_batch_stats)``. Without BatchNorm pass ``batch_stats=None``. With
    ``update_batch_stats=False`` nothing is mutable and ``batch_stats`` comes
    back unchanged: with a model that then normalizes with its running
    averages (e.g. ``model_kwargs={'train': True, 'frozen_bn': True}`` for a
    model that wires that flag to ``use_running_average``), that is the
    finetuning setting; with ``train=False``, the evaluation loss. Plugs into
    :mod:`sam_optax.parallel` with ``has_aux=True`` and ``batch_stats`` as the
    extra argument.

    Args:
      apply_fn: the model's ``apply``.
      criterion: ``criterion(outputs, y) -> scalar`` (or ``(scalar, aux)``
        with ``has_aux``: metrics of the pass, such as its accuracy).
      update_batch_stats: make ``batch_stats`` mutable in the pass.
      rng_collection: the RNG collection ``rng`` feeds (dropout).
      has_aux: ``criterion`` returns ``(loss, aux)``; ``f`` then returns
        ``(loss, (new_batch_stats, aux))``.
      **model_kwargs: passed to the model (``train=True``, ...).

    Returns:
      ``f(params, batch, batch_stats, rng=None) -> (loss, new_batch_stats)``.
    """

    def f(
        params: Any, batch: Any, batch_stats: Any, rng: jax.Array | None = None
    ) -> tuple[Any, Any]:
        x, y = batch
        variables = _linen_variables(params, batch_stats)
        rngs = {} if rng is None else {rng_collection: rng}
        if batch_stats is not None and update_batch_stats:
            outputs, mutated = apply_fn(
                variables, x, mutable=["batch_stats"], rngs=rngs, **model_kwargs
            )
            new_stats = mutated["batch_stats"]
        else:
            outputs = apply_fn(variables, x, rngs=rngs, **model_kwargs)
            new_stats = batch_stats
        if has_aux:
            loss, aux = criterion(outputs, y)
            return loss, (new_stats, aux)
        return criterion(outputs, y), new_stats

    return f


def linen_train_step(
    loss_fn: Callable[..., tuple[Any, Any]], *, donate: bool = False
) -> Callable[..., tuple[SAMTrainState, Any]]:
    """A jitted SAM train step for a :class:`SAMTrainState`.

    ``step(state, batch, rng=None) -> (state, loss)`` with ``loss_fn`` from
    :func:`linen_loss_fn`: the clean pass gives the gradient, the new
    ``batch_stats`` and the clean loss (passed on as ``value=``, so the
    sharpness diagnostic is recorded); the perturbed pass (inside ``sam``)
    reuses ``rng`` and its statistics are dropped.

    Args:
      loss_fn: ``loss_fn(params, batch, batch_stats, rng) -> (loss, new_batch_stats)``.
      donate: donate the state's buffers.

    Returns:
      ``step(state, batch, rng=None)``.
    """

    def step(state: SAMTrainState, batch: Any, rng: jax.Array | None = None) -> Any:
        def value_fn(params: Any) -> Any:
            return loss_fn(params, batch, state.batch_stats, rng)[0]

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, batch, state.batch_stats, rng
        )
        state = state.apply_gradients(
            grads=grads, value_fn=value_fn, value=loss, batch_stats=new_stats
        )
        return state, loss

    return _checked_first_call(
        jax.jit(step, donate_argnums=(0,) if donate else ()),
        lambda a: a[-1][0].opt_state,
        "sam_optax.flax.linen_train_step",
    )


# --------------------------------------------------------------------------
# SAM-ON: perturb the normalization layers only.
# --------------------------------------------------------------------------

#: The normalization layers of NNX whose params SAM-ON perturbs.
NNX_NORMALIZATION = (nnx.BatchNorm, nnx.LayerNorm, nnx.GroupNorm, nnx.RMSNorm)
#: The name prefixes Linen gives its normalization layers (``BatchNorm_0``, ...).
LINEN_NORMALIZATION = ("BatchNorm", "LayerNorm", "GroupNorm", "RMSNorm")


def _path_keys(path: tuple[Any, ...]) -> tuple[Any, ...]:
    """The plain keys of a JAX key path (dict keys, attribute names, indices)."""
    keys = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                keys.append(getattr(entry, attr))
                break
    return tuple(keys)


def nnx_normalization_mask(
    model: nnx.Module, types: tuple[type, ...] = NNX_NORMALIZATION
) -> Callable[[Any], Any]:
    """SAM-ON's mask for an NNX model: perturb the params of its normalization layers only.

    Returns ``params -> mask`` for ``sam_optax.sam(rho, mask=...)`` (or any
    method of the family): ``True`` for every param (scale and bias) of a
    module of ``types`` in ``model``, ``False`` elsewhere. Mueller et al.
    find that perturbing only these, with a larger radius, matches or beats
    SAM; their code perturbs the params whose name contains ``norm`` or
    ``bn`` (mueller-mp/SAM-ON). ``sam(rho, mask=..., adaptive=...)`` with this
    mask reproduces their runs with ``--elementwise --normalize_bias``
    (``tests/test_authors.py``); without ``--normalize_bias``, their
    default, their ASAM-ON leaves the bias unscaled, which ``adaptive=True``
    (the scale on every perturbed leaf) cannot express.

    Examples:
      >>> import jax, optax, sam_optax
      >>> from flax import nnx
      >>> from sam_optax.flax import nnx_normalization_mask
      >>> class Net(nnx.Module):
      ...     def __init__(self, rngs):
      ...         self.dense = nnx.Linear(3, 4, rngs=rngs)
      ...         self.norm = nnx.LayerNorm(4, rngs=rngs)
      >>> model = Net(nnx.Rngs(0))
      >>> mask = nnx_normalization_mask(model)(nnx.state(model, nnx.Param))
      >>> print(sum(jax.tree.leaves(mask)), "of", len(jax.tree.leaves(mask)))  # norm's scale, bias
      2 of 4
      >>> tx = optax.chain(sam_optax.sam(0.5, mask=nnx_normalization_mask(model)), optax.sgd(0.1))

    References:
      Mueller et al, `Normalization Layers Are All That Sharpness-Aware
      Minimization Needs <https://arxiv.org/abs/2306.04226>`_, 2023.
    """
    paths = {tuple(p) for p, node in nnx.iter_graph(model) if isinstance(node, types)}

    def mask(params: Any) -> Any:
        def selected(path: tuple[Any, ...], _: Any) -> bool:
            keys = _path_keys(path)
            return any(keys[: len(p)] == p for p in paths)

        return jax.tree_util.tree_map_with_path(selected, params)

    return mask


def nnx_variable_mask(model: nnx.Module, kind: Any = nnx.LoRAParam) -> Callable[[Any], Any]:
    """A mask of an NNX model's variables of one type (the LoRA adapters by default).

    Returns ``params -> mask`` for ``sam(rho, mask=...)`` (or any method of
    the family): ``True`` on the leaves of the variables of type ``kind``
    (any ``nnx.filterlib`` filter) in ``model``. The params an
    ``nnx.Optimizer`` hands ``tx.update`` are a pure ``nnx.State`` (arrays,
    their types gone), so the paths come from the model; a leaf is selected
    when its path starts with one of them (a state of ``nnx.Variable``
    objects adds the variable's own key). With ``nnx.Optimizer(model, tx,
    wrt=nnx.Param)`` every param trains and SAM perturbs the ``kind`` ones;
    with ``wrt=kind`` no mask is needed.

    Examples:
      >>> import jax, optax, sam_optax
      >>> from flax import nnx
      >>> from sam_optax.flax import nnx_variable_mask
      >>> model = nnx.LoRALinear(3, 4, lora_rank=2, rngs=nnx.Rngs(0))
      >>> mask = nnx_variable_mask(model)(nnx.state(model, nnx.Param))
      >>> print(sum(jax.tree.leaves(mask)), "of", len(jax.tree.leaves(mask)))  # lora a and b
      2 of 4
      >>> tx = optax.chain(sam_optax.sam(0.05, mask=nnx_variable_mask(model)), optax.adamw(1e-3))
    """
    wanted = {tuple(path) for path, _ in nnx.to_flat_state(nnx.state(model, kind))}
    lengths = {len(path) for path in wanted}

    def mask(params: Any) -> Any:
        def selected(path: tuple[Any, ...], _: Any) -> bool:
            keys = _path_keys(path)
            return any(keys[:n] in wanted for n in lengths)

        return jax.tree_util.tree_map_with_path(selected, params)

    return mask


def linen_normalization_mask(
    prefixes: tuple[str, ...] = LINEN_NORMALIZATION,
) -> Callable[[Any], Any]:
    """SAM-ON's mask for Linen params: perturb the params of normalization layers only.

    Returns ``params -> mask``: ``True`` for every param under a module whose
    name starts with one of ``prefixes`` (Linen names an unnamed
    ``nn.BatchNorm`` ``BatchNorm_0``, ...; pass your own prefixes for modules
    you named, e.g. ``("bn",)``). See :func:`nnx_normalization_mask`.

    Examples:
      >>> import jax.numpy as jnp
      >>> from sam_optax.flax import linen_normalization_mask
      >>> params = {"Dense_0": {"kernel": jnp.ones((3, 4))}, "BatchNorm_0": {"scale": jnp.ones(4)}}
      >>> linen_normalization_mask()(params)
      {'BatchNorm_0': {'scale': True}, 'Dense_0': {'kernel': False}}
    """
    prefixes = tuple(prefixes)

    def mask(params: Any) -> Any:
        def selected(path: tuple[Any, ...], _: Any) -> bool:
            return any(str(k).startswith(prefixes) for k in _path_keys(path))

        return jax.tree_util.tree_map_with_path(selected, params)

    return mask
