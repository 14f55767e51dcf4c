"""Cost per step of the efficient SAM family against SGD and SAM, side by side.

    python benchmarks/efficient.py [--model cnn,mlp] [--repeats N] [--steps K]

Two models: the benchmark CNN (batch 128, 32x32x3) and an MLP (64-256-256-10,
batch 64, the program's default task). Every method is ``chain(method,
sgd(momentum))`` in a jitted step that passes the clean loss as ``value=``
(the diagnostics are on). A timed unit is K consecutive steps (default 10,
a multiple of LookSAM's period), so switching methods are timed over their
mix of SAM and base steps; units are interleaved across methods and the
medians per step reported. The gradient evaluations per step are counted
from the ``sam_step`` diagnostics of the timed steps (MSAM: one by
construction, its compiled step holds a single backward pass).
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
import optax

import sam_optax

from _common import cnn_loss
from _common import init_cnn
from _common import init_mlp
from _common import interleaved_medians
from _common import make_batch
from _common import make_mlp_batch
from _common import mlp_loss

MODELS = {
    "cnn": (init_cnn, make_batch, cnn_loss),
    "mlp": (init_mlp, make_mlp_batch, mlp_loss),
}

LR, RHO = 0.1, 0.05

# Each method as its docs compose it with the base optimizer.
METHODS = {
    "SGD": lambda base: base,
    "SAM": lambda base: optax.chain(sam_optax.sam(RHO), base),
    "GSAM (alpha 0.1)": lambda base: optax.chain(sam_optax.gsam(RHO, 0.1), base),
    "LookSAM (every 5)": lambda base: optax.chain(sam_optax.looksam(RHO, every=5), base),
    "MSAM": lambda base: sam_optax.msam(base, 0.3),
    "RST (p 0.5)": lambda base: optax.chain(sam_optax.rst(RHO, 0.5), base),
    "AE-SAM (c 0)": lambda base: optax.chain(sam_optax.aesam(RHO, 0.0), base),
    "F-SAM": lambda base: optax.chain(sam_optax.fsam(RHO, 1.0), base),
    "VaSSO": lambda base: optax.chain(sam_optax.vasso(RHO, 0.9), base),
    "WSAM": lambda base: sam_optax.wsam(base, RHO, 0.9, learning_rate=LR),
    "SAMPa (one device)": lambda base: sam_optax.sampa(base, RHO),
}
GRADIENTS = {"SGD": 1.0, "MSAM": 1.0}


def build(params, batch, steps, loss):
    runners = {}
    for name, make in METHODS.items():
        tx = make(optax.sgd(LR, momentum=0.9))

        @jax.jit
        def step(params, state, tx=tx):
            loss_fn = lambda p: loss(p, batch)  # noqa: E731
            value, grads = jax.value_and_grad(loss_fn)(params)
            updates, state = tx.update(grads, state, params, value_fn=loss_fn, value=value)
            return optax.apply_updates(params, updates), state

        carry = {"params": params, "state": tx.init(params), "flags": []}

        def run(step=step, carry=carry):
            for _ in range(steps):
                carry["params"], carry["state"] = step(carry["params"], carry["state"])
                carry["flags"].append(optax.tree.get(carry["state"], "sam_step"))
            return carry["params"]

        runners[name] = (run, carry)
    return runners


def table(model: str, repeats: int, steps: int) -> None:
    init, make, loss = MODELS[model]
    params = init(jax.random.key(0))
    batch = make(jax.random.key(1))
    runners = build(params, batch, steps, loss)
    med = interleaved_medians({n: r for n, (r, _) in runners.items()}, repeats, warmup=1)
    sgd, sam = med["SGD"] / steps, med["SAM"] / steps
    print(
        f"\n{model}: device {jax.devices()[0].device_kind}, {steps} steps per unit, repeats {repeats}"
    )
    print("| method | ms / step | / SGD | / SAM | gradients / step |")
    print("|---|---:|---:|---:|---:|")
    for name, (_, carry) in runners.items():
        per_step = med[name] / steps
        if name in GRADIENTS:
            grads = GRADIENTS[name]
        else:
            grads = 1.0 + float(np.mean(jax.device_get(carry["flags"])))
        print(
            f"| {name} | {per_step * 1e3:.2f} | {per_step / sgd:.3f} | {per_step / sam:.3f} "
            f"| {grads:.2f} |"
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cnn,mlp", help="comma list of cnn, mlp")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)
    for model in args.model.split(","):
        table(model, args.repeats, args.steps)


if __name__ == "__main__":
    main()
