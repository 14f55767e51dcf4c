"""m-sharpness under plain ``jax.jit`` (no manual axes) against ``shard_map_step``, on 8 devices.

    python benchmarks/jit_msharpness.py [--model cnn|big-mlp] [--repeats N]

The per-device form users of ``jax.jit`` and ``NamedSharding`` would write:
the batch reshaped to (devices, per-device batch, ...) and sharded over the
data axis, ``jax.vmap`` over that leading axis with
``spmd_axis_name='data'`` (so every batched value, the perturbed weights
included, is split over the devices) and ``sam(axis_name='data')`` inside
(each vmapped element perturbs with its own gradient; the SAM gradients are
averaged over the axis). It is compared with
``parallel.shard_map_step`` on the same mesh, batch and optimizer: the
results (max abs difference of the params after one step), the time per
step (interleaved medians, ratio to ``shard_map_step``) and XLA's temp size
per device (params and state donated, in units of the params' bytes P).
"""

from __future__ import annotations

import argparse

import jax

jax.config.update("jax_num_cpu_devices", 8)  # the CPU backend's; a GPU host uses its GPUs

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import sam_optax  # noqa: E402
from sam_optax import parallel  # noqa: E402

from _common import cnn_loss  # noqa: E402
from _common import init_big_mlp  # noqa: E402
from _common import init_cnn  # noqa: E402
from _common import interleaved_medians  # noqa: E402
from _common import make_batch  # noqa: E402
from _common import make_big_mlp_batch  # noqa: E402
from _common import mlp_loss  # noqa: E402
from _common import nbytes  # noqa: E402

LR, RHO = 0.1, 0.05
MODELS = {
    "cnn": (init_cnn, make_batch, cnn_loss),
    "big-mlp": (init_big_mlp, make_big_mlp_batch, mlp_loss),
}


def jit_vmap_step(loss, tx, mesh, n):
    """The plain-jit form: vmap over the devices' shares, spmd_axis_name over the data axis."""

    def step(params, state, batch):
        shares = jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), batch)
        shares = jax.lax.with_sharding_constraint(shares, NamedSharding(mesh, P("data")))

        def device(share):
            value, grads = jax.value_and_grad(loss)(params, share)
            updates, new_state = tx.update(
                grads, state, params, value_fn=lambda p: loss(p, share), value=value
            )
            return optax.apply_updates(params, updates), new_state, value

        out = jax.vmap(device, axis_name="data", spmd_axis_name="data")(shares)
        # Averaged over the axis inside: every element holds the same result.
        params, state = jax.tree.map(lambda x: x[0], out[:2])
        return params, state, jnp.mean(out[2])

    return jax.jit(step, donate_argnums=(0, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="cnn")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    init, make, loss = MODELS[args.model]
    n = min(len(jax.devices()), 8)
    if n < 2:
        print("jit_msharpness.py: needs 2 or more devices")
        return
    mesh = jax.make_mesh((n,), ("data",), axis_types=(AxisType.Auto,), devices=jax.devices()[:n])
    params, batch = init(jax.random.key(0)), make(jax.random.key(1))
    tx = optax.chain(sam_optax.sam(RHO, axis_name="data"), optax.sgd(LR, momentum=0.9))
    steps = {
        "shard_map_step": parallel.shard_map_step(loss, tx, mesh),
        "jit + vmap(spmd_axis_name)": jit_vmap_step(loss, tx, mesh, n),
    }
    placed = parallel.shard_batch(batch, mesh)

    def fresh():
        return parallel.replicate(params, mesh), parallel.replicate(tx.init(params), mesh)

    first = {name: step(*fresh(), placed)[0] for name, step in steps.items()}
    diff = max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for a, b in zip(*(jax.tree.leaves(v) for v in first.values()))
    )
    memory = {
        name: step.lower(*fresh(), placed).compile().memory_analysis().temp_size_in_bytes
        / nbytes(params)
        for name, step in steps.items()
    }
    states = {name: list(fresh()) for name in steps}

    def runner(name):
        def run():
            out = steps[name](*states[name], placed)
            states[name][:] = out[:2]
            return out[0]

        return run

    times = interleaved_medians({name: runner(name) for name in steps}, args.repeats)
    base = times["shard_map_step"]
    print(f"{args.model}, batch {len(batch[1])}, {n} {jax.devices()[0].platform} devices")
    print(f"max abs difference of the params after one step: {diff:.2g}")
    print("| form | time / shard_map_step | temp memory per device (P) |")
    print("|---|---:|---:|")
    for name in steps:
        print(f"| {name} | {times[name] / base:.2f} | {memory[name]:.2f} |")


if __name__ == "__main__":
    main()
