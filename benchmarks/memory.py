"""Scratch memory of one jitted training step, in units of the params' bytes P, side by side.

    python benchmarks/memory.py [--model mlp|cnn|both]

Each step is jitted with params and optimizer state donated and compiled;
the figure is XLA's own ``memory_analysis().temp_size_in_bytes`` divided by
the params' bytes (deterministic for a given jaxlib: nothing is run). Models:
``mlp`` 512-2048-2048-2048-10 (9.5M float32 params, batch 128), where params
dominate, and ``cnn`` the benchmark CNN (batch 128), where activations do.
Each method is composed with SGD with momentum as its docs say, with the
clean loss passed as ``value=`` (the diagnostics on).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

import sam_optax
from sam_optax import parallel

from _common import cnn_apply
from _common import init_big_mlp
from _common import init_cnn
from _common import make_batch
from _common import make_big_mlp_batch
from _common import nbytes

RHO, LR = 0.05, 0.1
BATCH = 128


def _mlp_logits(params, x):
    layers = [params[f"dense{i}"] for i in range(len(params))]
    for layer in layers[:-1]:
        x = jax.nn.relu(x @ layer["w"] + layer["b"][None, :])
    return x @ layers[-1]["w"] + layers[-1]["b"][None, :]


MODELS = {
    "mlp": (
        lambda: init_big_mlp(jax.random.key(0)),
        _mlp_logits,
        lambda: make_big_mlp_batch(jax.random.key(1)),
    ),
    "cnn": (lambda: init_cnn(jax.random.key(0)), cnn_apply, lambda: make_batch(jax.random.key(1))),
}


def _base() -> optax.GradientTransformation:
    return optax.sgd(LR, momentum=0.9)


# Each method as its docs compose it (a function of the base optimizer).
METHODS: dict[str, Callable[[optax.GradientTransformation], optax.GradientTransformation]] = {
    "chain(sam, sgd)": lambda b: optax.chain(sam_optax.sam(RHO), b),
    "sam(cosine=True)": lambda b: optax.chain(sam_optax.sam(RHO, cosine=True), b),
    "sam, rho schedule": lambda b: optax.chain(sam_optax.sam(optax.linear_schedule(0, RHO, 10)), b),
    "sam(ascent_steps=2)": lambda b: optax.chain(sam_optax.sam(RHO, ascent_steps=2), b),
    "sam(ascent_steps=3)": lambda b: optax.chain(sam_optax.sam(RHO, ascent_steps=3), b),
    "sam(ascent_steps=5)": lambda b: optax.chain(sam_optax.sam(RHO, ascent_steps=5), b),
    "sam(second_order=True)": lambda b: optax.chain(sam_optax.sam(RHO, second_order=True), b),
    "sam(adaptive=True)": lambda b: optax.chain(sam_optax.sam(RHO, adaptive=True), b),
    "gsam": lambda b: optax.chain(sam_optax.gsam(RHO), b),
    "looksam": lambda b: optax.chain(sam_optax.looksam(RHO), b),
    "rst": lambda b: optax.chain(sam_optax.rst(RHO), b),
    "aesam": lambda b: optax.chain(sam_optax.aesam(RHO), b),
    "fsam": lambda b: optax.chain(sam_optax.fsam(RHO), b),
    "vasso": lambda b: optax.chain(sam_optax.vasso(RHO), b),
    "esam(beta=1, gamma=0.5)": lambda b: optax.chain(sam_optax.esam(RHO, 1.0, 0.5), b),
    "esam(beta=0.5, gamma=0.5)": lambda b: optax.chain(sam_optax.esam(RHO, 0.5, 0.5), b),
    "msam": lambda b: sam_optax.msam(b, RHO),
    "wsam": lambda b: sam_optax.wsam(b, RHO, learning_rate=LR),
    "sampa (one device)": lambda b: sam_optax.sampa(b, RHO),
}
GROUPS = (2, 4, 8, 16)


def scratch(step, params, state, batch) -> float:
    """XLA's temp bytes of ``step`` (params and state donated), in units of P."""
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, batch).compile()
    return compiled.memory_analysis().temp_size_in_bytes / nbytes(params)


def rows(model: str) -> dict[str, float]:
    init, apply, make_batch_ = MODELS[model]
    params, batch = init(), make_batch_()

    def per_example(p, b):
        return optax.softmax_cross_entropy_with_integer_labels(apply(p, b[0]), b[1])

    def loss(p, b):
        return jnp.mean(per_example(p, b))

    def method_step(tx, esam=False):
        def step(params, state, batch):
            per = lambda p: per_example(p, batch)  # noqa: E731
            (value, losses), grads = jax.value_and_grad(
                lambda p: (jnp.mean(per(p)), per(p)), has_aux=True
            )(params)
            if esam:
                updates, state = tx.update(grads, state, params, value_fn=per, value=losses)
            else:
                f = lambda p: jnp.mean(per(p))  # noqa: E731
                updates, state = tx.update(grads, state, params, value_fn=f, value=value)
            return optax.apply_updates(params, updates), state

        return step

    base = _base()
    out = {}

    def sgd(params, state, batch):
        updates, state = base.update(jax.grad(loss)(params, batch), state, params)
        return optax.apply_updates(params, updates), state

    def hand(params, state, batch, cos=False):
        g = jax.grad(loss)(params, batch)
        n = optax.tree.norm(g)
        g2 = jax.grad(loss)(jax.tree.map(lambda w, x: w + RHO * x / (n + 1e-12), params, g), batch)
        updates, state = base.update(g2, state, params)
        extra = optax.tree.vdot(g, g2) if cos else 0.0
        return optax.apply_updates(params, updates), (state, extra)

    contrib = optax.contrib.sam(
        _base(), optax.chain(optax.contrib.normalize(), optax.sgd(RHO)), opaque_mode=True
    )

    def contrib_step(params, state, batch):
        g = jax.grad(loss)(params, batch)
        updates, state = contrib.update(
            g, state, params, grad_fn=lambda p, _: jax.grad(loss)(p, batch)
        )
        return optax.apply_updates(params, updates), state

    out["SGD"] = scratch(sgd, params, base.init(params), batch)
    out["hand-written SAM"] = scratch(hand, params, base.init(params), batch)
    out["hand-written SAM + cos(g, g_SAM)"] = scratch(
        lambda p, s, b: hand(p, s, b, cos=True), params, base.init(params), batch
    )
    out["optax.contrib.sam (opaque)"] = scratch(contrib_step, params, contrib.init(params), batch)
    for name, make in METHODS.items():
        tx = make(_base())
        out[name] = scratch(
            method_step(tx, esam=name.startswith("esam")), params, tx.init(params), batch
        )
    tx = optax.chain(sam_optax.sam(RHO), _base())
    for groups in GROUPS:
        step = parallel.grouped_step(loss, tx, group_size=BATCH // groups)
        out[f"grouped_step, {groups} groups of {BATCH // groups}"] = scratch(
            lambda p, s, b, step=step: step(p, s, b)[:2], params, tx.init(params), batch
        )
    step = parallel.grouped_step(loss, tx, group_size=BATCH // 16, sequential=False)
    out["grouped_step(sequential=False), 16 groups of 8"] = scratch(
        lambda p, s, b: step(p, s, b)[:2], params, tx.init(params), batch
    )
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["mlp", "cnn", "both"], default="both")
    args = parser.parse_args(argv)
    models = ["mlp", "cnn"] if args.model == "both" else [args.model]
    table = {m: rows(m) for m in models}
    sizes = {m: nbytes(MODELS[m][0]()) for m in models}
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, batch {BATCH}")
    print("| step | " + " | ".join(f"{m} (P = {sizes[m] / 2**20:.1f} MiB)" for m in models) + " |")
    print("|---|" + "---:|" * len(models))
    for name in table[models[0]]:
        print(f"| {name} | " + " | ".join(f"{table[m][name]:.2f}" for m in models) + " |")
    hand = {m: table[m]["hand-written SAM"] for m in models}
    for m in models:
        print(
            f"{m}: chain(sam, sgd) - hand-written = {table[m]['chain(sam, sgd)'] - hand[m]:+.3f} P; "
            f"grouped 16 - plain = "
            f"{table[m]['grouped_step, 16 groups of 8'] - table[m]['chain(sam, sgd)']:+.3f} P"
        )


if __name__ == "__main__":
    main()
