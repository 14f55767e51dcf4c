"""Ascent directions of SAM: eq. (2) p-norms, the adaptive form, random ones.

Three layers, top down:

* the public tree-level functions :func:`ascent_direction`,
  :func:`project_to_ball` and :func:`random_direction` (reused by the analysis
  tools);
* :class:`Selection`: which leaves of the params are perturbed (the mask) and
  the dtype the maths runs in;
* the norm maths (:func:`p_norm`, :func:`dual_unit`, :func:`primal_unit`,
  :func:`project`, :func:`adaptive_scale`), pure functions of any pytree of
  arrays (the core passes lists of the selected leaves).

Norms and sums run in at least float32 (float64 stays float64), so
bfloat16/float16 trees get an accurate direction; the public functions return
each leaf in its input dtype. Complex leaves follow optax's convention (the
caller conjugates ``jax.grad``): magnitudes ``|x|`` in every norm and the
phase ``x / |x|`` in place of the sign, so the direction maximizes the real
inner product :math:`\\mathrm{Re}\\langle\\epsilon, g\\rangle`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp

from sam_optax._checks import check_norm

__all__ = ["ascent_direction", "project_to_ball", "random_direction"]

# A norm is a static Python float (2.0, 3.0, inf, ...): 2 and inf take the
# closed forms, everything else the general eq. (2) path.
Norm = float
Mask = Any


# --------------------------------------------------------------------------
# Norm maths on any pytree of arrays (already in the compute dtype).
# --------------------------------------------------------------------------


def _sum(values: Sequence[jax.Array]) -> jax.Array:
    total = values[0]
    for v in values[1:]:
        total = total + v
    return total


def _safe_pow(a: jax.Array, e: Any) -> jax.Array:
    """``a ** e`` for real ``a >= 0`` that is 0 at ``a == 0`` with a zero gradient."""
    positive = a > 0
    return jnp.where(positive, jnp.where(positive, a, 1.0) ** e, 0.0)


def _safe_sqrt(s: jax.Array) -> jax.Array:
    """``sqrt(s)`` for ``s >= 0`` with a zero (not infinite) gradient at 0."""
    positive = s > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, s, 1.0)), 0.0)


def _abs_sq(x: jax.Array) -> jax.Array:
    """``|x|^2``, real for complex ``x``."""
    return jnp.real(x * jnp.conj(x)) if jnp.iscomplexobj(x) else jnp.square(x)


def _abs_max(leaves: Sequence[jax.Array]) -> jax.Array:
    """Global ``max |x|`` (0 for empty leaves)."""
    maxima = [jnp.max(jnp.abs(x), initial=0.0) for x in leaves]
    out = maxima[0]
    for m in maxima[1:]:
        out = jnp.maximum(out, m)
    return out


def _is(p: Norm, value: float) -> bool:
    return float(p) == value


def _conjugate_exponent(p: Norm) -> float:
    """q with ``1/p + 1/q = 1`` (p = inf gives 1)."""
    return 1.0 / (1.0 - 1.0 / p)


def p_norm(tree: Any, p: Norm) -> jax.Array:
    """Global p-norm over all leaves (computed on ``x / max|x|``: no overflow)."""
    leaves = jax.tree.leaves(tree)
    if _is(p, 2.0):
        return _safe_sqrt(_sum([jnp.sum(_abs_sq(x)) for x in leaves]))
    m = _abs_max(leaves)
    if _is(p, math.inf):
        return m
    safe_m = jnp.where(m > 0, m, 1.0)
    s = _sum([jnp.sum(_safe_pow(jnp.abs(x) / safe_m, p)) for x in leaves])
    return m * _safe_pow(s, 1.0 / p)


def dual_unit(tree: Any, p: Norm, eps: Any) -> Any:
    r"""The maximizer of :math:`\mathrm{Re}\langle d, x\rangle` over :math:`\|d\|_p \le 1`.

    That is eq. (2) of the paper with :math:`\rho = 1`:
    :math:`\mathrm{sign}(x)\,|x|^{q-1} / (\|x\|_q + \epsilon)^{q-1}`, with
    ``eps`` added to the dual norm so that a zero ``x`` gives zero, not NaN.
    The general case is computed on ``x / max|x|`` (the formula is invariant to
    that scale), which keeps ``|x|^q`` finite for any q.
    """
    if _is(p, 2.0):
        denom = p_norm(tree, 2.0) + eps
        return jax.tree.map(lambda x: x / denom, tree)
    if _is(p, math.inf):
        return jax.tree.map(jnp.sign, tree)
    q = _conjugate_exponent(p)
    m = _abs_max(jax.tree.leaves(tree))
    positive = m > 0
    safe_m = jnp.where(positive, m, 1.0)
    q_norm = _safe_pow(
        _sum([jnp.sum(_safe_pow(jnp.abs(x) / safe_m, q)) for x in jax.tree.leaves(tree)]),
        1.0 / q,
    )
    denom = (q_norm + jnp.where(positive, eps / safe_m, 1.0)) ** (q - 1.0)
    return jax.tree.map(
        lambda x: jnp.sign(x) * _safe_pow(jnp.abs(x) / safe_m, q - 1.0) / denom, tree
    )


def primal_unit(tree: Any, p: Norm) -> Any:
    """``x / ||x||_p`` (zero stays zero): a direction of p-norm one."""
    n = p_norm(tree, p)
    safe_n = jnp.where(n > 0, n, 1.0)
    return jax.tree.map(lambda x: x / safe_n, tree)


def _clip_magnitude(x: jax.Array, radius: Any) -> jax.Array:
    if not jnp.iscomplexobj(x):
        return jnp.clip(x, -radius, radius)
    size = jnp.abs(x)
    return jnp.where(size > radius, x * (radius / jnp.where(size > 0, size, 1.0)), x)


def project(tree: Any, p: Norm, radius: Any) -> Any:
    """Projects onto the p-ball of the given radius.

    Exact Euclidean projection for p = 2 (rescaling) and p = inf (clipping
    each magnitude); for other p, the radial rescaling onto the ball.
    """
    if _is(p, math.inf):
        return jax.tree.map(lambda x: _clip_magnitude(x, radius), tree)
    n = p_norm(tree, p)
    factor = jnp.where(n > radius, radius / jnp.where(n > 0, n, 1.0), 1.0)
    return jax.tree.map(lambda x: x * factor, tree)


def adaptive_scale(params: Any, eta: Any) -> Any:
    r"""ASAM's elementwise :math:`T_w = |w| + \eta`."""
    return jax.tree.map(lambda w: jnp.abs(w) + eta, params)


def random_unit(
    key: jax.Array, like: Sequence[jax.Array], p: Norm, masks: Sequence[Any] | None = None
) -> list[jax.Array]:
    """Standard Gaussian arrays shaped and typed like ``like``, masked, scaled to p-norm one.

    ``masks`` holds ``True`` or a boolean array per entry (elements outside
    an array mask are zero).
    """
    keys = jax.random.split(key, len(like))
    zs = [jax.random.normal(k, jnp.shape(x), jnp.result_type(x)) for k, x in zip(keys, like)]
    if masks is not None:
        zs = [z if m is True else jnp.where(m, z, jnp.zeros_like(z)) for z, m in zip(zs, masks)]
    return primal_unit(zs, p)


# --------------------------------------------------------------------------
# Which leaves are perturbed.
# --------------------------------------------------------------------------


def mask_leaves(mask: Mask, params: Any) -> list[Any]:
    """Broadcasts a mask (a prefix tree of bools, or a callable) to params' leaves.

    Each returned entry is ``True``/``False`` (a static choice) or a boolean
    array (an elementwise choice).
    """
    n = len(jax.tree.leaves(params))
    if mask is None:
        return [True] * n
    if _is_function(mask):
        mask = mask(params)
    try:
        full = jax.tree.map(
            lambda m, sub: jax.tree.map(lambda _: m, sub), mask, params, is_leaf=lambda x: x is None
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
        if isinstance(m, bool) or m is None:
            out.append(bool(m))
        elif hasattr(m, "dtype") and jnp.issubdtype(m.dtype, jnp.bool_):
            out.append(m)
        else:
            raise ValueError(
                f"mask leaves must be bools or boolean arrays, got {m!r} of type "
                f"{type(m).__name__}."
            )
    return out


def _is_function(mask: Any) -> bool:
    """A mask that is a function of the params, not a pytree of bools.

    An Equinox module is callable and a pytree: its leaves make it a mask.
    """
    return callable(mask) and jax.tree.leaves(mask) == [mask]


def compute_dtype(*dtypes: Any) -> Any:
    """The dtype norms and directions are computed in: at least float32."""
    return jnp.promote_types(jnp.result_type(*dtypes), jnp.float32)


class Selection(NamedTuple):
    """The leaves of a params tree that are perturbed, and the compute dtype.

    ``take`` pulls the selected leaves of a tree shaped like the params (cast
    to ``dtype``, elementwise masks applied) as a list: every direction
    computation runs on that list. ``place`` puts a list of per-leaf values
    back at the selected positions of a full list of leaves.

    Attributes:
      treedef: the params' tree structure.
      indices: positions of the perturbed leaves among the params' leaves.
      masks: for each of them, ``True`` or a boolean array (elementwise mask).
      dtype: at least float32, complex if any selected leaf is.
    """

    treedef: Any
    indices: tuple[int, ...]
    masks: tuple[Any, ...]
    dtype: Any

    def take(self, tree: Any) -> list[jax.Array]:
        leaves = jax.tree.leaves(tree)
        out = []
        for i, m in zip(self.indices, self.masks):
            x = leaves[i].astype(self.dtype)
            out.append(x if m is True else jnp.where(m, x, jnp.zeros_like(x)))
        return out

    def place(self, values: Sequence[jax.Array], leaves: Sequence[Any]) -> list[Any]:
        out = list(leaves)
        for i, v in zip(self.indices, values):
            out[i] = v
        return out


def select(params: Any, mask: Mask, *others: Any) -> Selection:
    """The :class:`Selection` of ``mask`` over ``params``.

    The compute dtype covers the selected leaves of ``params`` and of
    ``others`` (trees shaped like it, e.g. the gradient).
    """
    leaves, treedef = jax.tree.flatten(params)
    masks = mask_leaves(mask, params)
    indices = tuple(i for i, m in enumerate(masks) if m is not False)
    dtypes = [leaves[i].dtype for i in indices]
    for other in others:
        other_leaves = jax.tree.leaves(other)
        dtypes += [jnp.result_type(other_leaves[i]) for i in indices]
    dtype = compute_dtype(*dtypes) if dtypes else jnp.float32
    return Selection(treedef, indices, tuple(masks[i] for i in indices), dtype)


# --------------------------------------------------------------------------
# Public tree-level functions.
# --------------------------------------------------------------------------


def _selection_of(tree: Any, params: Any, adaptive: bool, mask: Mask, name: str) -> Selection:
    if adaptive and params is None:
        raise ValueError("adaptive=True needs params (T_w = |w| + eta).")
    if params is not None and jax.tree.structure(params) != jax.tree.structure(tree):
        raise ValueError(
            f"{name} and params must have the same tree structure; got\n"
            f"  {name}: {jax.tree.structure(tree)}\n  params: {jax.tree.structure(params)}"
        )
    return select(params if params is not None else tree, mask, tree)


def _to_tree(sel: Selection, values: Sequence[jax.Array], like: Any) -> Any:
    """Selected values into a tree like ``like`` (zeros elsewhere), each leaf in its dtype."""
    leaves = [jnp.zeros_like(x) for x in jax.tree.leaves(like)]
    cast = [v.astype(leaves[i].dtype) for i, v in zip(sel.indices, values)]
    return jax.tree.unflatten(sel.treedef, sel.place(cast, leaves))


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
    zero perturbation, never NaN. Complex leaves take optax's convention
    (pass the conjugate of ``jax.grad``) and magnitudes in the norm.

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
      >>> perturbation = ascent_direction(g, 0.5)
      >>> print(perturbation["a"], perturbation["b"])
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
    sel = _selection_of(grads, params, adaptive, mask, "grads")
    if not sel.indices:
        return jax.tree.map(jnp.zeros_like, grads)
    xs = sel.take(grads)
    scale = adaptive_scale(sel.take(params), eta) if adaptive else None
    if scale is not None:
        xs = [t * x for t, x in zip(scale, xs)]
    units = dual_unit(xs, p, eps)
    if scale is not None:
        units = [t * d for t, d in zip(scale, units)]
    return _to_tree(sel, [rho * d for d in units], grads)


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
    sel = _selection_of(tree, params, adaptive, mask, "tree")
    if not sel.indices:
        return jax.tree.map(jnp.zeros_like, tree)
    xs = sel.take(tree)
    if adaptive:
        scale = adaptive_scale(sel.take(params), eta)
        inner = project([x / t for t, x in zip(scale, xs)], p, rho)
        xs = [t * d for t, d in zip(scale, inner)]
    else:
        xs = project(xs, p, rho)
    return _to_tree(sel, xs, tree)


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
    sel = _selection_of(like, params, adaptive, mask, "like")
    if not sel.indices:
        return jax.tree.map(jnp.zeros_like, like)
    units = random_unit(key, sel.take(like), p, sel.masks)
    if adaptive:
        units = [t * d for t, d in zip(adaptive_scale(sel.take(params), eta), units)]
    return _to_tree(sel, [rho * d for d in units], like)
