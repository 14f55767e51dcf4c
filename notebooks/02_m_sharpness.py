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
# # m-sharpness: one perturbation per m examples
#
# The paper trains on 8 accelerators and lets each one perturb with the
# gradient of its own share of the batch; only the SAM gradients are averaged
# (section 3.1). The number of examples per perturbation, $m$, then matters:
# smaller $m$ generalizes better (section 4.1, Figure 3 middle).
#
# Here, on 8 fake CPU devices: (1) the per-device step and the single-device
# grouping give the same update; (2) test error against $\rho$ for several
# $m$ on digits with 40% label noise (Figure 3 at small scale).

# %%
import jax

jax.config.update("jax_num_cpu_devices", 8)  # before any JAX computation

import os

import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import sam_optax
from sam_optax import parallel
from sam_optax.program import input_pipeline

# SAM_OPTAX_FAST=1 is the test suite's shrunk run; the outputs shown are from the full run.
FAST = os.environ.get("SAM_OPTAX_FAST") == "1"
print(jax.device_count(), "devices:", jax.devices()[0].platform)

# %%
data = input_pipeline.load("digits")
y_noisy, flipped = input_pipeline.symmetric_label_noise(data.y_train, 0.4, 10, seed=0)
x_tr = data.x_train.reshape(len(data.x_train), -1)
x_te = data.x_test.reshape(len(data.x_test), -1)
print(f"{len(x_tr)} training examples ({len(flipped)} labels flipped), {len(x_te)} test examples")


def init_mlp(key):
    k1, k2 = jax.random.split(key)
    return {
        "w1": jax.random.normal(k1, (64, 256)) * np.sqrt(2 / 64),
        "b1": jnp.zeros(256),
        "w2": jax.random.normal(k2, (256, 10)) * np.sqrt(2 / 256),
        "b2": jnp.zeros(10),
    }


def logits(p, x):
    return jax.nn.relu(x @ p["w1"] + p["b1"][None]) @ p["w2"] + p["b2"][None]


def loss(p, batch):
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(logits(p, x), y).mean()


# %% [markdown]
# ## 1. Eight devices = one device with eight groups
#
# A batch of 64 over 8 devices is 8 examples per device: with
# `sam(axis_name="data")` inside `parallel.shard_map_step`, each device
# perturbs with its own gradient. `parallel.grouped_step(group_size=8)` does
# the same on one device, with the 8 groups differentiated in one unrolled
# pass. In float64 the two updates agree to rounding:

# %%
with jax.enable_x64(True):
    params = jax.tree.map(lambda v: v.astype(jnp.float64), init_mlp(jax.random.key(0)))
    batch = (jnp.asarray(x_tr[:64], jnp.float64), jnp.asarray(y_noisy[:64]))

    mesh = jax.make_mesh((8,), ("data",))
    tx_dev = optax.chain(sam_optax.sam(0.1, axis_name="data"), optax.sgd(0.1))
    step_dev = parallel.shard_map_step(loss, tx_dev, mesh, donate=False)  # params reused below
    on_devices, _, _ = step_dev(
        parallel.replicate(params, mesh),
        parallel.replicate(tx_dev.init(params), mesh),
        parallel.shard_batch(batch, mesh),
    )

    tx_one = optax.chain(sam_optax.sam(0.1), optax.sgd(0.1))
    grouped, _, _ = parallel.grouped_step(loss, tx_one, group_size=8, donate=False)(
        params, tx_one.init(params), batch
    )
    synced, _, _ = parallel.grouped_step(loss, tx_one, donate=False)(
        params, tx_one.init(params), batch
    )

    def max_diff(a, b):
        return max(
            float(np.max(np.abs(np.asarray(u) - np.asarray(v))))
            for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
        )

    print(
        f"8 devices vs 1 device with 8 groups:     max |difference| = {max_diff(on_devices, grouped):.2e}"
    )
    print(
        f"8 devices vs one perturbation for all 64: max |difference| = {max_diff(on_devices, synced):.2e}"
    )

# %% [markdown]
# The first difference is rounding; the second is the effect of $m$ itself.
#
# ## 2. Test error against $\rho$ for several $m$
#
# Batch 64, an MLP, 40% of the training labels flipped; $m = 64$ is one
# perturbation per batch, $m = 4$ sixteen. Each point is a mean over seeds.


# %%
def train(rho, m, seed, epochs):
    tx = optax.chain(
        sam_optax.sam(rho),
        optax.add_decayed_weights(5e-4),
        optax.sgd(optax.cosine_decay_schedule(0.05, epochs * (len(x_tr) // 64)), momentum=0.9),
    )
    step = parallel.grouped_step(loss, tx, group_size=None if m >= 64 else m)
    params = init_mlp(jax.random.key(seed))
    state = tx.init(params)
    for epoch in range(epochs):
        order = np.random.default_rng([seed, epoch]).permutation(len(x_tr))
        for idx in order[: len(order) // 64 * 64].reshape(-1, 64):
            params, state, _ = step(params, state, (x_tr[idx], y_noisy[idx]))
    return 1.0 - float(jnp.mean(jnp.argmax(logits(params, x_te), -1) == data.y_test))


rhos = [0.0, 0.1, 0.2] if FAST else [0.0, 0.02, 0.05, 0.1, 0.2, 0.3]
ms = [4, 64] if FAST else [4, 8, 16, 64]
seeds = [0] if FAST else [0, 1, 2]
epochs = 5 if FAST else 40
errors = {m: [np.mean([train(r, m, s, epochs) for s in seeds]) for r in rhos] for m in ms}
for m, errs in errors.items():
    print(
        f"m = {m:3d}: "
        + ", ".join(f"rho {r:g}: {100 * e:.1f}%" for r, e in zip(rhos, errs, strict=True))
    )

# %%
fig, ax = plt.subplots(figsize=(6, 4))
for m, errs in errors.items():
    ax.plot(rhos, 100 * np.asarray(errs), "o-", label=f"m = {m}")
ax.set(xlabel="ρ", ylabel="test error (%)", title="digits, 40% label noise: smaller m, lower error")
ax.legend()
plt.show()

# %% [markdown]
# As in the paper's Figure 3 (middle), smaller groups generalize better: with
# a moderate $\rho$ the test error falls as $m$ shrinks, and $m = 64$ (one
# perturbation per batch) needs a larger $\rho$ to approach the small-$m$
# errors. Since the perturbation of a small group follows a noisier gradient,
# too large a $\rho$ hurts small $m$ first. The `sam-optax` program's default
# (`--m 8`, $\rho = 0.2$) comes from this kind of sweep.
