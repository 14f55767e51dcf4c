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
# # Quickstart: SAM as an optax transformation
#
# Sharpness-Aware Minimization (Foret et al., ICLR 2021) replaces the gradient
# at $w$ by the gradient at the first-order worst point of a $\rho$-ball around
# it, $w + \hat\epsilon(w)$ with $\hat\epsilon = \rho\, g / \|g\|_2$. In
# `sam_optax` that is one transformation at the head of an optax chain; the
# loss closure is handed to `update` as `value_fn`.
#
# This notebook: (1) a 2-D loss with a sharp and a flat minimum, SGD and SAM
# from the same start; (2) SAM on scikit-learn's digits with noisy labels;
# (3) a tour of the options of `sam`.

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import sam_optax

print("jax", jax.__version__)

# %% tags=["remove-cell"]
# The test suite runs a shrunk version of this notebook (not shown in the docs).
import os

FAST = os.environ.get("SAM_OPTAX_FAST") == "1"

# %% [markdown]
# ## 1. A sharp and a flat minimum
#
# A valley along $x$ with two minima of the same height, at $(-1, 0)$ and
# $(2, 0)$. Across the valley the curvature is 88 at the first and 2.8 at the
# second. Both optimizers start in the basin of the sharp one.


# %%
def loss_2d(w):
    x, y = w[0], w[1]
    valley = 0.02 * (x + 1.0) ** 2 * (x - 2.0) ** 2
    curvature = 1.0 + 99.0 * jax.nn.sigmoid(-2.0 * x)
    return valley + 0.5 * curvature * y**2


def trajectory(tx, w0, steps):
    @jax.jit
    def step(w, state):
        g = jax.grad(loss_2d)(w)
        updates, state = tx.update(g, state, w, value_fn=loss_2d)
        return optax.apply_updates(w, updates), state

    w, state, path = w0, tx.init(w0), [w0]
    for _ in range(steps):
        w, state = step(w, state)
        path.append(w)
    return np.asarray(path)


w0 = jnp.array([-0.9, 1.0])
steps = 1500 if FAST else 3000
paths = {
    "SGD": trajectory(optax.sgd(0.01), w0, steps),
    "SAM (rho=0.2)": trajectory(optax.chain(sam_optax.sam(0.2), optax.sgd(0.01)), w0, steps),
}
for name, path in paths.items():
    lam = float(jnp.linalg.eigvalsh(jax.hessian(loss_2d)(jnp.asarray(path[-1])))[-1])
    print(
        f"{name:14s} ends at ({path[-1][0]:+.3f}, {path[-1][1]:+.3f}), top Hessian eigenvalue {lam:.2f}"
    )

# %%
xs, ys = np.meshgrid(np.linspace(-1.6, 2.6, 300), np.linspace(-1.1, 1.1, 200))
zs = jax.vmap(jax.vmap(loss_2d))(jnp.stack([xs, ys], -1))
fig, ax = plt.subplots(figsize=(8, 4))
ax.contour(xs, ys, np.log1p(np.asarray(zs)), levels=25, cmap="viridis", linewidths=0.7)
for (name, path), color in zip(paths.items(), ["tab:orange", "tab:blue"], strict=True):
    ax.plot(path[:, 0], path[:, 1], color=color, lw=1.2, label=name)
    ax.plot(*path[-1], "o", color=color)
ax.plot(*w0, "k*", ms=10, label="start")
ax.set(xlabel="x", ylabel="y", title="SGD settles in the sharp minimum, SAM drifts to the flat one")
ax.legend(loc="upper right")
plt.show()

# %% [markdown]
# SAM's step reads the gradient a distance $\rho$ up the walls of the sharp
# valley, where the curvature term pushes $x$ toward the flatter side: the
# effective objective is $\max_{\|\epsilon\|\le\rho} L(w+\epsilon)$.
#
# ## 2. Digits with 40% noisy labels
#
# The same chain on a real (small) problem. `tx.update` receives the gradient
# at `params` (the first backward pass) and the closure; `sam` does the
# second pass. One step costs two gradients.

# %%
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

x, y = load_digits(return_X_y=True)
x_tr, x_te, y_tr, y_te = train_test_split(
    (x / 16).astype(np.float32), y, test_size=0.25, random_state=0, stratify=y
)
rng = np.random.default_rng(0)
flip = rng.random(len(y_tr)) < 0.4
y_noisy = np.where(flip, (y_tr + rng.integers(1, 10, len(y_tr))) % 10, y_tr)


def init_mlp(key):
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "w1": jax.random.normal(k1, (64, 256)) * np.sqrt(2 / 64),
        "b1": jnp.zeros(256),
        "w2": jax.random.normal(k2, (256, 256)) * np.sqrt(2 / 256),
        "b2": jnp.zeros(256),
        "w3": jax.random.normal(k3, (256, 10)) * np.sqrt(2 / 256),
        "b3": jnp.zeros(10),
    }


def logits(p, x):
    h = jax.nn.relu(x @ p["w1"] + p["b1"][None])
    h = jax.nn.relu(h @ p["w2"] + p["b2"][None])
    return h @ p["w3"] + p["b3"][None]


def loss(p, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits(p, x), y).mean()


def train(tx, epochs, batch=64, seed=0):
    params = init_mlp(jax.random.key(seed))
    state = tx.init(params)

    @jax.jit
    def step(params, state, xb, yb):
        loss_fn = lambda p: loss(p, xb, yb)  # noqa: E731
        grads = jax.grad(loss_fn)(params)
        updates, state = tx.update(grads, state, params, value_fn=loss_fn)
        return optax.apply_updates(params, updates), state

    for epoch in range(epochs):
        order = np.random.default_rng([seed, epoch]).permutation(len(x_tr))
        for idx in order[: len(order) // batch * batch].reshape(-1, batch):
            params, state = step(params, state, x_tr[idx], y_noisy[idx])
    return float(jnp.mean(jnp.argmax(logits(params, x_te), -1) == y_te))


epochs = 8 if FAST else 40
steps = epochs * (len(x_tr) // 64)
lr = optax.cosine_decay_schedule(0.05, steps)
results = {
    "SGD": train(optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(lr, momentum=0.9)), epochs),
    "SAM rho=0.1": train(
        optax.chain(
            sam_optax.sam(0.1), optax.add_decayed_weights(5e-4), optax.sgd(lr, momentum=0.9)
        ),
        epochs,
    ),
}
for name, acc in results.items():
    print(f"{name:12s} test accuracy {acc:.3f}")

# %% [markdown]
# (SAM here perturbs once per batch of 64. The `sam-optax compare` program
# and notebook 02 go further with one perturbation per 8 examples, the
# paper's m-sharpness, which helps more.)
#
# ## 3. A tour of the options
#
# Every variant the paper studies is an argument of the same transformation.
# First the ascent direction itself, a pure function: eq. (2) for several
# $p$, and the adaptive (ASAM) form.

# %%
g = {"w": jnp.array([3.0, -1.0, 0.5]), "b": jnp.array([0.2])}
params = {"w": jnp.array([1.0, 10.0, 0.1]), "b": jnp.array([0.0])}
for kwargs in ({}, {"norm": 3.0}, {"norm": float("inf")}, {"adaptive": True, "params": params}):
    eps = sam_optax.ascent_direction(g, 0.1, **kwargs)
    label = ", ".join(f"{k}={v}" for k, v in kwargs.items() if k != "params") or "norm=2"
    print(f"{label:15s} eps_w = {np.round(eps['w'], 4)}, eps_b = {np.round(eps['b'], 4)}")

# %% [markdown]
# ASAM scales the ball by $|w| + \eta$, so the large weight (10.0) gets most of
# the perturbation. Now the options of `sam` on one problem, each giving the
# update of one step of `chain(sam(...), sgd(1.0))`:

# %%
p0 = init_mlp(jax.random.key(1))
xb, yb = x_tr[:64], y_noisy[:64]
loss_fn = lambda p: loss(p, xb, yb)  # noqa: E731
g0 = jax.grad(loss_fn)(p0)
variants = {
    "sam(0.05)": sam_optax.sam(0.05),
    "p = inf": sam_optax.sam(0.05, norm=float("inf")),
    "adaptive (ASAM)": sam_optax.sam(0.5, adaptive=True),
    "3 ascent steps": sam_optax.sam(0.05, ascent_steps=3),
    "second order": sam_optax.sam(0.05, second_order=True),
    "random direction": sam_optax.sam(0.05, direction="random", seed=0),
    "mask: weights only": sam_optax.sam(0.05, mask=lambda p: {k: k.startswith("w") for k in p}),
}
base = float(loss_fn(p0))
for name, tx in variants.items():
    out, _ = tx.update(g0, tx.init(p0), p0, value_fn=loss_fn)
    cos = optax.tree.vdot(out, g0) / (optax.tree.norm(out) * optax.tree.norm(g0))
    after = float(loss_fn(optax.apply_updates(p0, jax.tree.map(lambda u: -0.05 * u, out))))
    print(
        f"{name:20s} cos(g_SAM, g) = {float(cos):.4f}   loss after a 0.05 step {after:.4f} (from {base:.4f})"
    )

# %% [markdown]
# `p = inf` with the same $\rho$ is a much larger ball (each of the $n$
# weights moves by $\rho$, so $\rho\sqrt n$ in the L2 norm), hence its
# different gradient; the random direction of norm $\rho$ barely changes the
# gradient at all, which is why it helps far less than the adversarial one
# (appendix C.5).
#
# **Schedules and `inject_hyperparams`.** `rho` may be an optax schedule of
# SAM's own step count, and `optax.inject_hyperparams(sam_optax.sam)` exposes
# it in the state so it can be changed between jitted steps. The options
# (`norm`, `ascent_steps`, `mask`, ...) stay static: only `rho` is injected.

# %%
warmup = optax.linear_schedule(0.0, 0.05, transition_steps=3)
tx = sam_optax.sam(warmup)
state = tx.init(p0)
for t in range(5):
    out, state = tx.update(g0, state, p0, value_fn=loss_fn)
    delta = optax.tree.norm(jax.tree.map(jnp.subtract, out, g0))
    print(f"step {t}: rho = {float(warmup(t)):.4f}, |g_SAM - g| = {float(delta):.4f}")

injected = optax.inject_hyperparams(sam_optax.sam)(rho=0.05, norm=2.0)
state = injected.init(p0)
update = jax.jit(lambda g, s, p: injected.update(g, s, p, value_fn=loss_fn))
for rho in (0.05, 0.0, 0.2):
    state.hyperparams["rho"] = jnp.asarray(rho)
    out, state = update(g0, state, p0)
    print(
        f"rho set to {rho}: |g_SAM - g| = {float(optax.tree.norm(jax.tree.map(jnp.subtract, out, g0))):.4f}"
    )

# %% [markdown]
# With `rho = 0` SAM hands on the incoming gradient unchanged, so the chain is
# exactly its base optimizer (a test checks this bit for bit).
