"""What every method of the SAM family shares: its options, its update contract, one step.

Every factory (``sam``, ``gsam``, ``looksam``, ...) is one call of
:func:`transformation` with the method's own *rule*. The shared part, written
once here, is the whole opening of a step:

* the options, declared once as :class:`SAMOptions` and validated at
  construction (:func:`options_from`);
* the update contract: ``update(grads, state, params, *, value_fn=None,
  grouped_objective=None, value=None, **extra_args)``, its arguments checked
  into a :class:`Call`;
* the step count and the PRNG key in one state, :class:`SAMState`, whose
  ``memory`` field holds what a method carries between steps;
* the radius: a constant ``rho = 0`` (or nothing selected by the mask) is the
  base step at trace time; a schedule is evaluated at the step count;
* m-sharpness groups (a :class:`GroupedObjective`): one at a time for
  ``sam`` (:func:`grouped_sam`), every group's clean gradient first for the
  others (:func:`materialize`);
* the pieces a rule is made of: the SAM gradient (:func:`sam_gradient`), the
  average over the data-parallel axes (:func:`finish`), the base step
  (:func:`base_step`) and the :class:`Diagnostics` (:func:`measure`).

A rule is ``rule(step, memory) -> (updates, memory, diagnostics)`` where
``step`` is a :class:`Step`: the checked call, the options, this step's
radius, count and key.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from collections.abc import Hashable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple
from typing import TypedDict

import jax
import jax.numpy as jnp
import optax

from sam_optax import _axes
from sam_optax import _checks
from sam_optax._directions import Selection
from sam_optax._directions import select
from sam_optax._stages import Info
from sam_optax._stages import Objective
from sam_optax._stages import sam_gradient as _stages_sam_gradient

DIRECTIONS = ("gradient", "random")

# Constants folded into a step's key, one per use, so that the uses never share numbers.
DRAW, DIRECTION, SUBSET = 0, 1, 2


# --------------------------------------------------------------------------
# The options, declared once.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class SAMOptions:
    r"""How every method of the family perturbs and averages: the options they share.

    Each factory takes these as keyword arguments
    (``sam_optax.gsam(0.05, adaptive=True, axis_name="data")``) or as one
    object, ``options=SAMOptions(...)`` (how ``optax.inject_hyperparams``
    passes them: the options stay static, only the method's own
    hyperparameters such as ``rho`` are injected). A factory refuses the
    options its rule does not use, by name. Validated at construction: a bad
    value raises a ``ValueError`` naming the option.

    Attributes:
      norm: p of the perturbation ball of eq. (2), a number > 1; ``2`` is
        SAM, ``float('inf')`` the sign direction.
      adaptive: ASAM's scale-invariant ball, :math:`T_w = |w| + \eta`,
        :math:`\hat\epsilon = \rho T_w\,d_p(T_w g)`.
      eta: ASAM's :math:`\eta`.
      ascent_steps: k >= 1 steps of projected gradient ascent (appendix C.6);
        each step after the first costs one more gradient.
      second_order: keep the :math:`(d\hat\epsilon/dw)^\top` term of the
        SAM gradient (appendix C.4), through one Hessian-vector product.
      mask: which leaves are perturbed: a pytree of bools (or of boolean
        arrays; a prefix of the params is fine) or a callable
        ``params -> mask``; the others are not perturbed and do not enter the
        norm (SAM-ON: :func:`sam_optax.flax.nnx_normalization_mask`,
        :func:`sam_optax.flax.linen_normalization_mask`).
      axis_name: the mapped axis (or tuple of axes) of data parallelism; each
        device perturbs with its own gradient and the results are averaged.
      sync_perturbation: average the incoming gradients over ``axis_name``
        before perturbing (one perturbation for the whole batch); a name or
        tuple of names among ``axis_name`` syncs over those axes only (the
        paper code's ``inner_group_size``).
      eps: added to the gradient's dual norm: a zero gradient gives a zero
        perturbation, never NaN.
      has_aux: ``value_fn`` returns ``(loss, aux)``; ``aux`` is dropped.
      direction: ``'gradient'`` (SAM) or ``'random'`` (the ablation of
        appendix C.5: a Gaussian direction of norm :math:`\rho`).
      seed: seed of every random draw of the method (random directions,
        RST's coin, ESAM's weight subsets).
      cosine: record :math:`\cos(g, g_{SAM})` in the diagnostics where the
        method does not hold :math:`g` to the end of its step anyway. Off
        by default: it keeps the clean gradient alive through the second
        pass, one more params-sized buffer (``benchmarks/memory.py``).
    """

    norm: float = 2.0
    adaptive: bool = False
    eta: float = 0.01
    ascent_steps: int = 1
    second_order: bool = False
    mask: Any = None
    axis_name: Hashable | tuple[Hashable, ...] | None = None
    sync_perturbation: bool | Hashable | tuple[Hashable, ...] = False
    eps: float = 1e-12
    has_aux: bool = False
    direction: str = "gradient"
    seed: int = 0
    cosine: bool = False

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "norm", _checks.check_norm(self.norm))
        set_(self, "eta", _checks.check_number("eta", self.eta, low=0.0))
        set_(self, "eps", _checks.check_number("eps", self.eps, low=0.0))
        set_(self, "ascent_steps", _checks.check_positive_int("ascent_steps", self.ascent_steps))
        set_(self, "seed", _checks.check_int("seed", self.seed))
        for name in ("adaptive", "second_order", "has_aux", "cosine"):
            _checks.check_bool(name, getattr(self, name))
        _checks.check_choice("direction", self.direction, DIRECTIONS)
        if self.second_order and self.ascent_steps != 1:
            raise ValueError(
                "second_order=True supports ascent_steps=1 only (appendix C.4), got "
                f"ascent_steps={self.ascent_steps}."
            )
        if self.direction == "random" and (self.second_order or self.ascent_steps != 1):
            raise ValueError(
                "direction='random' takes neither second_order=True nor ascent_steps > 1."
            )
        if self.mask is not None and not callable(self.mask) and not jax.tree.leaves(self.mask):
            raise ValueError(f"mask must be a pytree of bools or a callable, got {self.mask!r}.")
        sync_axes(self.sync_perturbation, self.axes)  # validates

    @property
    def axes(self) -> tuple[Hashable, ...]:
        """The data-parallel axes, as a tuple (``()`` on one device)."""
        return _axes.axis_names(self.axis_name)

    @property
    def sync_axes(self) -> tuple[Hashable, ...] | None:
        """The axes the perturbation is shared over, or ``None`` for one per device."""
        return sync_axes(self.sync_perturbation, self.axes)

    @property
    def draws(self) -> bool:
        """Whether the perturbation itself is random."""
        return self.direction == "random"

    def replace(self, **changes: Any) -> SAMOptions:
        return dataclasses.replace(self, **changes)


class SAMOptionKeywords(TypedDict, total=False):
    """The options of :class:`SAMOptions` as keyword arguments of every factory (PEP 692).

    Each factory's ``**options`` is annotated with it, so ``help()``, IDEs and
    type checkers see the option names and types; their meaning and
    defaults are those of :class:`SAMOptions` (a test holds the two to the
    same names and types). ``options`` passes a whole :class:`SAMOptions`.
    """

    norm: float
    adaptive: bool
    eta: float
    ascent_steps: int
    second_order: bool
    mask: Any
    axis_name: Hashable | tuple[Hashable, ...] | None
    sync_perturbation: bool | Hashable | tuple[Hashable, ...]
    eps: float
    has_aux: bool
    direction: str
    seed: int
    cosine: bool
    options: SAMOptions | Mapping[str, Any]


OPTION_NAMES = tuple(f.name for f in dataclasses.fields(SAMOptions))
# The options about where the perturbation comes from: a method whose direction
# is its own (MSAM's momentum, ...) refuses them.
GRADIENT_OPTIONS = (
    "adaptive",
    "eta",
    "ascent_steps",
    "second_order",
    "direction",
    "sync_perturbation",
)


def options_from(owner: str, given: Mapping[str, Any], refused: Sequence[str] = ()) -> SAMOptions:
    """The :class:`SAMOptions` of a factory's ``**options``; unknown or refused names raise.

    ``given`` holds keyword options, or one ``options=`` (a
    :class:`SAMOptions` or a mapping of its fields) that the keywords
    override; ``optax.inject_hyperparams`` passes them that way. ``refused``
    lists the options the method does not use.
    """
    given = dict(given)
    base = given.pop("options", None)
    if base is None:
        base = SAMOptions()
    elif isinstance(base, Mapping):
        base = options_from(owner, base, refused)
    elif not isinstance(base, SAMOptions):
        raise TypeError(
            f"{owner}: options must be a sam_optax.SAMOptions or a mapping of its fields, "
            f"got {type(base).__name__}."
        )
    unknown = sorted(set(given) - set(OPTION_NAMES))
    if unknown:
        raise TypeError(
            f"{owner}() got unknown option(s) {', '.join(unknown)}; its options are "
            f"{', '.join(n for n in OPTION_NAMES if n not in refused)} (see sam_optax.SAMOptions)."
        )
    default = SAMOptions()
    used = [n for n in refused if _differs(given.get(n, getattr(base, n)), getattr(default, n))]
    if used:
        raise TypeError(
            f"{owner} does not take the option(s) {', '.join(used)}: its perturbation "
            "does not come from the gradient the way sam's does (see its docstring)."
        )
    return base.replace(**given) if given else base


def _differs(value: Any, default: Any) -> bool:
    return value is not default and value != default


def sync_axes(sync_perturbation: Any, axes: tuple[Hashable, ...]) -> tuple[Hashable, ...] | None:
    """The axes the perturbation is shared over: ``None`` (per device), all, or a subset.

    ``True`` syncs over every axis of ``axis_name``; a name or tuple of names
    (a subset of ``axis_name``) gives one perturbation per group of devices
    along those axes, the paper's ``inner_group_size``.
    """
    if sync_perturbation is False or sync_perturbation is None:
        return None
    if not axes:
        raise ValueError(
            f"sync_perturbation={sync_perturbation!r} needs axis_name (the axes to "
            "average the gradient over)."
        )
    if sync_perturbation is True:
        return axes
    names = _axes.axis_names(sync_perturbation)
    unknown = [n for n in names if n not in axes]
    if unknown or not names:
        raise ValueError(
            f"sync_perturbation must be a bool or a subset of axis_name={axes!r}, "
            f"got sync_perturbation={sync_perturbation!r}."
        )
    return names


# --------------------------------------------------------------------------
# What a step hands on and records.
# --------------------------------------------------------------------------


class GroupedObjective(NamedTuple):
    """m-sharpness on one device: G groups of the batch, one perturbation each.

    Pass it to ``tx.update(zeros, state, params, grouped_objective=...)`` in
    place of ``value_fn``: group ``i`` gets its own :math:`\\hat\\epsilon_i`
    from its own gradient, and the SAM gradient is the mean over groups of
    :math:`\\nabla L_i(w + \\hat\\epsilon_i)`. The method computes each
    group's clean gradient itself, so the incoming updates are not read (pass
    zeros). ``sam`` takes the groups one after the other into one running
    sum: a step holds one group's buffers and the sum, whatever G
    (``benchmarks/memory.py``); the other methods, and ``sync_perturbation``,
    first take every group's clean gradient (one params-sized buffer per
    group). :func:`sam_optax.parallel.grouped_step` builds one for you.

    Attributes:
      value_fn: ``(i, params) -> (loss_i, aux_i)``, the mean loss of group
        ``i`` (a static int) and anything else its clean pass yields
        (``aux_i`` may be ``None``).
      n_groups: G, the number of groups.
      on_clean: called as ``on_clean(i, loss_i, aux_i)`` with each group's
        clean loss and aux, while the update is traced (how a step builder
        returns them), or ``None``.
      sequential: ``sam`` takes the groups one after the other (the memory of
        one group); ``False`` takes them all in one pass, each against its
        own params copy: G params-sized buffers, but faster on small models
        whose step is bound by the number of operations, not by memory
        (``benchmarks/msharpness.py``).
    """

    value_fn: Callable[[int, Any], tuple[Any, Any]]
    n_groups: int
    on_clean: Callable[[int, jax.Array, Any], None] | None = None
    sequential: bool = True


class Diagnostics(NamedTuple):
    """Scalars every method records in its state, free in passes and memory.

    Read them with ``optax.tree.get(opt_state, "sharpness")`` and so on.
    Averaged over the data-parallel axes. ``sharpness``, ``perturbed_loss``
    and ``cosine`` are the last SAM step's: a switching method's cheap steps
    (LookSAM between SAM steps, RST, AE-SAM) keep them, and ``sam_step``
    says whether this step measured them. ``NaN`` means never measured:
    ``sharpness`` needs the clean loss (``tx.update(..., value=loss)``; the
    step builders of :mod:`sam_optax.parallel` and the helpers of
    :mod:`sam_optax.flax` pass it), ``cosine`` needs ``cosine=True`` for the
    methods that do not hold both gradients anyway; before the first SAM
    step nothing was measured. With a donated state, read (or copy) them
    before the next step: it may reuse their buffers.

    Attributes:
      sharpness: :math:`L(w + \\epsilon) - L(w)`, the first-order sharpness
        estimate; needs the clean loss passed as ``tx.update(..., value=loss)``.
      perturbed_loss: :math:`L(w + \\epsilon)`, computed by the SAM pass anyway.
      grad_norm: :math:`\\|g\\|` of the incoming (clean) gradient.
      cosine: :math:`\\cos(g, g_{SAM})` between the clean gradient and the
        gradient at the perturbed point, where the method holds both anyway
        (GSAM, LookSAM's SAM steps, WSAM) or ``cosine=True`` asks for it.
      sam_step: whether this step took the SAM branch (always for ``sam``).
    """

    sharpness: jax.Array
    perturbed_loss: jax.Array
    grad_norm: jax.Array
    cosine: jax.Array
    sam_step: jax.Array


def carry_forward(last: Diagnostics, new: Diagnostics) -> Diagnostics:
    """The step's diagnostics, with what only a SAM step measures kept from the last one.

    A switching method's cheap step (LookSAM between its SAM steps, RST's
    coin, AE-SAM) takes no perturbed pass: ``sharpness``, ``perturbed_loss``
    and ``cosine`` keep the last SAM step's values (a NaN in a per-step log
    reads as divergence) and ``sam_step`` says this step measured none of
    them. A NaN measured at a SAM step is recorded as measured.
    """
    taken = new.sam_step

    def keep(old: jax.Array, now: jax.Array) -> jax.Array:
        return jnp.where(taken, now, old)

    return new._replace(
        sharpness=keep(last.sharpness, new.sharpness),
        perturbed_loss=keep(last.perturbed_loss, new.perturbed_loss),
        cosine=keep(last.cosine, new.cosine),
    )


def initial_diagnostics() -> Diagnostics:
    """NaN ("not measured yet"), each field its own array (a donated state never shares one)."""
    nans = [jnp.full([], jnp.nan, jnp.float32) for _ in range(4)]
    return Diagnostics(*nans, jnp.zeros([], jnp.bool_))


def distinct_buffers(state: Any, params: Any = None) -> Any:
    """``state`` with every array leaf its own buffer, none of them one of ``params``'.

    XLA refuses to donate one buffer twice (``Attempt to donate the same
    buffer twice``): a state in which one array sits in two leaves (or one of
    the params' arrays, donated beside it) crashes a step that donates it.
    Outside ``jit`` a repeated array (the same object) is copied; inside,
    every output is a buffer of its own already and nothing is done.
    """
    seen = {id(x) for x in jax.tree.leaves(params)}

    def own(x: Any) -> Any:
        if not isinstance(x, jax.Array) or isinstance(x, jax.core.Tracer):
            return x
        if id(x) in seen:
            return jnp.array(x, copy=True)
        seen.add(id(x))
        return x

    return jax.tree.map(own, state)


class SAMState(NamedTuple):
    """The state of every method of the family: no copy of the params unless the method stores one.

    Attributes:
      count: number of updates taken (indexes the schedules), int32.
      key: raw ``uint32`` PRNG key data when the method draws (random
        directions, RST, ESAM), else ``None``.
      diagnostics: the last step's :class:`~sam_optax.Diagnostics` (scalars).
      memory: what the method carries from step to step (``None`` for
        ``sam``, ``gsam`` and ``rst``; LookSAM's direction, F-SAM's and
        VaSSO's running means, AE-SAM's statistics, MSAM's and WSAM's base
        optimizer state).
    """

    count: jax.Array
    key: jax.Array | None
    diagnostics: Diagnostics
    memory: Any = None


# --------------------------------------------------------------------------
# One update call.
# --------------------------------------------------------------------------


class Call(NamedTuple):
    """The checked arguments of one ``update`` call."""

    objective: Objective
    params: Any
    updates: Any
    sel: Selection
    value: jax.Array | None
    extra_args: dict[str, Any]
    groups: GroupedObjective | None = None


def _check_not_masked(tree: Any, name: str, owner: str) -> None:
    """Refuses ``optax.MaskedNode`` leaves: ``optax.masked`` hides leaves from the closure."""
    nodes = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
    if any(isinstance(x, optax.MaskedNode) for x in nodes):
        raise ValueError(
            f"{owner}: {name} hold optax.MaskedNode leaves: {owner} runs inside "
            "optax.masked, which hides the masked-out params from the loss closure. "
            f"Give the mask to {owner} itself instead: {owner}(..., mask=mask) perturbs "
            "only the True leaves and hands the others their clean gradient."
        )


def objective_from_args(
    updates: Any,
    params: Any,
    value_fn: Callable[[Any], Any] | None,
    grouped_objective: GroupedObjective | None,
    has_aux: bool,
    owner: str = "sam",
    per_example: bool = False,
) -> Objective:
    """The :class:`Objective` of one ``tx.update`` call, its inputs checked.

    Either ``value_fn`` (one group: the incoming ``updates`` are its gradient)
    or a :class:`GroupedObjective`. Raises a clear error for a missing
    ``params`` or closure, trees that do not match the params, and (at trace
    time) a closure that does not return a scalar loss.
    """
    if params is None:
        raise ValueError(
            f"{owner}: update needs params (tx.update(grads, state, params, value_fn=...))."
        )
    _check_not_masked(params, "params", owner)
    _checks.check_tree_matches(updates, params, "updates", owner)
    if grouped_objective is None:
        user_fn = _checks.check_value_fn(value_fn, owner)
        loss = _checks.checked_loss(user_fn, has_aux, "value_fn", owner, per_example)
        return Objective(loss=lambda points: loss(points[0]), grads=[updates])
    if not isinstance(grouped_objective, GroupedObjective):
        raise TypeError(f"{owner}: grouped_objective must be a sam_optax.GroupedObjective.")
    if per_example:
        raise ValueError(
            f"{owner} takes per-example losses through value_fn; it does not take a "
            "grouped_objective (m-sharpness groups): split the batch over devices instead."
        )
    n = grouped_objective.n_groups
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{owner}: grouped_objective.n_groups must be an int >= 1, got {n!r}.")
    group_loss = _group_losses(grouped_objective, owner)

    def loss(points: tuple[Any, ...]) -> jax.Array:
        return sum(group_loss(i)(p) for i, p in enumerate(points)) / n

    # The clean gradients are the method's to compute (:func:`materialize`).
    return Objective(loss=loss, grads=[updates] * n, name="grouped_objective")


def _group_losses(groups: GroupedObjective, owner: str) -> Callable[[int], Callable[[Any], Any]]:
    """``i -> (params -> loss_i)``, the aux dropped, the loss checked to be a scalar."""

    def group(i: int) -> Callable[[Any], Any]:
        return _checks.checked_loss(
            lambda p: groups.value_fn(i, p), True, "grouped_objective.value_fn", owner
        )

    return group


def prepare_call(
    options: SAMOptions,
    updates: Any,
    params: Any,
    value_fn: Any,
    grouped_objective: Any,
    value: Any,
    extra_args: dict[str, Any],
    owner: str = "sam",
    per_example: bool = False,
) -> Call:
    """Checks one call's arguments and the mapped axes; selects the perturbed leaves."""
    objective = objective_from_args(
        updates, params, value_fn, grouped_objective, options.has_aux, owner, per_example
    )
    _axes.check_bound(options.axes, owner)
    _check_value(value, owner, per_example)
    sel = select(params, options.mask, *objective.grads)
    return Call(objective, params, updates, sel, value, extra_args, grouped_objective)


def _check_value(value: Any, owner: str, per_example: bool) -> None:
    """``value=`` is the clean loss at the params: a real scalar (or ESAM's per-example losses)."""
    if value is None:
        return
    what = (
        "the clean per-example losses at params (a vector) or their mean"
        if per_example
        else "the clean loss at params, a scalar"
    )
    try:
        shape, dtype = jnp.shape(value), jnp.result_type(value)
    except TypeError:
        raise TypeError(f"{owner}: value= must be {what}, got {type(value).__name__}.") from None
    if not jnp.issubdtype(dtype, jnp.floating) and not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"{owner}: value= must be {what}, got an array of dtype {dtype}.")
    if len(shape) > (1 if per_example else 0):
        hint = "" if per_example else " (pass the mean loss, as value_fn returns it)"
        raise ValueError(f"{owner}: value= must be {what}, got an array of shape {shape}{hint}.")


# --------------------------------------------------------------------------
# One step: what a rule gets, and the pieces it is made of.
# --------------------------------------------------------------------------


class Step(NamedTuple):
    """What a method's rule gets at each update.

    Attributes:
      call: the checked arguments of the update.
      options: the method's :class:`SAMOptions`.
      owner: the factory's name (for error messages).
      rho: this step's radius (a schedule already evaluated).
      count: the number of updates taken before this one.
      key: this step's PRNG key (typed) when the method draws, else ``None``;
        fold in :data:`DRAW`, :data:`DIRECTION` or :data:`SUBSET` per use.
    """

    call: Call
    options: SAMOptions
    owner: str
    rho: Any
    count: jax.Array
    key: jax.Array | None


Rule = Callable[[Step, Any], tuple[Any, Any, Diagnostics]]


def check_local_gradients(step: Step, manual: tuple[Hashable, ...]) -> None:
    """Refuses, inside ``shard_map``, a gradient that is the same on every device.

    A gradient taken with respect to replicated params inside ``shard_map`` is
    already summed over the devices (the gradient-sum trap): per-device
    perturbation would silently become a synced one, with an update
    n_devices times too large.
    """
    options, call = step.options, step.call
    synced = set(options.sync_axes or ())
    if call.groups is not None:  # the clean gradients were taken here, per device
        return
    if not manual or synced >= set(manual) or not _axes.vma_checked(manual):
        return
    leaves = [jax.tree.leaves(g) for g in call.objective.grads]
    name = call.objective.name
    for b, g in enumerate(leaves):
        for i in call.sel.indices:
            if not set(manual) <= _axes.varying_axes(g[i]):
                which = name if len(leaves) == 1 else f"{name}[{b}]"
                raise ValueError(
                    f"{step.owner}(axis_name={options.axis_name!r}): the incoming gradient "
                    f"({which}) is the same on every device of axis {manual}: it was "
                    "taken with respect to replicated params, and shard_map "
                    "has already summed it over the devices. Differentiate "
                    f"with respect to jax.lax.pcast(params, {manual!r}, "
                    "to='varying') to keep each device's own gradient, or "
                    "pass sync_perturbation=True."
                )


def _check_no_complex_second_order(step: Step) -> None:
    if not step.options.second_order:
        return
    leaves = jax.tree.leaves(step.call.params)
    for i in step.call.sel.indices:
        if jnp.iscomplexobj(leaves[i]):
            raise TypeError(
                f"{step.owner}(second_order=True) does not support complex params; leaf {i} "
                f"has dtype {leaves[i].dtype}. Use second_order=False, or mask that leaf out."
            )


def sam_gradient(
    step: Step, directions: Sequence[Any] | None = None
) -> tuple[list[jax.Array], Info]:
    """The local (per-device) SAM gradient of the step, all leaves, in the compute dtype.

    ``directions`` (one tree per group) replaces the gradients the
    perturbation is taken from (F-SAM's :math:`g - \\sigma m`, VaSSO's
    running mean).
    """
    check_local_gradients(step, _axes.manual_axes(step.options.axes))
    _check_no_complex_second_order(step)
    key = None
    if step.options.draws:
        key = jax.random.fold_in(step.key, DIRECTION)
    return _stages_sam_gradient(
        step.call.objective,
        step.call.params,
        step.call.sel,
        step.rho,
        step.options,
        axes=step.options.axes,
        sync_axes=step.options.sync_axes,
        key=key,
        directions=directions,
    )


def clean_leaves(step: Step) -> list[jax.Array]:
    """The incoming (clean, local) gradient's leaves in at least float32."""
    return float_leaves(step.call.updates)


def finish(step: Step, local: Sequence[jax.Array]) -> Any:
    """Averages local gradients over the data-parallel axes; each leaf in the updates' dtype."""
    out = _axes.pmean(list(local), step.options.axes)
    return optax.tree.cast_like(
        jax.tree.unflatten(jax.tree.structure(step.call.updates), out), step.call.updates
    )


def base_step(step: Step) -> tuple[Any, Diagnostics]:
    """The base optimizer's step: the clean gradient averaged over the devices.

    What every method hands on when nothing is perturbed and what the
    switching methods take on their cheap branch.
    """
    return _axes.pmean(step.call.updates, step.options.axes), measure(step)


def sam_branch(step: Step) -> tuple[Any, Diagnostics]:
    """The plain SAM step: the averaged SAM gradient and its diagnostics."""
    local, info = sam_gradient(step)
    return finish(step, local), measure(step, info, local if step.options.cosine else None)


# --------------------------------------------------------------------------
# m-sharpness groups (a GroupedObjective): one group at a time.
# --------------------------------------------------------------------------


def _after(carry: Any, w: Any) -> Any:
    """``w`` (the params), made to depend on every leaf of ``carry``: ``w + 0 * sum(carry)``.

    The groups' computations are independent, and XLA:CPU runs them side by
    side, holding every group's buffers at once (an ``optimization_barrier``
    does not order them). A data dependency does: each group's params read a
    reduction of the sums so far, so group i starts after group i - 1 ended,
    and its buffers are freed before the next (``benchmarks/memory.py``).
    ``nan_to_num`` keeps an overflow in one group from making the zero NaN.
    """
    if carry is None:
        return w
    total = sum(jnp.sum(jnp.real(x).astype(jnp.float32)) for x in jax.tree.leaves(carry))
    zero = jnp.nan_to_num(total) * 0
    return jax.tree.map(lambda x: x + zero.astype(x.dtype), w)


def _clean_pass(step: Step, i: int, w: Any) -> tuple[jax.Array, Any]:
    """Group ``i``'s clean loss and gradient at ``w`` (conjugated); ``on_clean`` gets loss and aux."""
    groups = step.call.groups
    (loss, aux), grads = jax.value_and_grad(lambda p: groups.value_fn(i, p), has_aux=True)(w)
    if groups.on_clean is not None:
        groups.on_clean(i, loss, aux)
    return loss, optax.tree.conj(grads)


def materialize(step: Step, keep_grads: bool) -> Step:
    """The step of a :class:`GroupedObjective` with its clean gradients taken.

    Group by group: ``call.updates`` becomes the mean clean gradient and
    ``call.value`` the mean clean loss; the clean losses and aux go to
    ``on_clean``. With ``keep_grads`` every group's gradient is kept as
    ``objective.grads`` (G params-sized buffers), for the methods that need
    them all at once; without, the groups run one after the other into a
    running sum (:func:`_after`; one pass differentiating every group at the
    same params holds every group's gradient until XLA sums them).
    """
    call = step.call
    n = call.groups.n_groups
    w = _axes.as_varying(call.params, _axes.manual_axes(step.options.axes))
    total, losses, grads = None, [], []
    for i in range(n):
        w_i = w if keep_grads else _after(None if total is None else (total, losses), w)
        loss, g = _clean_pass(step, i, w_i)
        losses.append(loss)
        if keep_grads:
            grads.append(g)
        total = g if total is None else optax.tree.add(total, g)
    mean = optax.tree.cast_like(optax.tree.scale(1.0 / n, total), call.updates)
    objective = call.objective._replace(grads=grads if keep_grads else [mean] * n)
    value = sum(losses) / n if call.value is None else call.value
    return step._replace(call=call._replace(objective=objective, updates=mean, value=value))


def grouped_sam(step: Step) -> tuple[Any, Diagnostics]:
    """SAM over the groups one after the other: ``sam``'s rule for a :class:`GroupedObjective`.

    Group i: its clean gradient, its perturbation, its SAM gradient, added to
    one running sum; each group waits for the sum so far (:func:`_after`),
    so a step holds one group's buffers and the sum. The diagnostics are
    means over the groups (each group's own gradient norm and cosine, as each
    device's are averaged over the devices).
    """
    call, options = step.call, step.options
    group_loss = _group_losses(call.groups, step.owner)
    w = _axes.as_varying(call.params, _axes.manual_axes(options.axes))
    total, stats = None, []
    for i in range(call.groups.n_groups):
        # The sum and every scalar so far are ready before this group starts.
        w_i = _after(None if total is None else (total, stats), w)
        clean, g = _clean_pass(step, i, w_i)
        objective = Objective(loss=lambda points, i=i: group_loss(i)(points[0]), grads=[g])
        key = None if step.key is None else jax.random.fold_in(step.key, i)
        one = call._replace(objective=objective, params=w_i, updates=g, value=clean)
        one = step._replace(call=one, key=key)
        local, info = sam_gradient(one)
        stats.append(measure(one, info, local if options.cosine else None)[:4])
        total = local if total is None else [a + b for a, b in zip(total, local)]
    n = call.groups.n_groups
    means = [sum(s[k] for s in stats) / n for k in range(4)]
    return finish(step, [t / n for t in total]), Diagnostics(*means, jnp.asarray(True))


# --------------------------------------------------------------------------
# The one transformation every factory returns.
# --------------------------------------------------------------------------


def _check_radius(owner: str, rho: Any) -> None:
    """``rho`` is a number >= 0, or a schedule whose first value is >= 0.

    A schedule is evaluated once, at step 0 (later steps may lie past the
    training a schedule was written for).
    """
    if callable(rho):
        value = _checks.concrete_float(rho(jnp.zeros([], jnp.int32)))
        if value is not None and not 0 <= value < math.inf:
            raise ValueError(
                f"{owner}: rho must be a finite number >= 0, but the rho schedule returns "
                f"{value} at step 0."
            )
        return
    _checks.check_number("rho", rho, low=0.0, traced_ok=True, owner=owner)


def transformation(
    owner: str,
    rho: optax.ScalarOrSchedule,
    options: SAMOptions,
    rule: Rule,
    *,
    init_memory: Callable[[Any], Any] | None = None,
    base: Rule | None = None,
    draws: bool = False,
    per_example: bool = False,
    grouped_rule: Rule | None = None,
) -> optax.GradientTransformationExtraArgs:
    """The family's ``GradientTransformationExtraArgs`` around one method's ``rule``.

    Args:
      owner: the factory's name, for error messages.
      rho: the radius, a number or a schedule of the step count.
      options: the validated :class:`SAMOptions`.
      rule: ``rule(step, memory) -> (updates, memory, diagnostics)``, the method.
      init_memory: ``params -> memory`` (default ``None``).
      base: the rule of a step that perturbs nothing (a constant ``rho=0`` or
        nothing selected); default: the clean gradient averaged, memory kept.
      draws: the method draws random numbers (a key in the state) even when
        its perturbation is not random.
      per_example: ``value_fn`` returns one loss per example (ESAM).
      grouped_rule: the rule for a :class:`GroupedObjective` that takes the
        groups one at a time; without one the groups' clean gradients are all
        taken first (:func:`materialize`) and ``rule`` runs on them.

    Returns:
      ``init(params)`` and ``update(updates, state, params, *, value_fn=None,
      grouped_objective=None, value=None, **extra_args)``.
    """
    _check_radius(owner, rho)
    keyed = draws or options.draws
    static_rho = None if callable(rho) else _checks.concrete_float(rho)

    def init_fn(params: optax.Params) -> SAMState:
        key = jax.random.key_data(jax.random.key(options.seed)) if keyed else None
        memory = None if init_memory is None else init_memory(params)
        state = SAMState(jnp.zeros([], jnp.int32), key, initial_diagnostics(), memory)
        return distinct_buffers(state, params)

    def update_fn(
        updates: optax.Updates,
        state: SAMState,
        params: optax.Params | None = None,
        *,
        value_fn: Callable[..., Any] | None = None,
        grouped_objective: GroupedObjective | None = None,
        value: jax.Array | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, SAMState]:
        call = prepare_call(
            options,
            updates,
            params,
            value_fn,
            grouped_objective,
            value,
            extra_args,
            owner,
            per_example,
        )
        key = None if state.key is None else jax.random.wrap_key_data(state.key)
        step = Step(call, options, owner, rho, state.count, key)
        if static_rho == 0.0 or not call.sel.indices:
            # Nothing is perturbed: the gradient at w + 0 is the gradient at w.
            if call.groups is not None:
                step = materialize(step, keep_grads=False)
            out, memory, diagnostics = (base or _keep_memory)(step, state.memory)
        else:
            step = step._replace(rho=rho(state.count) if callable(rho) else rho)
            if call.groups is not None and call.groups.sequential and grouped_rule is not None:
                out, memory, diagnostics = grouped_rule(step, state.memory)
            else:
                if call.groups is not None:
                    step = materialize(step, keep_grads=True)
                out, memory, diagnostics = rule(step, state.memory)
        next_key = None if key is None else jax.random.key_data(jax.random.split(key)[0])
        diagnostics = carry_forward(state.diagnostics, diagnostics)
        state = SAMState(optax.safe_increment(state.count), next_key, diagnostics, memory)
        return out, distinct_buffers(state, params)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


#: How many first steps :class:`OrderCheck` reads.
ORDER_CHECK_STEPS = 5


class OrderCheck:
    r"""Warns when a method's perturbation lowered the loss in one of the first steps.

    ``optax.chain(base, sam(rho))`` (the method after the base optimizer)
    hands the method an update, :math:`-\eta g`, not a gradient: it perturbs
    downhill and hands on a gradient that the chain then *adds* to the
    params, so training ascends. Along the gradient the perturbed loss is
    :math:`L(w \pm \rho\hat g) - L(w) \approx \pm\rho\|g\| + c` with the
    same curvature term c either way, so a negative ``sharpness`` diagnostic
    says the perturbation went downhill; once training ascends,
    :math:`\|g\|` grows and the sign shows even where c hid it at first.

    The step builders of :mod:`sam_optax.parallel` and the helpers of
    :mod:`sam_optax.flax` call one after each of their first
    :data:`ORDER_CHECK_STEPS` calls (a host sync each, then nothing): it
    reads every state of the family in ``opt_state`` (they pass ``value=``,
    which the diagnostic needs) and warns once. A loss with negative
    curvature along the gradient, or ``direction='random'`` (the ablation),
    can trip it too; the message says so. A method that does not read the
    incoming gradient (its ``grad_norm`` is NaN: MSAM, whose perturbation
    follows the base optimizer's momentum downhill by design) is not checked.
    Traced values are not read.
    """

    def __init__(self, where: str) -> None:
        self.where = where
        self.left = ORDER_CHECK_STEPS

    def __call__(self, opt_state: Any) -> None:
        if self.left <= 0:
            return
        states = [
            x
            for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, SAMState))
            if isinstance(x, SAMState)
        ]
        # Flattened: a wrapper that is a pytree (nnx.Optimizer's variables) gives its array.
        read = [
            [
                jax.tree.leaves(x)[0]
                for x in (
                    s.count,
                    s.diagnostics.sharpness,
                    s.diagnostics.sam_step,
                    s.diagnostics.grad_norm,
                )
            ]
            for s in states
        ]
        if any(isinstance(x, jax.core.Tracer) for r in read for x in r):
            return
        self.left -= 1
        for count, sharpness, taken, grad_norm in read:
            # A method that does not read the incoming gradient (MSAM: its grad_norm is
            # NaN) perturbs along its own direction; MSAM's goes downhill by design.
            if math.isnan(float(grad_norm)):
                continue
            if int(count) <= ORDER_CHECK_STEPS and bool(taken) and float(sharpness) < 0:
                self.left = 0
                warnings.warn(
                    f"{self.where}: at step {int(count)} the perturbed loss is below the clean "
                    f"one (sharpness {float(sharpness):.3g} < 0): the perturbation went "
                    "downhill. If the SAM method comes after the base optimizer in the chain "
                    "(optax.chain(optax.sgd(...), sam_optax.sam(...))), it perturbs along "
                    "the update instead of the gradient and training ascends: put it first, "
                    "optax.chain(sam_optax.sam(rho), base). (A loss with negative curvature "
                    "along the gradient, or direction='random', can also do this: then "
                    "ignore this warning.)",
                    UserWarning,
                    stacklevel=3,
                )
                return


def _keep_memory(step: Step, memory: Any) -> tuple[Any, Any, Diagnostics]:
    out, diagnostics = base_step(step)
    return out, memory, diagnostics


# --------------------------------------------------------------------------
# Tree maths and diagnostics.
# --------------------------------------------------------------------------


def float_leaves(tree: Any) -> list[jax.Array]:
    """Leaves in at least float32 (complex stays complex)."""
    return [x.astype(jnp.promote_types(x.dtype, jnp.float32)) for x in jax.tree.leaves(tree)]


def inner(a: Sequence[jax.Array], b: Sequence[jax.Array]) -> jax.Array:
    """:math:`\\mathrm{Re}\\langle a, b\\rangle` over all leaves (in the leaves' dtype)."""
    return jnp.real(optax.tree.vdot(list(a), list(b)))


def norm(leaves: Sequence[jax.Array]) -> jax.Array:
    """Global L2 norm (complex magnitudes)."""
    return optax.tree.norm(list(leaves))


def cosine(a: Sequence[jax.Array], b: Sequence[jax.Array]) -> jax.Array:
    """:math:`\\cos(a, b)`, 0 when either is zero."""
    denom = norm(a) * norm(b)
    return jnp.where(denom > 0, inner(a, b) / jnp.where(denom > 0, denom, 1.0), 0.0)


def projection_coefficient(x: Sequence[jax.Array], onto: Sequence[jax.Array]) -> jax.Array:
    r""":math:`\langle x, u\rangle / \|u\|^2` (0 when :math:`u = 0`)."""
    sq = inner(onto, onto)
    return jnp.where(sq > 0, inner(x, onto) / jnp.where(sq > 0, sq, 1.0), 0.0)


def measure(
    step: Step,
    info: Info | None = None,
    handed_on: Sequence[jax.Array] | None = None,
    sam_step: Any = None,
    clean: Sequence[jax.Array] | None = None,
) -> Diagnostics:
    """The :class:`Diagnostics` of a step, averaged over the data-parallel axes.

    ``info`` is what the SAM pass learnt (``None`` when no SAM pass ran: then
    only ``grad_norm`` is measured); the cosine is measured when
    ``handed_on`` (the local gradient handed on) is given. ``clean``
    replaces the incoming gradient's leaves (when the method already holds
    them in float32). ``sam_step`` defaults to whether ``info`` is given.
    """
    call, axes = step.call, step.options.axes
    g = clean_leaves(step) if clean is None else list(clean)
    nan = jnp.full([], jnp.nan, jnp.float32)
    perturbed = nan if info is None else info.perturbed_loss.astype(jnp.float32)
    cos = nan if handed_on is None else cosine(g, handed_on).astype(jnp.float32)
    value = nan if call.value is None else jnp.asarray(call.value, jnp.float32)
    floats = (perturbed - value, perturbed, norm(g).astype(jnp.float32), cos)
    if axes:
        floats = _axes.pmean(floats, axes)
    taken = info is not None if sam_step is None else sam_step
    return Diagnostics(*floats, jnp.asarray(taken, jnp.bool_))


def unit(x: Sequence[jax.Array], eps: Any = 0.0) -> list[jax.Array]:
    """``x / (||x|| + eps)`` (zero stays zero)."""
    n = norm(x) + eps
    return [v / jnp.where(n > 0, n, 1.0) for v in x]


def moved(step: Step, deltas: Sequence[jax.Array]) -> Any:
    """The params with ``deltas`` (one per selected leaf, in the compute dtype) added.

    The other leaves are the params' own; each leaf keeps its dtype.
    """
    sel, params = step.call.sel, step.call.params
    leaves = jax.tree.leaves(params)
    out = [
        (leaves[i].astype(sel.dtype) + d).astype(leaves[i].dtype)
        for i, d in zip(sel.indices, deltas)
    ]
    return jax.tree.unflatten(sel.treedef, sel.place(out, leaves))


def zeros_f32(params: Any) -> Any:
    """A params-shaped buffer of zeros in at least float32."""
    return jax.tree.map(
        lambda w: jnp.zeros_like(w, jnp.promote_types(w.dtype, jnp.float32)), params
    )


def check_hyper(
    owner: str,
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    open_low: bool = False,
) -> None:
    """A method's own hyperparameter: a number in [low, high] or a schedule (concrete values only)."""
    if callable(value):
        return
    _checks.check_number(
        name, value, low=low, high=high, traced_ok=True, owner=owner, open_low=open_low
    )
