"""Test-suite set-up: 8 fake CPU devices and strict numerics, before any JAX work."""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for this session, shared with the
# subprocesses the tests launch: the program's tests compile the same steps
# many times, and a cache hit skips XLA's work (nothing else changes).
_CACHE = tempfile.mkdtemp(prefix="sam-optax-xla-")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import jax  # noqa: E402  (the environment above must be set first)

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_sessionfinish(session, exitstatus):
    import shutil

    shutil.rmtree(_CACHE, ignore_errors=True)


# A script run in processes of its own by test_parallel.py, not a test module.
collect_ignore = ["multiprocess_worker.py"]
