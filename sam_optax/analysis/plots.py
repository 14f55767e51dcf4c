"""Plotting helpers (matplotlib, part of the ``program`` extra): curve, contour, spectrum."""

from __future__ import annotations

from typing import Any

import numpy as np


def _axes(ax: Any):
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(5, 3.5))[1]


def plot_landscape_1d(alphas, losses, *, ax: Any = None, label: str | None = None, **kwargs: Any):
    """The loss along one direction; returns the axes."""
    ax = _axes(ax)
    ax.plot(np.asarray(alphas), np.asarray(losses), label=label, **kwargs)
    ax.set_xlabel("α (filter-normalized direction)")
    ax.set_ylabel("loss")
    if label:
        ax.legend()
    return ax


def plot_landscape_2d(alphas, betas, losses, *, ax: Any = None, levels: int = 20, **kwargs: Any):
    """Contours of the loss over a plane; returns the axes."""
    ax = _axes(ax)
    cs = ax.contour(
        np.asarray(alphas), np.asarray(betas), np.asarray(losses).T, levels=levels, **kwargs
    )
    # Every other level labelled, at most five: labels on every contour crowd the corners.
    labelled = cs.levels[:: max(1, -(-len(cs.levels) // 5))]
    ax.clabel(cs, labelled, inline=True, fontsize=9, fmt="%.2f")
    ax.set_xlabel("α")
    ax.set_ylabel("β")
    ax.set_aspect("equal")
    return ax


def plot_spectrum(
    grid,
    density,
    *,
    ax: Any = None,
    eigenvalues=None,
    log: bool = True,
    label: str | None = None,
    **kwargs: Any,
):
    """The spectral density (log scale by default), with top eigenvalues marked; returns the axes."""
    ax = _axes(ax)
    density = np.asarray(density)
    ax.plot(np.asarray(grid), np.maximum(density, 1e-12) if log else density, label=label, **kwargs)
    if log:
        ax.set_yscale("log")
        ax.set_ylim(bottom=max(1e-6, density[density > 0].min() if np.any(density > 0) else 1e-6))
    for lam in [] if eigenvalues is None else np.asarray(eigenvalues):
        ax.axvline(float(lam), color="gray", lw=0.6, ls=":")
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    if label:
        ax.legend()
    return ax
