"""SAM vs SGD on scikit-learn's digits with a plain-JAX MLP: the smallest complete example.

    python examples/digits_mlp.py

Trains the same MLP from the same start with ``optax.sgd`` and with
``optax.chain(sam_optax.sam(rho), optax.sgd)``, on digits with 40% of the
training labels flipped (the paper's label-noise setting, section 3.3), and
prints both test accuracies. No download: the data ships with scikit-learn.
"""

from __future__ import annotations

import argparse
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import sam_optax


def load(noise: float, seed: int):
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
    rng = np.random.default_rng(seed)
    flip = rng.random(len(y_tr)) < noise
    y_noisy = np.where(flip, (y_tr + rng.integers(1, 10, len(y_tr))) % 10, y_tr)
    return x_tr, y_noisy, x_te, y_te


def init_mlp(key, sizes=(64, 256, 256, 10)):
    params = []
    for k, (m, n) in zip(jax.random.split(key, len(sizes) - 1), itertools.pairwise(sizes)):
        params.append({"w": jax.random.normal(k, (m, n)) * np.sqrt(2.0 / m), "b": jnp.zeros(n)})
    return params


def apply_mlp(params, x):
    for layer in params[:-1]:
        x = jax.nn.relu(x @ layer["w"] + layer["b"][None, :])
    return x @ params[-1]["w"] + params[-1]["b"][None, :]


def loss(params, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(apply_mlp(params, x), y).mean()


def train(tx, params, data, epochs, batch, seed):
    x_tr, y_tr, x_te, y_te = data
    state = tx.init(params)

    @jax.jit
    def step(params, state, x, y):
        loss_fn = lambda p: loss(p, x, y)  # noqa: E731
        grads = jax.grad(loss_fn)(params)
        updates, state = tx.update(grads, state, params, value_fn=loss_fn)
        return optax.apply_updates(params, updates), state

    rng = np.random.default_rng(seed)
    n = len(x_tr) // batch * batch
    for _ in range(epochs):
        order = rng.permutation(len(x_tr))[:n].reshape(-1, batch)
        for idx in order:
            params, state = step(params, state, x_tr[idx], y_tr[idx])
    return float(jnp.mean(jnp.argmax(apply_mlp(params, x_te), -1) == y_te))


def main(argv=None):
    parser = argparse.ArgumentParser(description="SAM vs SGD on digits with 40% label noise.")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--rho", type=float, default=0.1)
    parser.add_argument("--noise", type=float, default=0.4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    data = load(args.noise, args.seed)
    params = init_mlp(jax.random.key(args.seed))
    steps = args.epochs * (len(data[0]) // 32)
    lr = optax.cosine_decay_schedule(0.05, steps)
    sgd = optax.sgd(lr, momentum=0.9)
    sam = optax.chain(sam_optax.sam(args.rho), optax.sgd(lr, momentum=0.9))
    acc_sgd = train(sgd, params, data, args.epochs, 32, args.seed)
    acc_sam = train(sam, params, data, args.epochs, 32, args.seed)
    print(f"label noise {args.noise:.0%}, {args.epochs} epochs, rho={args.rho}")
    print(f"  SGD test accuracy: {acc_sgd:.3f}")
    print(f"  SAM test accuracy: {acc_sam:.3f}")


if __name__ == "__main__":
    main()
