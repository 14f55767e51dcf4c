"""Batches and groups: one group is m examples that share one perturbation.

The paper's m-sharpness (section 4.1) gives each group of m examples its own
perturbation. A batch is a pytree whose leaves share their leading (example)
axis; it is split over devices first, then each device's share into
consecutive groups of m. These helpers are the one place that arithmetic and
its error messages live; the core, :mod:`sam_optax.parallel`, the analysis
tools and the benchmarks use them alike.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def batch_size(batch: Any) -> int:
    """The leading size shared by every leaf of ``batch`` (``ValueError`` if they differ)."""
    sizes = {int(np.shape(x)[0]) for x in jax.tree.leaves(batch)}
    if len(sizes) != 1:
        raise ValueError(
            f"every leaf of batch must have the same leading size, got {sorted(sizes)}."
        )
    return sizes.pop()


def check_group_size(group_size: int | None) -> None:
    """``group_size`` is ``None`` (the whole share) or a positive int."""
    if group_size is not None and (
        isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1
    ):
        raise ValueError(
            f"group_size must be a positive int or None, got group_size={group_size!r}."
        )


def groups_per_shard(shard_size: int, group_size: int | None, n_shards: int = 1) -> int:
    """How many groups of ``group_size`` one shard of ``shard_size`` examples holds.

    ``n_shards`` (the number of devices) only enters the error message.
    """
    if group_size is None:
        return 1
    if shard_size % group_size:
        raise ValueError(
            f"batch of {shard_size * n_shards} examples does not split into "
            f"{n_shards} device(s) x groups of group_size={group_size}: each "
            f"device gets {shard_size}, which is not a multiple of {group_size}."
        )
    return shard_size // group_size


def shard_size(batch: Any, n_shards: int, axis_name: Any = None) -> int:
    """Examples per device when ``batch`` splits evenly over ``n_shards`` devices."""
    size = batch_size(batch)
    if size % n_shards:
        where = f" of axis {axis_name!r}" if axis_name is not None else ""
        raise ValueError(
            f"batch of {size} examples does not split over the {n_shards} devices{where}."
        )
    return size // n_shards


def split_groups(batch: Any, n_groups: int) -> list[Any]:
    """Splits the leading axis of every leaf into ``n_groups`` equal consecutive parts."""
    if n_groups == 1:
        return [batch]
    m = batch_size(batch) // n_groups
    return [jax.tree.map(lambda x, i=i: x[i * m : (i + 1) * m], batch) for i in range(n_groups)]


def stack_groups(batch: Any, group_size: int) -> Any:
    """Reshapes every leaf ``(n, ...)`` to ``(n // group_size, group_size, ...)``."""
    n = batch_size(batch)
    if group_size < 1 or n % group_size:
        raise ValueError(f"m={group_size} must divide the batch of {n} examples.")
    return jax.tree.map(lambda x: x.reshape(n // group_size, group_size, *x.shape[1:]), batch)
