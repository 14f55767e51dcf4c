"""Per-device memory of a sharded Flax NNX model's training step, on a ('data', 'model') mesh.

    python benchmarks/sharded_memory.py [--depth 512] [--layers 4] [--batch 1024]

The model is the Flax GSPMD guide's ``DotReluDot`` stacked ``--layers``
times: each layer a ``(depth, depth)`` kernel sharded over ``'model'`` by
columns and a second one by rows (``nnx.with_partitioning``), the
activation constrained to ``P(P.UNCONSTRAINED, 'model')``, on a 2 x 4 mesh
(8 devices: CPU devices on a CPU host). The optimizer is AdamW. Each step is
lowered and compiled with params and optimizer state donated and not; the
number printed is XLA's temp size of the step on one device, in units of the
params' bytes on one device (P = the model's params / 4 here): the scratch a
step needs beyond its arguments and outputs.

* AdamW: the plain step (``nnx.jit``, ``nnx.value_and_grad``, ``optimizer.update``);
* SAM: ``chain(sam(rho), adamw)``, one perturbation for the whole batch, the
  same ``nnx.jit`` step with ``sam_optax.flax.nnx_value_and_grad``;
* m-sharpness: ``chain(sam(rho, axis_name='data'), adamw)`` under
  ``sam_optax.flax.nnx_shard_map_step`` (each data replica its own
  perturbation);
* MSAM: ``msam(adamw, rho)``, one gradient per step.
"""

from __future__ import annotations

import argparse

import jax

jax.config.update("jax_num_cpu_devices", 8)  # the CPU backend's; a GPU host uses its GPUs

import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import AxisType  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import sam_optax  # noqa: E402
from sam_optax import flax as sam_flax  # noqa: E402

RHO = 0.05


class DotReluDot(nnx.Module):
    def __init__(self, depth: int, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal()
        self.w1 = nnx.Param(
            nnx.with_partitioning(init, (None, "model"))(rngs.params(), (depth, depth))
        )
        self.w2 = nnx.Param(
            nnx.with_partitioning(init, ("model", None))(rngs.params(), (depth, depth))
        )

    def __call__(self, x):
        y = jax.nn.relu(x @ self.w1[...])
        y = jax.lax.with_sharding_constraint(y, P(P.UNCONSTRAINED, "model"))
        return y @ self.w2[...]


class Stack(nnx.Module):
    def __init__(self, depth: int, layers: int, rngs: nnx.Rngs):
        self.layers = nnx.List([DotReluDot(depth, rngs) for _ in range(layers)])

    def __call__(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x


def loss_fn(model, batch):
    x, y = batch
    return jnp.mean((model(x) - y) ** 2)


def sharded_model(mesh, depth, layers):
    with jax.set_mesh(mesh):

        @nnx.jit
        def create():
            model = Stack(depth, layers, nnx.Rngs(0))
            state = nnx.state(model)
            nnx.update(
                model, jax.lax.with_sharding_constraint(state, nnx.get_partition_spec(state))
            )
            return model

        return create()


def nnx_step(donate: bool, sam: bool | str):
    def step(model, optimizer, batch):
        if sam == "hand":  # the floor: SAM written out, two gradients, one update
            loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
            graphdef, params, rest = nnx.split(model, nnx.Param, ...)
            norm = optax.tree.norm(nnx.as_pure(grads))
            moved = jax.tree.map(lambda w, g: w + RHO * g / (norm + 1e-12), params, grads)
            perturbed = nnx.merge(graphdef, moved, rest)
            optimizer.update(model, nnx.grad(loss_fn)(perturbed, batch))
        elif sam:
            loss, grads, value_fn = sam_flax.nnx_value_and_grad(loss_fn)(model, batch)
            optimizer.update(model, grads, value_fn=value_fn, value=loss)
        else:
            loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
            optimizer.update(model, grads)
        return loss

    return nnx.jit(step, donate_argnames=("model", "optimizer") if donate else ())


def temp_bytes(lowered) -> int:
    return lowered.compile().memory_analysis().temp_size_in_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1024)
    args = parser.parse_args()
    if len(jax.devices()) < 8:
        print(f"sharded_memory.py: needs 8 devices for its 2 x 4 mesh, found {len(jax.devices())}")
        return
    mesh = jax.make_mesh(
        (2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2, devices=jax.devices()[:8]
    )
    adamw = lambda: optax.adamw(1e-3)  # noqa: E731
    methods = {
        "AdamW": (adamw(), "plain"),
        "SAM written out (the floor)": (adamw(), "hand"),
        "SAM (one perturbation)": (optax.chain(sam_optax.sam(RHO), adamw()), "sam"),
        "m-sharpness (per replica)": (
            optax.chain(sam_optax.sam(RHO, axis_name="data"), adamw()),
            "replica",
        ),
        "MSAM": (sam_optax.msam(adamw(), RHO), "sam"),
    }
    batch = (jnp.ones((args.batch, args.depth)), jnp.zeros((args.batch, args.depth)))
    with jax.set_mesh(mesh):
        batch = jax.device_put(batch, jax.sharding.NamedSharding(mesh, P("data")))
    rows = []
    for name, (tx, kind) in methods.items():
        cells = []
        for donate in (True, False):
            model = sharded_model(mesh, args.depth, args.layers)
            with jax.set_mesh(mesh):  # the state's variables carry the params' shardings
                optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
            params = nnx.state(model, nnx.Param)
            per_device = sum(
                x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(nnx.as_pure(params))
            )
            if kind == "replica":
                step = sam_flax.nnx_shard_map_step(loss_fn, mesh, donate=donate)
                lowered = step.lower(model, optimizer, batch)
            else:
                with jax.set_mesh(mesh):
                    sam = {"plain": False, "sam": True, "hand": "hand"}[kind]
                    lowered = nnx_step(donate, sam).lower(model, optimizer, batch)
            cells.append(temp_bytes(lowered) / per_device)
        rows.append((name, *cells))
    n = sum(x.size for x in jax.tree.leaves(nnx.as_pure(params)))
    print(
        f"{args.layers} x DotReluDot({args.depth}): {n / 1e6:.1f}M params, batch {args.batch}, "
        f"mesh 2 x 4 ({jax.devices()[0].platform}), P = {per_device / 2**20:.1f} MiB per device"
    )
    print("| step | temp per device, donated (P) | not donated (P) |")
    print("|---|---:|---:|")
    for name, donated, kept in rows:
        print(f"| {name} | {donated:.2f} | {kept:.2f} |")


if __name__ == "__main__":
    main()
