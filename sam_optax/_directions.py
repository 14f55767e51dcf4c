"""Ascent directions of SAM: eq. (2) p-norms, the adaptive form, random ones.

Everything here is a pure function of arrays. The tree-level functions
(:func:`ascent_direction`, :func:`random_direction`) are public and reused by
the analysis tools; the list-level helpers below them work on flat lists of
the *perturbed* leaves only and are what :func:`sam_optax.sam` calls.

Norms and sums are computed in at least float32 (float64 stays float64), so
bfloat16/float16 trees get an accurate direction; the public functions return
each leaf in its input dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["ascent_direction", "project_to_ball", "random_direction"]

# A norm is either a static Python float (2.0, 3.0, inf, ...) or a traced
# scalar (when ``optax.inject_hyperparams`` injects it). Static 2 and inf take
# the closed forms; everything else takes the general eq. (2) path.
Norm = Any
Mask = Any


# --------------------------------------------------------------------------
# Argument handling shared with ``_sam.py``.
# --------------------------------------------------------------------------


def concrete_float(x: Any) -> float | None:
    """``float(x)`` when ``x`` is a concrete number, ``None`` when it is traced."""
    if isinstance(x, bool):
        return float(x)
    try:
        return float(x)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return None


def check_norm(norm: Norm) -> Norm:
    """Validates the p of eq. (2); returns a float when concrete."""
    p = concrete_float(norm)
    if p is None:
        return norm
    if math.isnan(p) or p <= 1:
        raise ValueError(
            f"norm must be a number > 1 (2 is SAM, float('inf') is the sign "
            f"direction), got norm={norm!r}."
        )
    return p


def compute_dtype(dtype: Any) -> Any:
    """The dtype norms and directions are computed in: at least float32."""
    return jnp.promote_types(dtype, jnp.float32)


def mask_leaves(mask: Mask, params: Any) -> list[Any]:
    """Broadcasts a mask (a prefix tree of bools, or a callable) to params' leaves.

    Each returned entry is ``True``/``False`` (a static choice) or a boolean
    array (an elementwise choice).
    """
    n = len(jax.tree.leaves(params))
    if mask is None:
        return [True] * n
    if callable(mask):
        mask = mask(params)
    try:
        full = jax.tree.map(
            lambda m, sub: jax.tree.map(lambda _: m, sub),
            mask,
            params,
            is_leaf=lambda x: x is None,
        )
    except (ValueError, TypeError) as err:
        raise ValueError(
            "mask must be a pytree of bools with the structure of params (or a "
            f"prefix of it), or a callable returning one; got {mask!r}."
        ) from err
    leaves = jax.tree.leaves(full, is_leaf=lambda x: x is None)
    if len(leaves) != n:
        raise ValueError(f"mask has {len(leaves)} leaves after broadcasting, params has {n}.")
    out = []
    for m in leaves:
        if isinstance(m, (bool,)) or m is None:
            out.append(bool(m))
        elif hasattr(m, "dtype") and jnp.issubdtype(m.dtype, jnp.bool_):
            out.append(m)
        else:
            raise ValueError(
                f"mask leaves must be bools or boolean arrays, got {m!r} of type "
                f"{type(m).__name__}."
            )
    return out


# --------------------------------------------------------------------------
# List-level maths. ``xs`` are the active leaves, already in compute dtype.
# --------------------------------------------------------------------------


def _sum(values: Sequence[jax.Array]) -> jax.Array:
    total = values[0]
    for v in values[1:]:
        total = total + v
    return total


def _safe_pow(a: jax.Array, e: Any) -> jax.Array:
    """``a ** e`` for ``a >= 0`` that is 0 at ``a == 0`` with a zero gradient."""
    positive = a > 0
    return jnp.where(positive, jnp.where(positive, a, 1.0) ** e, 0.0)


def _safe_sqrt(s: jax.Array) -> jax.Array:
    """``sqrt(s)`` for ``s >= 0`` with a zero (not infinite) gradient at 0."""
    positive = s > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, s, 1.0)), 0.0)


def _abs_max(xs: Sequence[jax.Array]) -> jax.Array:
    """Global ``max |x|`` (0 for empty leaves)."""
    maxima = [jnp.max(jnp.abs(x), initial=0.0) for x in xs]
    out = maxima[0]
    for m in maxima[1:]:
        out = jnp.maximum(out, m)
    return out


def _static(p: Norm, value: float) -> bool:
    return isinstance(p, float) and p == value


def _exponents(p: Norm) -> tuple[Any, Any]:
    """``(1/p, q)`` with ``1/p + 1/q = 1``, valid for p = inf and traced p."""
    inv_p = 1.0 / p
    return inv_p, 1.0 / (1.0 - inv_p)


def p_norm(xs: Sequence[jax.Array], p: Norm) -> jax.Array:
    """Global p-norm of a list of arrays (scaled by the max: no overflow)."""
    if _static(p, 2.0):
        return _safe_sqrt(_sum([jnp.sum(jnp.square(x)) for x in xs]))
    m = _abs_max(xs)
    if _static(p, math.inf):
        return m
    safe_m = jnp.where(m > 0, m, 1.0)
    inv_p = 1.0 / p
    s = _sum([jnp.sum(_safe_pow(jnp.abs(x) / safe_m, p)) for x in xs])
    total = m * _safe_pow(s, inv_p)
    if isinstance(p, float):
        return total
    return jnp.where(jnp.isinf(p), m, total)


def dual_unit(xs: Sequence[jax.Array], p: Norm, eps: Any) -> list[jax.Array]:
    r"""The maximiser of :math:`\langle d, x\rangle` over :math:`\|d\|_p \le 1`.

    That is eq. (2) of the paper with :math:`\rho = 1`:
    :math:`\mathrm{sign}(x)\,|x|^{q-1} / (\|x\|_q + \epsilon)^{q-1}`, with
    ``eps`` added to the dual norm so that a zero ``x`` gives zero, not NaN.
    The general case is computed on ``x / max|x|`` (the formula is invariant to
    that scale), which keeps ``|x|^q`` finite for any q.
    """
    if _static(p, 2.0):
        denom = p_norm(xs, 2.0) + eps
        return [x / denom for x in xs]
    if _static(p, math.inf):
        return [jnp.sign(x) for x in xs]
    _, q = _exponents(p)
    m = _abs_max(xs)
    positive = m > 0
    safe_m = jnp.where(positive, m, 1.0)
    scaled = [jnp.abs(x) / safe_m for x in xs]
    q_norm = _safe_pow(_sum([jnp.sum(_safe_pow(a, q)) for a in scaled]), 1.0 / q)
    eps_over_m = jnp.where(positive, eps / safe_m, 1.0)
    denom = (q_norm + eps_over_m) ** (q - 1.0)
    return [jnp.sign(x) * _safe_pow(a, q - 1.0) / denom for x, a in zip(xs, scaled)]


def primal_unit(xs: Sequence[jax.Array], p: Norm) -> list[jax.Array]:
    """``x / ||x||_p`` (zero stays zero): a direction of p-norm one."""
    n = p_norm(xs, p)
    safe_n = jnp.where(n > 0, n, 1.0)
    return [x / safe_n for x in xs]


def project(xs: Sequence[jax.Array], p: Norm, radius: Any) -> list[jax.Array]:
    """Projects onto the p-ball of the given radius.

    Exact Euclidean projection for p = 2 (rescaling) and p = inf (clipping);
    for other p, the radial rescaling onto the ball.
    """
    if _static(p, math.inf):
        return [jnp.clip(x, -radius, radius) for x in xs]
    n = p_norm(xs, p)
    factor = jnp.where(n > radius, radius / jnp.where(n > 0, n, 1.0), 1.0)
    out = [x * factor for x in xs]
    if isinstance(p, float):
        return out
    return [jnp.where(jnp.isinf(p), jnp.clip(x, -radius, radius), o) for x, o in zip(xs, out)]


def adaptive_scale(ws: Sequence[jax.Array], eta: Any) -> list[jax.Array]:
    r"""ASAM's elementwise :math:`T_w = |w| + \eta`."""
    return [jnp.abs(w) + eta for w in ws]


def apply_mask(xs: Sequence[jax.Array], masks: Sequence[Any]) -> list[jax.Array]:
    """Zeroes the elements an array mask leaves out (static masks are already applied)."""
    return [x if m is True else jnp.where(m, x, jnp.zeros_like(x)) for x, m in zip(xs, masks)]


# --------------------------------------------------------------------------
# Public tree-level functions.
# --------------------------------------------------------------------------


def _prepare(
    tree: Any,
    params: Any,
    adaptive: bool,
    mask: Mask,
    name: str,
) -> tuple[list[jax.Array], list[Any], list[int], list[Any] | None, Any]:
    leaves, treedef = jax.tree.flatten(tree)
    if adaptive and params is None:
        raise ValueError("adaptive=True needs params (T_w = |w| + eta).")
    w_leaves = None
    if params is not None:
        w_leaves, w_def = jax.tree.flatten(params)
        if w_def != treedef:
            raise ValueError(
                f"{name} and params must have the same tree structure; got\n"
                f"  {name}: {treedef}\n  params: {w_def}"
            )
    masks = mask_leaves(mask, params if params is not None else tree)
    active = [i for i, m in enumerate(masks) if m is not False]
    return leaves, masks, active, w_leaves, treedef


def ascent_direction(
    grads: Any,
    rho: jax.typing.ArrayLike,
    *,
    params: Any = None,
    norm: Norm = 2,
    adaptive: bool = False,
    eta: jax.typing.ArrayLike = 0.01,
    eps: jax.typing.ArrayLike = 1e-12,
    mask: Mask = None,
) -> Any:
    r"""SAM's perturbation :math:`\hat\epsilon(w)` (eq. 2), optionally adaptive.

    For a gradient :math:`g` the first-order solution of
    :math:`\max_{\|\epsilon\|_p \le \rho} \epsilon^\top g` is

    .. math::

      \hat\epsilon = \rho\, \mathrm{sign}(g)\, |g|^{q-1} / \|g\|_q^{q-1},
      \qquad 1/p + 1/q = 1,

    so :math:`\rho g / \|g\|_2` for p = 2 and :math:`\rho\,\mathrm{sign}(g)`
    for p = inf. With ``adaptive=True`` (ASAM) the ball is measured in the
    coordinates :math:`T_w^{-1}\epsilon` with :math:`T_w = |w| + \eta`, giving
    :math:`\hat\epsilon = \rho T_w\, d_p(T_w g)` where :math:`d_p` is the unit
    direction above (for p = 2: :math:`\rho T_w^2 g / \|T_w g\|_2`).

    The norm is global over all the leaves ``mask`` selects; the others get
    zero. ``eps`` is added to the dual norm so that a zero gradient gives a
    zero perturbation, never NaN.

    Args:
      grads: the gradient at ``params`` (any pytree of arrays).
      rho: radius of the neighbourhood.
      params: the parameters; required when ``adaptive=True`` and used for the
        structure of ``mask``.
      norm: p of eq. (2): any number > 1, or ``float('inf')``.
      adaptive: use ASAM's scale-invariant neighbourhood.
      eta: ASAM's offset :math:`\eta` in :math:`T_w = |w| + \eta`.
      eps: added to the dual norm in the denominator.
      mask: pytree of bools (a prefix of ``grads`` is fine), boolean arrays, or
        a callable ``params -> mask``; ``False`` leaves are not perturbed.

    Returns:
      :math:`\hat\epsilon`, a pytree like ``grads`` (each leaf in its dtype).

    Examples:
      >>> import jax.numpy as jnp
      >>> from sam_optax import ascent_direction
      >>> g = {"a": jnp.array([3.0, 0.0]), "b": jnp.array([4.0])}
      >>> eps_hat = ascent_direction(g, 0.5)
      >>> print(eps_hat["a"], eps_hat["b"])
      [0.3 0. ] [0.4]
      >>> print(ascent_direction(g, 0.5, norm=float("inf"))["a"])
      [0.5 0. ]

    References:
      Foret et al, `Sharpness-Aware Minimization for Efficiently Improving
      Generalization <https://arxiv.org/abs/2010.01412>`_, 2021 (eq. 2).

      Kwon et al, `ASAM: Adaptive Sharpness-Aware Minimization
      <https://arxiv.org/abs/2102.11600>`_, 2021.
    """
    p = check_norm(norm)
    leaves, masks, active, w_leaves, treedef = _prepare(grads, params, adaptive, mask, "grads")
    out = [jnp.zeros_like(x) for x in leaves]
    if not active:
        return jax.tree.unflatten(treedef, out)
    cdt = compute_dtype(jnp.result_type(*[leaves[i] for i in active]))
    xs = apply_mask([leaves[i].astype(cdt) for i in active], [masks[i] for i in active])
    scale = None
    if adaptive:
        scale = adaptive_scale([w_leaves[i].astype(cdt) for i in active], eta)
        xs = [t * x for t, x in zip(scale, xs)]
    ds = dual_unit(xs, p, eps)
    if adaptive:
        ds = [t * d for t, d in zip(scale, ds)]
    for i, d in zip(active, ds):
        out[i] = (rho * d).astype(leaves[i].dtype)
    return jax.tree.unflatten(treedef, out)


def project_to_ball(
    tree: Any,
    rho: jax.typing.ArrayLike,
    *,
    params: Any = None,
    norm: Norm = 2,
    adaptive: bool = False,
    eta: jax.typing.ArrayLike = 0.01,
    mask: Mask = None,
) -> Any:
    r"""Projects a perturbation onto the :math:`\rho`-ball of :func:`ascent_direction`.

    The ball is :math:`\{\epsilon : \|T_w^{-1}\epsilon\|_p \le \rho\}` with
    :math:`T_w = |w| + \eta` for ``adaptive=True`` and :math:`T_w = 1`
    otherwise; the norm runs over the leaves ``mask`` selects (the others are
    zeroed). The projection is the exact Euclidean one for p = 2 (rescaling)
    and p = inf (clipping), a radial rescaling for other p, taken in the
    :math:`T_w^{-1}` coordinates. This is the re-projection step of the
    projected ascent of appendix C.6.

    Args:
      tree: the perturbation.
      rho: radius.
      params: parameters (for ``adaptive`` and a callable mask).
      norm: p of the ball.
      adaptive: ASAM's ball.
      eta: ASAM's offset.
      mask: as in :func:`ascent_direction`.

    Returns:
      The projected perturbation, each leaf in its dtype.

    Examples:
      >>> import jax.numpy as jnp
      >>> from sam_optax import project_to_ball
      >>> print(project_to_ball(jnp.array([3.0, 4.0]), 1.0))
      [0.6 0.8]
      >>> print(project_to_ball(jnp.array([0.3, 0.4]), 1.0))
      [0.3 0.4]
    """
    p = check_norm(norm)
    leaves, masks, active, w_leaves, treedef = _prepare(tree, params, adaptive, mask, "tree")
    out = [jnp.zeros_like(x) for x in leaves]
    if not active:
        return jax.tree.unflatten(treedef, out)
    cdt = compute_dtype(jnp.result_type(*[leaves[i] for i in active]))
    xs = apply_mask([leaves[i].astype(cdt) for i in active], [masks[i] for i in active])
    if adaptive:
        scale = adaptive_scale([w_leaves[i].astype(cdt) for i in active], eta)
        xs = [t * d for t, d in zip(scale, project([x / t for t, x in zip(scale, xs)], p, rho))]
    else:
        xs = project(xs, p, rho)
    for i, x in zip(active, xs):
        out[i] = x.astype(leaves[i].dtype)
    return jax.tree.unflatten(treedef, out)


def random_direction(
    key: jax.Array,
    like: Any,
    rho: jax.typing.ArrayLike,
    *,
    params: Any = None,
    norm: Norm = 2,
    adaptive: bool = False,
    eta: jax.typing.ArrayLike = 0.01,
    mask: Mask = None,
) -> Any:
    r"""A Gaussian perturbation scaled to norm :math:`\rho` (appendix C.5).

    :math:`z \sim \mathcal N(0, I)` over the leaves ``mask`` selects, then
    :math:`\epsilon = \rho z / \|z\|_p`; with ``adaptive=True``,
    :math:`\epsilon = \rho T_w z / \|z\|_p`. The paper's ablation is p = 2.

    Args:
      key: a ``jax.random`` key; the same key gives the same direction.
      like: a pytree whose structure, shapes and dtypes the result takes.
      rho: radius.
      params: parameters, needed for ``adaptive=True`` and a callable mask.
      norm: p of the ball (any number > 1 or ``float('inf')``).
      adaptive: scale by :math:`T_w = |w| + \eta`.
      eta: ASAM's offset.
      mask: as in :func:`ascent_direction`.

    Returns:
      A pytree like ``like`` with p-norm ``rho`` (before the adaptive scaling).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from sam_optax import random_direction
      >>> e = random_direction(jax.random.key(0), {"w": jnp.zeros(100)}, 0.1)
      >>> print(round(float(jnp.linalg.norm(e["w"])), 4))
      0.1
    """
    p = check_norm(norm)
    leaves, masks, active, w_leaves, treedef = _prepare(like, params, adaptive, mask, "like")
    out = [jnp.zeros_like(x) for x in leaves]
    if not active:
        return jax.tree.unflatten(treedef, out)
    cdt = compute_dtype(jnp.result_type(*[leaves[i] for i in active]))
    ws = None if w_leaves is None else [w_leaves[i].astype(cdt) for i in active]
    ds = random_unit(key, [leaves[i] for i in active], [masks[i] for i in active], p, cdt)
    if adaptive:
        ds = [t * d for t, d in zip(adaptive_scale(ws, eta), ds)]
    for i, d in zip(active, ds):
        out[i] = (rho * d).astype(leaves[i].dtype)
    return jax.tree.unflatten(treedef, out)


def random_unit(
    key: jax.Array,
    like: Sequence[jax.Array],
    masks: Sequence[Any],
    p: Norm,
    dtype: Any,
) -> list[jax.Array]:
    """Gaussian leaves shaped like ``like``, masked, scaled to p-norm one."""
    keys = jax.random.split(key, len(like))
    zs = [jax.random.normal(k, jnp.shape(x), dtype) for k, x in zip(keys, like)]
    return primal_unit(apply_mask(zs, masks), p)
