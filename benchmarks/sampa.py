"""SAMPa's parallel form against SAM and SGD: time per step and memory, side by side.

    python benchmarks/sampa.py [--model cnn|big-mlp] [--repeats N]

Every step takes the same global batch (128) of the model. SGD and SAM run on
1 device and data-parallel on 2 (``parallel.shard_map_step``: half the batch
per device); SAMPa runs its one-device form (both gradients in sequence) and
its parallel form on 2 devices (``parallel.sampa_step``: each device one
gradient on a whole batch, the previous one or the current one). Times are
interleaved medians relative to SGD on one device; memory is XLA's temp size
of each step (params and state donated), per device, in units of the params'
bytes P. On CPU, 2 devices are 2 threads of one process sharing the
machine's cores with XLA's own intra-op threads: read the ratios on the
machine they were measured on.
"""

from __future__ import annotations

import argparse

import jax

jax.config.update("jax_num_cpu_devices", 2)  # the CPU backend's; a GPU host uses its GPUs

import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import sam_optax  # noqa: E402
from sam_optax import parallel  # noqa: E402

from _common import BATCH  # noqa: E402
from _common import cnn_loss  # noqa: E402
from _common import init_big_mlp  # noqa: E402
from _common import init_cnn  # noqa: E402
from _common import interleaved_medians  # noqa: E402
from _common import make_batch  # noqa: E402
from _common import make_big_mlp_batch  # noqa: E402
from _common import mlp_loss  # noqa: E402
from _common import nbytes  # noqa: E402

LR, RHO, LAM = 0.1, 0.05, 0.2
MODELS = {
    "cnn": (init_cnn, make_batch, cnn_loss),
    "big-mlp": (init_big_mlp, make_big_mlp_batch, mlp_loss),
}


def _base():
    return optax.sgd(LR, momentum=0.9)


def _one_device(loss, tx, sampa=False):
    def step(params, state, batch, previous):
        grads = jax.grad(loss)(params, batch)
        extra = {"previous_value_fn": lambda p: loss(p, previous)} if sampa else {}
        updates, state = tx.update(grads, state, params, value_fn=lambda p: loss(p, batch), **extra)
        return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 1))


def build(model: str):
    init, make, loss = MODELS[model]
    params = init(jax.random.key(0))
    batch, previous = make(jax.random.key(1)), make(jax.random.key(2))
    two_devices = len(jax.devices()) >= 2
    mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2]) if two_devices else None
    cases = {}

    def one(name, tx, sampa=False):
        step = _one_device(loss, tx, sampa)
        cases[name] = (step, tx, lambda p, s: step(p, s, batch, previous), None)

    def two(name, tx, builder):
        if mesh is None:
            print(f"{name}: skipped, one device here")
            return
        step = builder(loss, tx, mesh)
        if builder is parallel.sampa_step:
            call = lambda p, s: step(p, s, batch, previous_batch=previous)  # noqa: E731
        else:
            call = lambda p, s: step(p, s, batch)  # noqa: E731
        cases[name] = (step, tx, call, mesh)

    one("SGD, 1 device", _base())
    two(
        "SGD, 2 devices",
        optax.chain(sam_optax.sam(0.0, axis_name="data"), _base()),
        parallel.shard_map_step,
    )
    one("SAM, 1 device", optax.chain(sam_optax.sam(RHO), _base()))
    two(
        "SAM, 2 devices",
        optax.chain(sam_optax.sam(RHO, axis_name="data"), _base()),
        parallel.shard_map_step,
    )
    one("SAMPa, 1 device (in sequence)", sam_optax.sampa(_base(), RHO, LAM), sampa=True)
    two("SAMPa, 2 devices (parallel)", sam_optax.sampa(_base(), RHO, LAM), parallel.sampa_step)
    return params, batch, previous, cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="cnn")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    params, batch, previous, cases = build(args.model)
    p_bytes = nbytes(params)
    print(
        f"{args.model}, batch {BATCH}, {jax.devices()[0].platform} ({len(jax.devices())} devices)"
    )

    states, memory = {}, {}
    for name, (step, tx, _, mesh) in cases.items():
        place = (lambda t, m=mesh: parallel.replicate(t, m)) if mesh is not None else jnp.copy
        p = jax.tree.map(place, params) if mesh is None else place(params)
        s = place(tx.init(params)) if mesh is not None else jax.tree.map(jnp.copy, tx.init(params))
        states[name] = [p, s]
        if mesh is None:
            lowered = step.lower(p, s, batch, previous)
        elif "SAMPa" in name:
            lowered = step.lower(p, s, batch, previous_batch=previous)
        else:
            lowered = step.lower(p, s, batch)
        memory[name] = lowered.compile().memory_analysis().temp_size_in_bytes / p_bytes

    def runner(name):
        call = cases[name][2]

        def run():
            out = call(*states[name])
            states[name][:] = out[:2]
            return out[0]

        return run

    times = interleaved_medians({name: runner(name) for name in cases}, args.repeats)
    sgd = times["SGD, 1 device"]
    print("| step | time / SGD on 1 device | temp memory per device (P) |")
    print("|---|---:|---:|")
    for name in cases:
        print(f"| {name} | {times[name] / sgd:.2f} | {memory[name]:.2f} |")


if __name__ == "__main__":
    main()
