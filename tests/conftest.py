"""Test-suite set-up: 8 fake CPU devices and strict numerics, before any JAX work."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_rank_promotion", "raise")

# A script run in processes of its own by test_parallel.py, not a test module.
collect_ignore = ["multiprocess_worker.py"]
