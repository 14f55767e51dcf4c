"""m-sharpness on one device: cost of one step with G groups against one plain SAM step.

    python benchmarks/msharpness.py [--model cnn|big-mlp|mlp] [--groups 8] [--repeats N]

The benchmark CNN (batch 128), the memory benchmark's MLP (512-2048-2048-2048-10,
9.5M params, batch 128) or the program's MLP (64-256-256-10, batch 64), the batch split into G groups (default 8), each group perturbed with its
own gradient, the group SAM gradients averaged, one SGD-momentum update.
Strategies:

* ``grouped_step`` (the library, the default): the groups one after the
  other into one running sum (``GroupedObjective``): one group's buffers at
  a time;
* ``grouped_step(sequential=False)``: every group differentiated in one pass
  against its own params copy (G gradients and G perturbed copies alive at
  once);
* ``vmap``: ``jax.vmap`` over the groups with ``sam(axis_name=...)``
  (the perturbed weights become batched, which convolutions pay for);
* ``lax.map``: a sequential ``lax.map`` of per-group SAM gradients;
* ``python loop``: a Python loop calling ``sam`` once per group;
* the floor: one gradient of the whole batch, and G gradients of m examples.
  A plain SAM step takes two of the first, m-sharpness two of the second
  (each group's clean and perturbed gradient), so the ratio of the two floor
  rows is what m-sharpness must cost on that model, whatever the strategy.

Runs are interleaved and medians reported; read the ratios, not the times.
"""

from __future__ import annotations

import argparse

import jax
import optax

import sam_optax
from sam_optax import parallel
from sam_optax._groups import stack_groups

from _common import cnn_loss
from _common import init_big_mlp
from _common import init_cnn
from _common import init_mlp
from _common import interleaved_medians
from _common import make_batch
from _common import make_big_mlp_batch
from _common import make_mlp_batch
from _common import mlp_loss

MODELS = {
    "cnn": (init_cnn, make_batch, cnn_loss),
    "big-mlp": (init_big_mlp, make_big_mlp_batch, mlp_loss),
    "mlp": (init_mlp, make_mlp_batch, mlp_loss),
}

LR, RHO = 0.1, 0.05


def build(params, batch, groups, loss):
    size = len(batch[1])
    m = size // groups
    base = optax.sgd(LR, momentum=0.9)
    single = sam_optax.sam(RHO)

    def split(batch):
        return stack_groups(batch, m)

    def finish(params, state, sam_grads):
        updates, state = base.update(sam_grads, state, params)
        return optax.apply_updates(params, updates), state

    def group_sam_grad(params, b, tx):
        f = lambda p: loss(p, b)  # noqa: E731
        out, _ = tx.update(jax.grad(f)(params), tx.init(params), params, value_fn=f)
        return out

    steps = {}

    tx_plain = optax.chain(single, base)
    plain = parallel.grouped_step(loss, tx_plain, donate=False)  # called on the same params
    steps[f"plain SAM (1 group of {size})"] = (
        lambda p, s, b: plain(p, s, b)[:2],
        tx_plain.init(params),
    )

    grouped = parallel.grouped_step(loss, tx_plain, group_size=m, donate=False)
    steps[f"grouped_step (library), {groups} x {m}"] = (
        lambda p, s, b: grouped(p, s, b)[:2],
        tx_plain.init(params),
    )

    one_pass = parallel.grouped_step(loss, tx_plain, group_size=m, sequential=False, donate=False)
    steps[f"grouped_step(sequential=False), {groups} x {m}"] = (
        lambda p, s, b: one_pass(p, s, b)[:2],
        tx_plain.init(params),
    )

    axis_sam = sam_optax.sam(RHO, axis_name="groups")

    @jax.jit
    def vmap_step(params, state, batch):
        out = jax.vmap(lambda b: group_sam_grad(params, b, axis_sam), axis_name="groups")(
            split(batch)
        )
        return finish(params, state, jax.tree.map(lambda x: x[0], out))

    steps[f"vmap, {groups} x {m}"] = (vmap_step, base.init(params))

    @jax.jit
    def map_step(params, state, batch):
        out = jax.lax.map(lambda b: group_sam_grad(params, b, single), split(batch))
        return finish(params, state, jax.tree.map(lambda x: x.mean(0), out))

    steps[f"lax.map, {groups} x {m}"] = (map_step, base.init(params))

    @jax.jit
    def loop_step(params, state, batch):
        parts = split(batch)
        outs = [
            group_sam_grad(params, jax.tree.map(lambda x, i=i: x[i], parts), single)
            for i in range(groups)
        ]
        return finish(params, state, jax.tree.map(lambda *g: sum(g) / groups, *outs))

    steps[f"python loop of sam, {groups} x {m}"] = (loop_step, base.init(params))

    # What m-sharpness cannot go below: each group takes two gradients of m examples
    # (its own clean one and its perturbed one), against two gradients of the batch.
    whole = jax.jit(jax.grad(loss))
    steps[f"floor: one gradient of {size} (half of plain SAM)"] = (
        lambda p, s, b: whole(p, b),
        None,
    )

    @jax.jit
    def group_grads(params, batch):
        parts = split(batch)
        outs = [
            jax.grad(loss)(params, jax.tree.map(lambda x, i=i: x[i], parts)) for i in range(groups)
        ]
        return jax.tree.map(lambda *g: sum(g), *outs)

    steps[f"floor: {groups} gradients of {m} (half of m-sharpness)"] = (
        lambda p, s, b: group_grads(p, b),
        None,
    )
    return steps


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="cnn")
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    init, make, loss = MODELS[args.model]
    params = init(jax.random.key(0))
    batch = make(jax.random.key(1))
    steps = build(params, batch, args.groups, loss)
    fns = {n: (lambda f=f, s=s: f(params, s, batch)) for n, (f, s) in steps.items()}
    med = interleaved_medians(fns, args.repeats)
    ref = med[f"plain SAM (1 group of {len(batch[1])})"]
    print(
        f"device: {jax.devices()[0].device_kind}, {args.model}, batch {len(batch[1])}, "
        f"repeats: {args.repeats}"
    )
    print("| strategy | median ms | / plain SAM step |")
    print("|---|---:|---:|")
    for name in steps:
        print(f"| {name} | {med[name] * 1e3:.2f} | {med[name] / ref:.3f} |")


if __name__ == "__main__":
    main()
