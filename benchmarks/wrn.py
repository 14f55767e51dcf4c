"""A WRN-16-8 train step on CIFAR-shaped synthetic data: images per second, SAM against SGD.

    python benchmarks/wrn.py [--batch 128] [--repeats 10] [--dtype float32|bfloat16]

The program's WideResNet (16 layers, width 8, BatchNorm, 11M parameters) in
Flax Linen, one jitted step on one device: SGD (momentum) and
``chain(sam, sgd)`` through ``sam_optax.flax.linen_train_step`` (BatchNorm
statistics from the clean pass), interleaved, medians. Written to be run
unchanged on a GPU; on a CPU pass a small ``--batch``.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax

import sam_optax
from sam_optax import flax as sam_flax
from sam_optax.program import models

from _common import interleaved_medians


def xent(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def build(batch: int, dtype):
    model = models.create_model("wrn16_8", 10)
    variables = models.init_variables(model, (32, 32, 3), jax.random.key(0))
    kx, ky = jax.random.split(jax.random.key(1))
    data = (
        jax.random.normal(kx, (batch, 32, 32, 3), dtype),
        jax.random.randint(ky, (batch,), 0, 10),
    )
    loss = sam_flax.linen_loss_fn(model.apply, xent, train=True)

    def state(tx):
        return sam_flax.SAMTrainState.create(
            apply_fn=model.apply,
            params=variables["params"],
            batch_stats=variables["batch_stats"],
            tx=tx,
        )

    sgd = optax.sgd(0.1, momentum=0.9)

    @jax.jit
    def sgd_step(st, batch, rng):
        (_, stats), grads = jax.value_and_grad(loss, has_aux=True)(
            st.params, batch, st.batch_stats, rng
        )
        return st.apply_gradients(grads=grads, batch_stats=stats)

    sam_step = sam_flax.linen_train_step(loss)
    carry = {"sgd": state(sgd), "sam": state(optax.chain(sam_optax.sam(0.05), sgd))}
    rng = jax.random.key(2)

    def run_sgd():
        carry["sgd"] = sgd_step(carry["sgd"], data, rng)
        return carry["sgd"].params

    def run_sam():
        carry["sam"], _ = sam_step(carry["sam"], data, rng)
        return carry["sam"].params

    return {"SGD": run_sgd, "SAM": run_sam}, models.count_params(variables["params"])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)
    fns, n_params = build(args.batch, jnp.dtype(args.dtype))
    med = interleaved_medians(fns, args.repeats, warmup=2)
    print(
        f"device: {jax.devices()[0].device_kind}, WRN-16-8 ({n_params / 1e6:.1f}M params), "
        f"batch {args.batch}, {args.dtype} inputs, repeats {args.repeats}"
    )
    print("| step | ms | images / s | / SGD |")
    print("|---|---:|---:|---:|")
    for name, t in med.items():
        print(f"| {name} | {t * 1e3:.1f} | {args.batch / t:.0f} | {t / med['SGD']:.3f} |")


if __name__ == "__main__":
    main()
