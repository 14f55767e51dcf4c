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
# # SAM with Flax: BatchNorm and dropout done the paper's way
#
# A convolutional network with BatchNorm and dropout, trained with SAM on
# digits, first with Flax NNX and then with Linen. `sam_optax.flax` keeps the
# paper's semantics: both passes in training mode, the running statistics
# from the clean pass only (the perturbed pass's are dropped), the same
# dropout mask in both passes.

# %%
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from flax import nnx

import sam_optax
from sam_optax import flax as sam_flax
from sam_optax.program import input_pipeline

# SAM_OPTAX_FAST=1 is the test suite's shrunk run; the outputs shown are from the full run.
FAST = os.environ.get("SAM_OPTAX_FAST") == "1"
epochs = 1 if FAST else 8
data = input_pipeline.load("digits")
x_tr, y_tr, x_te, y_te = data.x_train, data.y_train, data.x_test, data.y_test
print(x_tr.shape, "->", x_te.shape)


def batches(epoch, size=64):
    order = np.random.default_rng(epoch).permutation(len(x_tr))
    return order[: len(order) // size * size].reshape(-1, size)


def xent(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


# %% [markdown]
# ## NNX
#
# `nnx.Optimizer.update(model, grads, **kwargs)` forwards `value_fn` to
# `tx.update`. `sam_flax.nnx_train_step` builds the closure from a snapshot of
# the model's non-parameter state taken before the clean pass (so the
# perturbed pass sees the same dropout RNG counter and updates a throw-away
# copy of the BatchNorm statistics).


# %%
class CNN(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 32, (3, 3), rngs=rngs)
        self.bn1 = nnx.BatchNorm(32, momentum=0.9, rngs=rngs)
        self.conv2 = nnx.Conv(32, 64, (3, 3), rngs=rngs)
        self.bn2 = nnx.BatchNorm(64, momentum=0.9, rngs=rngs)
        self.dropout = nnx.Dropout(0.3, rngs=rngs)
        self.head = nnx.Linear(64 * 2 * 2, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.max_pool(nnx.relu(self.bn1(self.conv1(x))), (2, 2), (2, 2))
        x = nnx.max_pool(nnx.relu(self.bn2(self.conv2(x))), (2, 2), (2, 2))
        return self.head(self.dropout(x.reshape(x.shape[0], -1)))


def nnx_loss(model, x, y):
    return xent(model(x), y)


model = CNN(nnx.Rngs(0, dropout=1))
optimizer = nnx.Optimizer(
    model, optax.chain(sam_optax.sam(0.05), optax.sgd(0.05, momentum=0.9)), wrt=nnx.Param
)
train_step = sam_flax.nnx_train_step(nnx_loss)

count_before = int(model.dropout.rngs.count[...])
stats_before = np.asarray(model.bn1.mean[...]).copy()
train_step(model, optimizer, x_tr[:64], y_tr[:64])
print(
    "dropout RNG counter advanced by",
    int(model.dropout.rngs.count[...]) - count_before,
    "(one clean pass)",
)
print("BatchNorm running mean moved:", not np.allclose(stats_before, model.bn1.mean[...]))


def nnx_test_accuracy(model):
    model.eval()  # dropout off, BatchNorm on its running statistics
    accuracy = float(jnp.mean(jnp.argmax(model(x_te), -1) == y_te))
    model.train()
    return accuracy


nnx_curve = []
for epoch in range(epochs):
    for idx in batches(epoch):
        loss = train_step(model, optimizer, x_tr[idx], y_tr[idx])
    nnx_curve.append(nnx_test_accuracy(model))
nnx_accuracy = nnx_curve[-1]
print(f"NNX: last batch loss {float(loss):.3f}, test accuracy {nnx_accuracy:.3f}")

# %% [markdown]
# Finetuning (appendix C.2) freezes BatchNorm: `sam_flax.freeze_batch_norm`
# makes every `nnx.BatchNorm` normalize with its running averages and update
# nothing.

# %%
sam_flax.freeze_batch_norm(model)
frozen_stats = np.asarray(model.bn2.var[...]).copy()
train_step(model, optimizer, x_tr[:64], y_tr[:64])
print("statistics unchanged while frozen:", np.array_equal(frozen_stats, model.bn2.var[...]))
_ = sam_flax.freeze_batch_norm(model, False)

# %% [markdown]
# ## Linen
#
# `TrainState.apply_gradients` would treat `value_fn` as a field to replace;
# `sam_flax.SAMTrainState` forwards it to `tx.update` and carries
# `batch_stats`. `linen_loss_fn` calls the model in training mode with the
# BatchNorm statistics mutable and the dropout key given.


# %%
class LinenCNN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        for channels in (32, 64):
            x = nn.Conv(channels, (3, 3))(x)
            x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
            x = nn.max_pool(x, (2, 2), (2, 2))
        x = nn.Dropout(0.3, deterministic=not train)(x.reshape(x.shape[0], -1))
        return nn.Dense(10)(x)


linen_model = LinenCNN()
variables = linen_model.init(jax.random.key(0), x_tr[:1], train=False)
state = sam_flax.SAMTrainState.create(
    apply_fn=linen_model.apply,
    params=variables["params"],
    batch_stats=variables["batch_stats"],
    tx=optax.chain(sam_optax.sam(0.05), optax.sgd(0.05, momentum=0.9)),
)
step = sam_flax.linen_train_step(sam_flax.linen_loss_fn(linen_model.apply, xent, train=True))


def linen_test_accuracy(state):
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    logits = linen_model.apply(variables, x_te, train=False)
    return float(jnp.mean(jnp.argmax(logits, -1) == y_te))


key = jax.random.key(2)
linen_curve = []
for epoch in range(epochs):
    for idx in batches(epoch):
        key, dropout_key = jax.random.split(key)
        state, loss = step(state, (x_tr[idx], y_tr[idx]), dropout_key)
    linen_curve.append(linen_test_accuracy(state))
linen_accuracy = linen_curve[-1]
print(
    f"Linen: {int(state.step)} steps, last batch loss {float(loss):.3f}, test accuracy {linen_accuracy:.3f}"
)

# %% [markdown]
# (BatchNorm momentum 0.9, as in the paper's JAX code: with flax's default
# 0.99 the running statistics of so short a run would still lean on their
# initial values.) For data parallelism, the same
# loss functions plug into `sam_optax.parallel.shard_map_step` with
# `has_aux=True` (see the README's "Using with Flax").

# %% [markdown]
# Test accuracy after each epoch, evaluated in inference mode (dropout off,
# BatchNorm on the running statistics the clean passes kept).

# %%
fig, ax = plt.subplots(figsize=(5, 3.2))
epochs_axis = np.arange(1, epochs + 1)
ax.plot(epochs_axis, nnx_curve, "o-", label="NNX")
ax.plot(epochs_axis, linen_curve, "s--", label="Linen")
ax.set_xlabel("epoch")
ax.set_ylabel("test accuracy")
ax.set_title("CNN with BatchNorm and dropout, SAM ρ = 0.05")
ax.legend()
plt.show()
