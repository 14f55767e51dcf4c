"""Workarounds for bugs of the jax releases the package supports, each as narrow as measured.

Every workaround here has a test that runs the bug's minimal reproduction on
the installed jax and fails when the predicate below no longer matches what
jax does (``tests/test_known_issues.py``): when jax fixes a bug, that test
says which line to narrow.
"""

from __future__ import annotations

import jax

#: The first jaxlib release known to hang (``tests/test_known_issues.py``).
CACHE_HANG_SINCE = (0, 12, 1)


def jaxlib_version() -> tuple[int, ...]:
    """The installed jaxlib's version as a tuple of ints, ``(0, 12, 1)``."""
    import jaxlib.version

    return tuple(jaxlib.version.__version_info__)


def persistent_cache_hangs_across_processes(platform: str | None = None) -> bool:
    """Whether an executable loaded from the persistent compilation cache hangs here.

    Measured on jaxlib 0.12.1, CPU (gloo collectives): in a ``jax.distributed``
    run of several processes, a step that one process compiled and wrote to
    the persistent cache (``JAX_COMPILATION_CACHE_DIR``) is read back from
    it at its next compilation, and the executable read back waits forever
    at its first collective across processes; SIGTERM does not end the
    processes (jax's preemption notifier takes it). jaxlib 0.10.2 and
    0.12.0.1 run it; other platforms were not measured, so only CPU is
    named.
    """
    platform = jax.default_backend() if platform is None else platform
    return platform == "cpu" and jaxlib_version() >= CACHE_HANG_SINCE


def avoid_persistent_cache_hang() -> str | None:
    """Turns the persistent compilation cache off where it would hang; returns why, or ``None``.

    Call it after ``jax.distributed.initialize`` and before the first
    compilation. It does something only with several processes, a cache
    configured, and a jaxlib and platform where
    :func:`persistent_cache_hangs_across_processes`.
    """
    if jax.process_count() < 2 or not jax.config.jax_compilation_cache_dir:
        return None
    if not jax.config.jax_enable_compilation_cache:
        return None
    if not persistent_cache_hangs_across_processes():
        return None
    jax.config.update("jax_enable_compilation_cache", False)
    return (
        f"the persistent compilation cache ({jax.config.jax_compilation_cache_dir}) is off for "
        f"this run: with several processes on CPU, jaxlib {'.'.join(map(str, jaxlib_version()))}'s executables "
        "read back from it hang at their first collective (a jax bug, found with jaxlib 0.12.1)."
    )
