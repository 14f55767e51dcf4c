"""Argument checks shared by the factories and the tree-level functions.

Hyperparameters may arrive traced (``optax.inject_hyperparams`` passes them
as arrays inside ``jit``): they are validated only when they are concrete
Python numbers, and never steer Python control flow when they are traced.
Every message names the argument and what was expected.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def concrete_float(x: Any) -> float | None:
    """``float(x)`` when ``x`` is a concrete number, ``None`` when it is traced."""
    try:
        return float(x)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return None


def check_norm(norm: Any) -> float:
    """Validates the p of eq. (2): a concrete number > 1 (``inf`` included), as a float."""
    p = None if isinstance(norm, (bool, str)) else concrete_float(norm)
    if p is None and hasattr(norm, "dtype"):
        raise ValueError(
            "norm must be a static number (it picks the formula), got a traced value; "
            "pass it as a Python float outside jit."
        )
    if p is None or math.isnan(p) or p <= 1:
        raise ValueError(
            "norm must be a number > 1 (2 is SAM, float('inf') is the sign "
            f"direction), got norm={norm!r}."
        )
    return p


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    traced_ok: bool = False,
    owner: str | None = None,
    open_low: bool = False,
) -> Any:
    """A finite real number in ``[low, high]`` (``(low, high]`` with ``open_low``), returned as is.

    A traced value passes unchecked when ``traced_ok`` (``optax.inject_hyperparams``
    injects hyperparameters as arrays under ``jit``); strings, ``None`` and
    booleans are refused by name.
    """
    where = f"{owner}: " if owner else ""
    if isinstance(value, (bool, str)) or value is None or callable(value):
        raise ValueError(f"{where}{name} must be a number, got {name}={value!r}.")
    v = concrete_float(value)
    if v is None:
        if traced_ok and hasattr(value, "dtype"):
            return value
        raise ValueError(f"{where}{name} must be a number, got {name}={value!r}.")
    if math.isinf(v):
        raise ValueError(f"{where}{name} must be a finite number, got {name}={value!r}.")
    below = low is not None and (v <= low if open_low else v < low)
    if math.isnan(v) or below or (high is not None and v > high):
        bounds = (
            f"{'>' if open_low else '>='} {low:g}" if high is None else
            f"<= {high:g}" if low is None else
            f"in {'(' if open_low else '['}{low:g}, {high:g}]"
        )  # fmt: skip
        raise ValueError(f"{where}{name} must be {bounds}, got {name}={value!r}.")
    return value


def check_int(name: str, value: Any) -> int:
    """A Python or NumPy integer (not a bool), as ``int``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {name}={value!r}.")
    return int(value)


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {name}={value!r}.")


def check_nonnegative(name: str, value: Any) -> None:
    """``value >= 0`` when it is a concrete number (schedules and tracers pass)."""
    v = None if callable(value) else concrete_float(value)
    if v is not None and not 0 <= v < math.inf:
        raise ValueError(f"{name} must be a finite number >= 0, got {name}={value!r}.")


def check_in_range(name: str, value: Any, low: float, high: float) -> None:
    """``low <= value <= high`` when ``value`` is a concrete number."""
    v = None if callable(value) else concrete_float(value)
    if v is not None and not low <= v <= high:
        raise ValueError(f"{name} must be in [{low:g}, {high:g}], got {name}={value!r}.")


def check_positive_int(name: str, value: Any) -> int:
    """An integer >= 1, returned as ``int``."""
    v = None if isinstance(value, (bool, str)) else concrete_float(value)
    if v is None or v != int(v) or v < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {name}={value!r}.")
    return int(v)


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {name}={value!r}.")


def check_base_optimizer(owner: str, inner: Any, example: str) -> None:
    """``inner`` is an optax transformation (the base optimizer a wrapping method takes first).

    ``msam(0.05)``, written as ``sam(0.05)`` is, would otherwise fail later
    with ``'float' object has no attribute 'init'``.
    """
    if isinstance(inner, (int, float)) and not isinstance(inner, bool):
        raise TypeError(
            f"{owner} wraps the base optimizer: its first argument is that optimizer, its "
            f"second rho. Got {owner}({inner!r}); write {example}."
        )
    if not (callable(getattr(inner, "init", None)) and callable(getattr(inner, "update", None))):
        raise TypeError(
            f"{owner}: the first argument must be the base optimizer, an optax "
            f"GradientTransformation (with init and update), got {type(inner).__name__}; "
            f"write {example}."
        )


def check_tree_matches(tree: Any, params: Any, name: str, owner: str = "sam") -> None:
    """``tree`` has the structure and leaf shapes of ``params``."""
    leaves, treedef = jax.tree.flatten(tree)
    p_leaves, p_def = jax.tree.flatten(params)
    if treedef != p_def:
        raise ValueError(
            f"{owner}: {name} must have the tree structure of params; got\n"
            f"  {name}: {treedef}\n  params: {p_def}"
        )
    for i, (g, w) in enumerate(zip(leaves, p_leaves)):
        if jnp.shape(g) != jnp.shape(w):
            raise ValueError(
                f"{owner}: leaf {i} of {name} has shape {jnp.shape(g)} but the "
                f"matching params leaf has shape {jnp.shape(w)}."
            )


def check_value_fn(value_fn: Any, owner: str = "sam") -> Callable[..., Any]:
    if value_fn is None:
        raise TypeError(
            f"{owner}: update needs the loss closure: call "
            "tx.update(grads, state, params, value_fn=loss_fn) with "
            "loss_fn(params) -> scalar (with Flax NNX, loss, grads, value_fn = "
            "sam_optax.flax.nnx_value_and_grad(loss_fn)(model, batch) gives it). "
            "If you passed it and a wrapper called "
            "tx.update for you, that wrapper dropped it: flax's "
            "TrainState.apply_gradients does (use sam_optax.flax.SAMTrainState, "
            "or sam_optax.flax.linen_train_step / nnx_train_step), and so do "
            "optax.MultiSteps(...).gradient_transformation() and optax.lookahead "
            "(call optax.MultiSteps(...).update, or put sam inside the fast optimizer)."
        )
    if not callable(value_fn):
        raise TypeError(f"{owner}: value_fn must be callable, got {type(value_fn).__name__}.")
    return value_fn


def checked_loss(
    fn: Callable[..., Any], has_aux: bool, name: str, owner: str = "sam", per_example: bool = False
):
    """Wraps a loss closure: trace-time checks of what it returns; returns the loss alone.

    With ``per_example`` the closure returns one loss per example (a vector).
    """
    what = "a vector of per-example losses" if per_example else "a scalar loss"

    def loss(arg: Any) -> jax.Array:
        out = fn(arg)
        if has_aux:
            if not (isinstance(out, tuple) and len(out) == 2):
                raise TypeError(
                    f"{owner}(has_aux=True): {name} must return (loss, aux), "
                    f"got {type(out).__name__}."
                )
            out = out[0]
        elif isinstance(out, (tuple, list)):
            raise TypeError(
                f"{owner}: {name} returned a {type(out).__name__}; it must "
                f"return {what}. If it returns (loss, aux), pass "
                f"has_aux=True to {owner}."
            )
        if not isinstance(out, jax.Array):
            raise TypeError(
                f"{owner}: {name} must return {what} as a JAX array computed from "
                f"its params argument, got {type(out).__name__} {out!r}."
            )
        if jnp.ndim(out) != (1 if per_example else 0):
            raise TypeError(
                f"{owner}: {name} must return {what}, got an array of shape {jnp.shape(out)}."
            )
        return out

    return loss
