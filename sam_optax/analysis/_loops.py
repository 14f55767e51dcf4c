"""How the analysis loops are compiled.

Measured here (jax 0.10.2, XLA:CPU): a convolution inside a compiled loop
(``lax.fori_loop``, ``lax.scan``, ``lax.map``: an XLA while loop) runs 20-30x
slower than the same convolution outside one (``benchmarks/hessian.py``'s CNN:
a gradient 0.15 s alone, 2.7 s per iteration inside a loop). So by default a
loop is unrolled (one straight-line program, compiled once, no Python loop at
run time) exactly when it would hit that case: on the CPU backend, for a loss
whose program contains a convolution. Everywhere else it stays a loop, which
compiles faster. Every function that loops takes ``unroll`` to choose.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

_CONVOLUTIONS = ("conv_general_dilated",)


def _has_convolution(jaxpr: Any) -> bool:
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in _CONVOLUTIONS:
            return True
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns") and _has_convolution(inner):
                    return True
    return False


def resolve_unroll(
    unroll: bool | int | None, fn: Callable[..., Any] | None = None, *args: Any
) -> bool | int:
    """``None``: unroll fully on CPU if ``fn(*args)`` convolves, else keep the loop."""
    if unroll is not None:
        return unroll
    if jax.default_backend() != "cpu":
        return 1
    if fn is None:
        return True
    return _has_convolution(jax.make_jaxpr(fn)(*args).jaxpr)


def scan(
    body: Callable[[Any, Any], tuple[Any, Any]],
    init: Any,
    xs: Any = None,
    *,
    length: int | None = None,
    unroll: bool | int = 1,
) -> tuple[Any, Any]:
    """``lax.scan``, or with ``unroll=True`` the same steps traced in a straight line."""
    if unroll is not True:
        return jax.lax.scan(body, init, xs, length=length, unroll=unroll)
    n = length if xs is None else jax.tree.leaves(xs)[0].shape[0]
    carry, outs = init, []
    for i in range(n):
        carry, out = body(carry, None if xs is None else jax.tree.map(lambda x, i=i: x[i], xs))
        outs.append(out)
    stacked = (
        None
        if outs and all(o is None for o in outs)
        else jax.tree.map(lambda *o: jax.numpy.stack(o), *outs)
    )
    return carry, stacked
