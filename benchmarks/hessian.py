"""Cost of the top-5 Hessian eigenvalues relative to one gradient, on the benchmark CNN.

    python benchmarks/hessian.py [--iterations 40] [--repeats N]

Lanczos with full reorthogonalization (``sam_optax.analysis``), each
iteration one forward-over-reverse Hessian-vector product; batch 128,
32x32x3. Both are jitted and timed interleaved, medians; read the ratio.
"""

from __future__ import annotations

import argparse

import jax
from jax.flatten_util import ravel_pytree

from sam_optax.analysis import hessian_top_eigenvalues
from sam_optax.analysis import hvp_fn
from sam_optax.analysis import lanczos

from _common import cnn_loss
from _common import init_cnn
from _common import interleaved_medians
from _common import make_batch


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    params = init_cnn(jax.random.key(0))
    batch = make_batch(jax.random.key(1))

    grad = jax.jit(jax.grad(cnn_loss))
    # The batch is passed as data (a list of one batch), not captured by a
    # closure, so that XLA does not constant-fold through it.
    hvp, n, dtype = hvp_fn(cnn_loss, params, batches=[batch])
    hvp_once = jax.jit(lambda h, v: h(v))
    vec = ravel_pytree(params)[0]
    run_lanczos = jax.jit(lambda h, key: lanczos(h, n, args.iterations, key, dtype))
    key = jax.random.key(0)
    med = interleaved_medians(
        {
            "gradient": lambda: grad(params, batch),
            "Hessian-vector product": lambda: hvp_once(hvp, vec),
            f"top-5 eigenvalues ({args.iterations} Lanczos iterations)": lambda: run_lanczos(
                hvp, key
            ),
        },
        args.repeats,
        warmup=1,
    )
    # The eigenvalues themselves, once, to show they are sensible.
    lams = hessian_top_eigenvalues(
        cnn_loss, params, k=5, batches=[batch], num_iterations=args.iterations
    )
    ref = med["gradient"]
    print(
        f"device: {jax.devices()[0].device_kind}, {n:,} parameters, batch 128, repeats {args.repeats}"
    )
    print("| computation | median ms | / one gradient |")
    print("|---|---:|---:|")
    for name, t in med.items():
        print(f"| {name} | {t * 1e3:.1f} | {t / ref:.1f} |")
    print(
        f"top-5 eigenvalues: {[round(float(v), 3) for v in lams]}; "
        f"Lanczos memory: {(args.iterations + 3) * n * 4 / 2**20:.0f} MiB of basis"
    )


if __name__ == "__main__":
    main()
