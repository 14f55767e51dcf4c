"""Each workaround of ``sam_optax._known_issues`` against its bug's minimal reproduction.

These tests run the bug on the installed jax, without the workaround, and
assert that it shows exactly where the workaround's predicate says it does:
when jax fixes the bug (or it appears somewhere new), they fail and say
which predicate to change.
"""

import os
import subprocess
import sys
import time

import pytest

from sam_optax import _known_issues

from helpers import describe
from helpers import free_port
from helpers import run_all

# Two processes x 4 CPU devices: a jitted sum over the 8 devices, then the
# in-memory caches cleared, so that the second call compiles again and reads
# the executable process 0 wrote to the persistent cache at the first.
_CACHE_REPRO = """
import sys
import jax
jax.config.update("jax_num_cpu_devices", 4)
pid, port, avoid = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "avoid"
jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid,
    initialization_timeout=60,
)
if avoid:
    from sam_optax import _known_issues
    print("note:", _known_issues.avoid_persistent_cache_hang(), flush=True)
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), np.arange(4.0) + 4 * pid)
f = jax.jit(lambda x: jnp.sum(2 * x), out_shardings=NamedSharding(mesh, P()))
print("first", float(f(x)), flush=True)
jax.clear_caches()
print("second", float(f(x)), flush=True)
jax.distributed.shutdown()
"""


def _run_cache_repro(tmp_path, mode):
    """Both processes' outputs and whether the second call hung (it takes milliseconds)."""
    port = free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path / "cache")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CACHE_REPRO, str(i), str(port), mode],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    # Wait until both have finished their first call (compilation and start-up
    # on a busy machine), then give the second call 20 s: it needs a few ms.
    second_due = []

    def second_overdue(outputs):
        if not second_due and all("first 56.0" in o for o in outputs):
            second_due.append(time.monotonic() + 20)
        return bool(second_due) and time.monotonic() > second_due[0]

    outputs, running = run_all(procs, timeout=180, until=second_overdue)
    report = describe(procs, outputs)
    assert second_due, "the first call did not finish in both processes:\n" + report
    if not running:
        for p in procs:
            assert p.returncode == 0, report
        assert all("second 56.0" in o for o in outputs), report
    return outputs, bool(running), report


@pytest.mark.slow
@pytest.mark.multiprocess
def test_persistent_cache_hang_across_processes_is_where_the_predicate_says(tmp_path):
    hangs = _known_issues.persistent_cache_hangs_across_processes("cpu")
    _, hung, report = _run_cache_repro(tmp_path, "plain")
    version = ".".join(map(str, _known_issues.jaxlib_version()))
    if hangs:
        assert hung, (
            f"jaxlib {version} no longer hangs on an executable read back from the persistent "
            "cache with several CPU processes: jax fixed it. Narrow "
            "sam_optax._known_issues.persistent_cache_hangs_across_processes to the releases "
            "that hang (and the docs' multi-device page), or drop the workaround.\n" + report
        )
    else:
        assert not hung, (
            f"jaxlib {version} hangs on an executable read back from the persistent cache with "
            "several CPU processes, but sam_optax._known_issues does not list it: widen "
            "persistent_cache_hangs_across_processes.\n" + report
        )


@pytest.mark.slow
@pytest.mark.multiprocess
def test_the_workaround_runs_the_reproduction_to_the_end(tmp_path):
    outputs, hung, report = _run_cache_repro(tmp_path, "avoid")
    assert not hung, report
    note = "persistent compilation cache" in outputs[0]
    assert note == _known_issues.persistent_cache_hangs_across_processes("cpu"), report
