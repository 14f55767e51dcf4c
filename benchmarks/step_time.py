"""Cost of one SAM step against a hand-written step, optax.contrib.sam and SGD.

    python benchmarks/step_time.py [--repeats N]

Each step is a jitted train step of the benchmark CNN (batch 128, 32x32x3).
Runs are interleaved and medians reported; read the ratios, not the times.
"""

from __future__ import annotations

import argparse

import jax
import optax

import sam_optax

from _common import cnn_loss
from _common import init_cnn
from _common import interleaved_medians
from _common import make_batch
from _common import nbytes

LR, RHO = 0.1, 0.05


def build_steps(params, batch):
    base = lambda: optax.sgd(LR, momentum=0.9)  # noqa: E731
    steps = {}

    # 1. sam_optax: chain(sam, sgd).
    tx = optax.chain(sam_optax.sam(RHO), base())

    @jax.jit
    def sam_step(params, state, batch):
        loss_fn = lambda p: cnn_loss(p, batch)  # noqa: E731
        grads = jax.grad(loss_fn)(params)
        updates, state = tx.update(grads, state, params, value_fn=loss_fn)
        return optax.apply_updates(params, updates), state

    steps["sam_optax chain(sam, sgd)"] = (sam_step, tx.init(params))

    # 2. The paper's step written by hand: two gradients, one update.
    opt = base()

    @jax.jit
    def hand_step(params, state, batch):
        grads = jax.grad(cnn_loss)(params, batch)
        norm = optax.tree.norm(grads)
        perturbed = jax.tree.map(lambda w, g: w + RHO * g / (norm + 1e-12), params, grads)
        sam_grads = jax.grad(cnn_loss)(perturbed, batch)
        updates, state = opt.update(sam_grads, state, params)
        return optax.apply_updates(params, updates), state

    steps["hand-written SAM"] = (hand_step, opt.init(params))

    # 3. optax.contrib.sam in opaque mode.
    contrib = optax.contrib.sam(
        base(),
        optax.chain(optax.contrib.normalize(), optax.sgd(RHO)),
        opaque_mode=True,
    )

    @jax.jit
    def contrib_step(params, state, batch):
        grads = jax.grad(cnn_loss)(params, batch)
        grad_fn = lambda p, _: jax.grad(cnn_loss)(p, batch)  # noqa: E731
        updates, state = contrib.update(grads, state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), state

    steps["optax.contrib.sam (opaque)"] = (contrib_step, contrib.init(params))

    # 4. Plain SGD.
    @jax.jit
    def sgd_step(params, state, batch):
        grads = jax.grad(cnn_loss)(params, batch)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    steps["SGD"] = (sgd_step, opt.init(params))
    return steps


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    params = init_cnn(jax.random.key(0))
    batch = make_batch(jax.random.key(1))
    steps = build_steps(params, batch)
    fns = {
        name: (lambda s=step, st=state: s(params, st, batch))
        for name, (step, state) in steps.items()
    }
    med = interleaved_medians(fns, args.repeats)
    hand, sgd = med["hand-written SAM"], med["SGD"]
    print(
        f"device: {jax.devices()[0].device_kind}, params: {nbytes(params):,} bytes, "
        f"repeats: {args.repeats}"
    )
    print("| step | median ms | / hand-written | / SGD | optimizer state bytes |")
    print("|---|---:|---:|---:|---:|")
    for name, (_, state) in steps.items():
        print(
            f"| {name} | {med[name] * 1e3:.2f} | {med[name] / hand:.3f} | "
            f"{med[name] / sgd:.3f} | {nbytes(state):,} |"
        )


if __name__ == "__main__":
    main()
