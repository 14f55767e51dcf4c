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
# # Sharpness analysis: Hessian spectra, landscapes, ascent sharpness
#
# Section 4.2 of the paper shows that SAM converges to minima of low
# curvature: a smaller $\lambda_{max}$ and a smaller bulk ratio
# $\lambda_{max}/\lambda_5$. Figure 1 shows the loss landscapes, and
# Table 11 the sharpness estimated with several steps of projected ascent.
# Here all three for two MLPs trained on digits (40% label noise) from the
# same start, one with SGD and one with SAM, using `sam_optax.analysis`.

# %%
import os
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

from sam_optax import analysis
from sam_optax.analysis import plots
from sam_optax.program import configs
from sam_optax.program import input_pipeline
from sam_optax.program import models
from sam_optax.program import train
from sam_optax.program.rundir import restore_final

# SAM_OPTAX_FAST=1 is the test suite's shrunk run; the outputs shown are from the full run.
FAST = os.environ.get("SAM_OPTAX_FAST") == "1"
epochs = 4 if FAST else 20
out = Path(tempfile.mkdtemp(prefix="sharpness-"))
runs = {}
for name, rho, m in (("SGD", 0.0, None), ("SAM", 0.2, 8)):
    config = configs.recipe("digits-noise").replace(epochs=epochs, rho=rho, m=m)
    summary = train.train_and_evaluate(config, out / name)
    runs[name] = restore_final(out / name)["params"]
    print(f"{name}: test accuracy {summary['test_accuracy']:.3f}")

# %% [markdown]
# The training loss the optimizers saw, on 512 training examples (with their
# noisy labels), as a function of the weights:

# %%
data = input_pipeline.load("digits")
y_noisy, _ = input_pipeline.symmetric_label_noise(data.y_train, 0.4, 10, seed=0)
x, y = jnp.asarray(data.x_train[:512]), jnp.asarray(y_noisy[:512])
model = models.create_model("mlp", 10)


def loss_fn(params):
    return optax.softmax_cross_entropy_with_integer_labels(
        model.apply({"params": params}, x, train=False), y
    ).mean()


iterations = 20 if FAST else 60
stats = {}
for name, params in runs.items():
    lams = analysis.hessian_top_eigenvalues(loss_fn, params, k=5, num_iterations=iterations)
    stats[name] = lams
    print(
        f"{name}: loss {float(loss_fn(params)):.3f}, top-5 eigenvalues {np.round(np.asarray(lams), 3)}, "
        f"lambda_max/lambda_5 = {float(lams[0] / lams[4]):.2f}"
    )

# %% [markdown]
# ## Hessian spectral density
#
# Stochastic Lanczos quadrature (Ghorbani et al., 2019), the method behind the
# paper's Figure 3 (left): almost all the mass sits near zero; the outliers
# are what sharpness is about.

# %%
fig, ax = plt.subplots(figsize=(7, 4))
for name, params in runs.items():
    grid, density, _ = analysis.hessian_spectral_density(
        loss_fn, params, num_iterations=iterations, num_draws=2 if FAST else 4
    )
    plots.plot_spectrum(grid, density, ax=ax, label=f"{name}: λ_max = {float(stats[name][0]):.2f}")
ax.set_title("Hessian eigenvalue density (log scale)")
plt.show()

# %% [markdown]
# ## Filter-normalized loss landscapes (Figure 1)
#
# Random directions rescaled filter by filter to the norms of the weights
# (Li et al., 2017), so that the two networks are comparable.

# %%
points = 11 if FAST else 41
fig, axes = plt.subplots(1, 3, figsize=(15, 4))
for name, params in runs.items():
    alphas, losses = analysis.loss_landscape_1d(
        loss_fn, params, alphas=jnp.linspace(-1, 1, points), key=jax.random.key(0)
    )
    plots.plot_landscape_1d(alphas, losses, ax=axes[0], label=name)
axes[0].set_title("1-D landscape")
grid_points = 7 if FAST else 21
surfaces = {
    name: analysis.loss_landscape_2d(
        loss_fn,
        params,
        alphas=jnp.linspace(-1, 1, grid_points),
        betas=jnp.linspace(-1, 1, grid_points),
        key=jax.random.key(1),
    )
    for name, params in runs.items()
}
all_z = np.concatenate([np.asarray(z).ravel() for _, _, z in surfaces.values()])
levels = np.linspace(all_z.min(), np.quantile(all_z, 0.95), 12)  # the same contours on both
for ax, (name, (a, b, z)) in zip(axes[1:], surfaces.items(), strict=True):
    plots.plot_landscape_2d(a, b, z, ax=ax, levels=levels)
    ax.set_title(f"2-D landscape: {name} (shared contour levels)")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Ascent sharpness against the number of steps (Table 11's column)
#
# $\max_{\|\epsilon\|\le\rho} L(w+\epsilon) - L(w)$ estimated with $k$ steps
# of projected gradient ascent (appendix C.6). More steps find a higher
# loss; the SAM model stays flatter at every $k$.

# %%
steps = [1, 2, 3, 5]
rho = 0.05
sharp = {
    name: [float(analysis.sharpness(loss_fn, params, rho, k)) for k in steps]
    for name, params in runs.items()
}
print("| steps | " + " | ".join(sharp) + " |")
print("|---:|" + "---:|" * len(sharp))
for i, k in enumerate(steps):
    print(f"| {k} | " + " | ".join(f"{sharp[name][i]:.4f}" for name in sharp) + " |")
