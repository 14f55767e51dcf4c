"""One of two processes of the multi-host test (``test_parallel.py``).

    python multiprocess_worker.py PROCESS_ID PORT OUT_FILE

Each process owns 4 fake CPU devices; together they form an 8-device mesh
through ``jax.distributed`` on 127.0.0.1. Each process feeds its own half of
every global batch; after a few SAM steps process 0 writes the params.
"""

import sys

import jax


def main() -> None:
    # Configured here, not at import: pytest's doctest collection imports
    # this file inside the test process.
    jax.config.update("jax_num_cpu_devices", 4)
    jax.config.update("jax_enable_x64", True)
    process_id, port, out_file = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=2,
        process_id=process_id,
        initialization_timeout=60,
    )
    import numpy as np
    import optax
    from parallel_problem import loss
    from parallel_problem import make_batch
    from parallel_problem import make_params

    import sam_optax
    from sam_optax import parallel

    assert jax.device_count() == 8 and jax.local_device_count() == 4
    mesh = jax.make_mesh((8,), ("data",))
    tx = optax.chain(sam_optax.sam(0.1, axis_name="data"), optax.sgd(0.05, momentum=0.9))
    step = parallel.shard_map_step(loss, tx, mesh, group_size=4)
    params = parallel.replicate(make_params(), mesh)
    opt_state = parallel.replicate(tx.init(make_params()), mesh)
    for t in range(3):
        x, y = make_batch(seed=10 + t)
        half = len(x) // 2
        local = slice(process_id * half, (process_id + 1) * half)
        batch = parallel.shard_batch((x[local], y[local]), mesh)
        params, opt_state, value = step(params, opt_state, batch)
    if process_id == 0:
        np.savez(out_file, **{k: np.asarray(v) for k, v in params.items()})
    print(f"process {process_id}: done, loss {float(value):.6f}", flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
