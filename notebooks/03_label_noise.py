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
# # Robustness to label noise (the paper's Table 4, at small scale)
#
# The paper trains ResNet-32 on CIFAR-10 with 20-80% of the training labels
# flipped and finds SAM far more robust than SGD (Table 4). Here the same
# protocol on digits, through the `sam-optax` program's Python API
# (`sam_optax.program.compare`): for each noise rate, SGD (trained for the
# same number of epochs as SAM and for twice as many, the better reported) and
# SAM, several seeds, mean test accuracy with its 95% confidence interval.
#
# SAM's radius follows the paper's practice of lowering $\rho$ for the
# noisiest data (it uses 0.1, and 0.05 at 80%): here $\rho = 0.2$ up to 40%
# noise and 0.1 above, where $\rho = 0.2$ does not converge on every seed
# (a sweep over $\{0.05, 0.1, 0.2\}$ at 60% and 80%).

# %%
import os
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from sam_optax.program import compare
from sam_optax.program import configs

# SAM_OPTAX_FAST=1 is the test suite's shrunk run; the outputs shown are from the full run.
FAST = os.environ.get("SAM_OPTAX_FAST") == "1"
noise_rates = [0.2, 0.6] if FAST else [0.2, 0.4, 0.6, 0.8]
seeds = [0, 1] if FAST else [0, 1, 2]
base = configs.recipe("digits-noise")
if FAST:
    base = base.replace(epochs=4)
print(base)

# %%
out = Path(tempfile.mkdtemp(prefix="label-noise-"))
rho_for = {0.2: 0.2, 0.4: 0.2, 0.6: 0.1, 0.8: 0.1}
tables = {}
for rate in noise_rates:
    config = base.replace(label_noise=rate, rho=rho_for[rate])
    results = compare.compare(config, rhos=[0.0, config.rho], seeds=seeds, out=out / f"noise{rate}")
    tables[rate] = {row["method"]: row for row in results["table"]}

lines = ["| noise | ρ | SGD (best of E, 2E) | SAM | gain |", "|---:|---:|---:|---:|---:|"]
for rate, rows in tables.items():
    sgd, sam = rows["SGD"], rows["SAM"]
    lines.append(
        f"| {rate:.0%} | {rho_for[rate]:g} | {100 * sgd['mean']:.1f} ± {100 * sgd['ci95']:.1f} "
        f"| {100 * sam['mean']:.1f} ± {100 * sam['ci95']:.1f} | {100 * (sam['mean'] - sgd['mean']):+.1f} |"
    )
print("\n".join(lines))

# %%
fig, ax = plt.subplots(figsize=(6, 4))
for method, color in (("SGD", "tab:orange"), ("SAM", "tab:blue")):
    means = np.array([100 * tables[r][method]["mean"] for r in noise_rates])
    cis = np.array([100 * tables[r][method]["ci95"] for r in noise_rates])
    ax.errorbar(
        np.array(noise_rates) * 100, means, yerr=cis, fmt="o-", color=color, capsize=4, label=method
    )
ax.set(
    xlabel="labels flipped (%)",
    ylabel="test accuracy (%)",
    title="digits: SAM vs SGD under label noise",
)
ax.legend()
plt.show()

# %% [markdown]
# The gap widens with the noise, as in Table 4: SGD memorizes the flipped
# labels (its best is usually the shorter run), while SAM's flat-minimum
# seeking keeps the clean signal. Each run's directory under `out` holds its
# metrics, checkpoints and the recorded flipped indices; `sam-optax compare
# --label-noise 0.6` reproduces one row from the command line.
