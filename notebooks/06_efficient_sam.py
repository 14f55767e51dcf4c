# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # SAM's gain at close to SGD's cost: the SAM family
#
# SAM pays a second gradient every step. A family of methods claims most of
# its gain for less, or more gain for the same; `sam_optax` has them under
# one contract (the options of `sam_optax.SAMOptions`, one state, the same
# diagnostics), each reproducing its authors' code (`tests/test_authors.py`):
#
# | factory | idea | gradients per step |
# |---|---|---|
# | `sam_optax.gsam(rho, alpha)` | SAM gradient minus α × the clean gradient's orthogonal part | 2 |
# | `sam_optax.looksam(rho, every, alpha)` | full SAM every k steps, the stored ascent direction reused in between | 1 + 1/k |
# | `sam_optax.msam(base, rho)` | the base optimizer's step on the gradient at $w - \rho\, m/\|m\|$, $m$ its own momentum | 1 |
# | `sam_optax.rst(rho, probability)` | SAM with probability $p$ | 1 + p |
# | `sam_optax.aesam(rho, threshold)` | SAM when $\|g\|^2$ is high against its running mean and variance | adaptive |
# | `sam_optax.fsam(rho, sigma)` | perturb along $g - \sigma m$, $m$ a running mean of gradients | 2 |
# | `sam_optax.vasso(rho, theta)` | perturb along $m$, a running mean of gradients (variance suppressed) | 2 |
# | `sam_optax.wsam(base, rho, gamma)` | the loss plus $\gamma/(1-\gamma)$ × SAM's sharpness, a decoupled step | 2 |
# | `sam_optax.esam(rho, beta, gamma)` | perturb a random subset of the tensors; descend on the examples whose loss rises most | 2 (+ a forward) |
# | `sam_optax.sampa(base, rho, lam)` | perturb along the last step's gradient at a second point $y_t$, so the two gradients can run at once on two device groups | 2 (1 in time, on 2 groups) |
#
# Every one records diagnostics in its state at no extra pass: the sharpness
# estimate $L(w+\epsilon) - L(w)$, $\|g\|$ and whether the step took the SAM
# branch; $\cos(g, g_{SAM})$ where the method holds both gradients anyway
# (GSAM, LookSAM, WSAM), or with `cosine=True` (it costs one params-sized
# buffer). This notebook runs them side by side on the program's
# default task (digits, 40% label noise) and plots accuracy against the cost
# measured in the same run: the Pareto figure.

# %%
import json
import os
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from IPython.display import Markdown
from IPython.display import display

import sam_optax
from sam_optax.program import compare
from sam_optax.program import configs

plt.rcParams.update({"font.size": 12, "axes.titlesize": 12, "legend.fontsize": 10})

# %% tags=["remove-cell"]
# The test suite runs a shrunk version of this notebook (not shown in the docs).
FAST = os.environ.get("SAM_OPTAX_FAST") == "1"

# %% [markdown]
# ## Diagnostics in a training loop
#
# Pass the clean loss as `value=` and read the scalars with `optax.tree.get`.
# Here RST on a small quadratic: `sam_step` says which steps were SAM's.

# %%
a = jnp.diag(jnp.array([10.0, 1.0]))
loss = lambda w: 0.5 * w @ a @ w + 0.1 * jnp.sum(w**4)  # noqa: E731
tx = optax.chain(sam_optax.rst(0.1, probability=0.5), optax.sgd(0.05))
w, state = jnp.array([1.0, 1.0]), None
state = tx.init(w)
for t in range(6):
    value, grads = jax.value_and_grad(loss)(w)
    updates, state = tx.update(grads, state, w, value_fn=loss, value=value)
    w = optax.apply_updates(w, updates)
    print(
        f"step {t}: sam_step={bool(optax.tree.get(state, 'sam_step'))!s:5}  "
        f"sharpness={float(optax.tree.get(state, 'sharpness')):.4f}  "
        f"|g|={float(optax.tree.get(state, 'grad_norm')):.3f}"
    )

# %% [markdown]
# ## The comparison
#
# `sam-optax compare --method sgd,sam,gsam,looksam,msam,rst,aesam,fsam,vasso,wsam,esam,sampa`
# does the same from the command line. Each method keeps the recipe's
# settings (ρ = 0.2, one perturbation per 8 examples; ESAM, which selects
# examples, and SAMPa, which perturbs along the last step's gradient, one per
# device batch) and its own defaults, those of its authors' code
# (`sam-optax compare --help` lists them); SGD is trained for the same number
# of epochs and for twice as many, the better reported.

# %%
methods = [
    "sam", "gsam", "looksam", "msam", "rst", "aesam", "fsam", "vasso", "wsam", "esam", "sampa",
]  # fmt: skip
seeds = [0, 1, 2, 3, 4]
base = configs.recipe("digits-noise")
if FAST:  # the tests' shrunk run
    methods, seeds, base = ["sam", "looksam", "msam"], [0], base.replace(epochs=3)
out = Path(tempfile.mkdtemp(prefix="efficient-"))
results = compare.compare(base, [0.0, base.rho], seeds, out, methods=methods)
display(Markdown(results["markdown"]))

# %%
fig, axes = plt.subplots(2, 1, figsize=(8, 9), sharey=True)
markers = "os^vD<>pP*hXd"
colors = plt.cm.tab20.colors  # 20 distinct colors: one per method
for i, row in enumerate(results["table"]):
    ci = 0.0 if np.isnan(row["ci95"]) else 100 * row["ci95"]
    for ax, x in zip(axes, (row["cost_vs_sgd"], row["gradients_per_step"])):
        ax.errorbar(
            x, 100 * row["mean"], yerr=ci, fmt=markers[i % len(markers)], capsize=3,
            color=colors[i % len(colors)], label=row["method"],
        )  # fmt: skip
axes[0].set(xlabel="epoch wall time / SGD's (measured in this run)", ylabel="test accuracy (%)")
axes[1].set(xlabel="gradient evaluations per step")
for ax in axes:
    ax.grid(alpha=0.3)
axes[0].legend(loc="lower right", ncols=2)
fig.suptitle("Accuracy against cost, digits with 40% label noise")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## What the diagnostics show over training
#
# Per epoch, averaged over the seeds: the sharpness estimate of the SAM
# steps, the cosine between the clean gradient and the gradient at the
# perturbed point (the methods that hold both), and the fraction of steps
# that took the SAM branch.


# %%
def curves(name: str, key: str) -> np.ndarray:
    runs = sorted((out / "runs").glob(f"{name}-rho*-seed*"))
    rows = [[json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()] for r in runs]
    values = np.array([[np.nan if row[key] is None else row[key] for row in rs] for rs in rows])
    finite = np.isfinite(values)  # NaN: not measured (the cosine where it is not free)
    counts = finite.sum(0)
    sums = np.where(finite, values, 0.0).sum(0)
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


fig, axes = plt.subplots(3, 1, figsize=(8, 11), sharex=True)
for i, name in enumerate(methods, start=1):  # the colors of the figure above (SGD is 0)
    epochs = np.arange(1, base.epochs + 1)
    for ax, key in zip(axes, ("sharpness", "cosine", "sam_fraction")):
        ax.plot(epochs, curves(name, key), label=compare.LABELS[name], color=colors[i])
axes[0].set(title="sharpness L(w+ε) − L(w) (SAM steps)")
axes[1].set(title="cos(g, g at the perturbed point)")
axes[2].set(title="fraction of SAM steps", xlabel="epoch")
axes[0].legend(ncols=3, fontsize=9)
for ax in axes:
    ax.grid(alpha=0.3)
plt.tight_layout()
plt.show()

# %% [markdown]
# Reading the figures: the switching methods (RST, AE-SAM) and LookSAM
# spend their second gradient on a fraction of the steps; MSAM never does.
# The cosine is drawn for the methods that hold both gradients anyway.
# SAMPa has no sharpness curve: its perturbed loss is taken on the previous
# batch, so it has no clean loss to be compared with. The
# table's last column is each method's share of SAM's accuracy gain over
# SGD.
