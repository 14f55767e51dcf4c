"""What bounding the steps in flight costs on several CPU devices.

    python benchmarks/cpu_dispatch.py [--repeats N] [--steps K]

On several CPU devices of one process, ``parallel.shard_map_step`` and
``parallel.pmap_step`` keep at most ``parallel.CPU_STEPS_IN_FLIGHT`` (2) steps
in flight, because XLA:CPU's collectives deadlock when about 40 steps are
dispatched ahead (see ``parallel._bounds_steps_in_flight``). This times bursts
of K steps of the benchmark MLP (batch 256 over 8 CPU devices) with the bound
and without it (JAX's unbounded asynchronous dispatch), interleaved; K is kept
short enough that the unbounded burst cannot deadlock. Read the ratio, not
the times.
"""

from __future__ import annotations

import argparse

import jax

jax.config.update("jax_platforms", "cpu")  # the CPU path, on any machine
jax.config.update("jax_num_cpu_devices", 8)  # before any JAX computation

import optax  # noqa: E402

import sam_optax  # noqa: E402
from sam_optax import parallel  # noqa: E402

from _common import init_mlp  # noqa: E402
from _common import interleaved_medians  # noqa: E402
from _common import make_mlp_batch  # noqa: E402
from _common import mlp_loss  # noqa: E402


def build(kind: str, bounded: bool, mesh):
    """A step of ``kind`` with the bound on or off (the module's test patched while building)."""
    saved = parallel._bounds_steps_in_flight
    parallel._bounds_steps_in_flight = lambda devices: bounded
    try:
        if kind == "shard_map":
            tx = optax.chain(sam_optax.sam(0.05, axis_name="data"), optax.sgd(0.1, momentum=0.9))
            return tx, parallel.shard_map_step(mlp_loss, tx, mesh, donate=False)
        tx = optax.chain(sam_optax.sam(0.05, axis_name="batch"), optax.sgd(0.1, momentum=0.9))
        return tx, parallel.pmap_step(mlp_loss, tx, donate=False)
    finally:
        parallel._bounds_steps_in_flight = saved


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    mesh = jax.make_mesh((8,), ("data",))
    params = init_mlp(jax.random.key(0))
    batch = make_mlp_batch(jax.random.key(1), 256)
    print(
        f"devices: {len(jax.devices())} x {jax.devices()[0].platform}, bursts of "
        f"{args.steps} steps, repeats: {args.repeats}"
    )
    for kind in ("shard_map", "pmap"):
        fns = {}
        for bounded in (True, False):
            tx, step = build(kind, bounded, mesh)
            if kind == "shard_map":
                p, s = parallel.replicate(params, mesh), parallel.replicate(tx.init(params), mesh)
                b = parallel.shard_batch(batch, mesh)
            else:
                p, s, b = params, tx.init(params), batch

            def burst(step=step, p=p, s=s, b=b):
                q, t = p, s
                for _ in range(args.steps):
                    q, t, _ = step(q, t, b)
                return q

            fns["bounded" if bounded else "unbounded"] = burst
        t = interleaved_medians(fns, args.repeats)
        print(f"{kind:9s}  bounded / unbounded: {t['bounded'] / t['unbounded']:.3f}")


if __name__ == "__main__":
    main()
