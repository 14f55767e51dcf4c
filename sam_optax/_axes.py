"""Mapped axes: the names of ``jax.shard_map`` / ``jax.pmap`` / ``jax.vmap`` axes.

Everything the core, :mod:`sam_optax.parallel` and the analysis tools need to
know about the data-parallel axes they run under lives here: normalizing an
``axis_name`` argument, checking that it is bound, which of its names are
``shard_map`` (manual) axes, which axes a value varies over, making values
varying before differentiation, averaging over axes and a device index to
fold PRNG keys with.

The one JAX internal read here is the varying-axes type of an abstract value
(:func:`varying_axes`); it goes through that one function so that a JAX
release that moves it breaks one place, loudly.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import jax

AxisName = Hashable | tuple[Hashable, ...] | None


def axis_names(axis_name: AxisName) -> tuple[Hashable, ...]:
    """``None`` -> ``()``, a name -> ``(name,)``, a tuple stays a tuple."""
    if axis_name is None:
        return ()
    return tuple(axis_name) if isinstance(axis_name, tuple) else (axis_name,)


def check_bound(names: tuple[Hashable, ...], owner: str = "sam") -> None:
    """Raises a ``ValueError`` naming the first of ``names`` that no mapped context binds."""
    for name in names:
        try:
            jax.lax.axis_size(name)
        except NameError:
            mesh = jax.sharding.get_abstract_mesh()
            manual = tuple(mesh.manual_axes)
            if name in mesh.axis_names and manual:
                raise ValueError(
                    f"{owner}(axis_name={name!r}): the mesh has axis {name!r}, but this "
                    f"step maps only {manual}, so {name!r} is left to XLA here. axis_name "
                    "names the axis the batch is split over, whose devices each perturb with "
                    "their own gradient"
                    f"{': pass axis_name=' + repr(manual[0]) if len(manual) == 1 else ''}."
                ) from None
            raise ValueError(
                f"{owner}(axis_name={name!r}) is used where no mapped axis {name!r} "
                "exists. Call tx.update inside jax.shard_map over a mesh with "
                f"that axis, jax.pmap(..., axis_name={name!r}) or "
                f"jax.vmap(..., axis_name={name!r}); on one device leave "
                "axis_name=None."
            ) from None


def manual_axes(names: tuple[Hashable, ...]) -> tuple[Hashable, ...]:
    """The names among ``names`` that are ``shard_map`` (manual) mesh axes here."""
    manual = set(jax.sharding.get_abstract_mesh().manual_axes)
    return tuple(n for n in names if n in manual)


def varying_axes(x: Any) -> frozenset:
    """The mesh axes a value varies over inside ``shard_map`` (empty outside).

    Read from the value's abstract type, ``jax.typeof(x).mat.varying`` (jax
    0.10; earlier releases called it ``.vma``). JAX has no public accessor
    for it; if a release moves it, this raises a ``RuntimeError`` naming the
    JAX version rather than silently treating every value as replicated
    (which would hide the ``shard_map`` gradient-sum trap).
    """
    aval = jax.typeof(x)
    mat = getattr(aval, "mat", None)
    vma = getattr(mat, "varying", None) if mat is not None else getattr(aval, "vma", None)
    if vma is None:
        raise RuntimeError(
            "sam_optax reads the varying mesh axes of a value from "
            f"jax.typeof(x).mat.varying, which jax {jax.__version__} does not provide "
            f"(abstract type {type(aval).__name__}). Please report this with your JAX version."
        )
    return frozenset(vma)


def vma_checked(manual: tuple[Hashable, ...]) -> bool:
    """Whether ``shard_map`` tracks varying axes here (``check_vma=True``)."""
    return bool(manual) and manual[0] in varying_axes(jax.lax.axis_index(manual[0]))


def as_varying(tree: Any, manual: tuple[Hashable, ...]) -> Any:
    """Marks every leaf as varying over the ``shard_map`` axes ``manual``.

    Inside ``jax.shard_map`` the gradient with respect to a replicated
    (invariant) value comes back already summed over the axis (the transpose
    of the implicit broadcast); differentiating with respect to a varying
    copy keeps each device's own gradient.
    """
    if not manual:
        return tree

    def cast(x: Any) -> Any:
        missing = tuple(n for n in manual if n not in varying_axes(x))
        return jax.lax.pcast(x, missing, to="varying") if missing else x

    return jax.tree.map(cast, tree)


def pmean(tree: Any, names: tuple[Hashable, ...]) -> Any:
    """The mean over the axes ``names`` (the identity for none)."""
    return jax.lax.pmean(tree, names) if names else tree


def fold_in_axis_index(key: jax.Array, names: tuple[Hashable, ...]) -> jax.Array:
    """Folds the device's index along each of ``names`` into a PRNG key."""
    for name in names:
        key = jax.random.fold_in(key, jax.lax.axis_index(name))
    return key
