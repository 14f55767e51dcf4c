"""Shared test problems, the tree-close helpers and the two-process launch helpers.

Tolerances: exact algebra in float64 at rtol 1e-9 unless a test states
another, sharded vs single device at 1e-6 (float32) or 1e-9 (float64),
convergence ~3e-2.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np

RTOL_EXACT = 1e-9


def _as_float64(tree):
    """Numpy float64 leaves (complex128 for complex ones), so bf16 and f32 compare alike."""

    def cast(x):
        x = np.asarray(x)
        return x.astype(np.complex128 if np.iscomplexobj(x) else np.float64)

    return jax.tree.map(cast, tree)


def assert_trees_close(actual, expected, rtol=RTOL_EXACT, atol=0.0):
    """Leafwise closeness (chex), the same structure required, compared in float64."""
    chex.assert_trees_all_close(_as_float64(actual), _as_float64(expected), rtol=rtol, atol=atol)


def assert_trees_equal(actual, expected):
    """Bit-for-bit equality and equal dtypes of two trees (chex)."""
    chex.assert_trees_all_equal_dtypes(actual, expected)
    chex.assert_trees_all_equal(actual, expected)


def flat(tree) -> np.ndarray:
    """Concatenates the leaves of a tree into one float64 numpy vector."""
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


def unflat(vec: np.ndarray, like):
    """Inverse of :func:`flat` (float64 leaves shaped like ``like``)."""
    leaves, treedef = jax.tree.flatten(like)
    out, start = [], 0
    for x in leaves:
        n = int(np.size(x))
        out.append(jnp.asarray(vec[start : start + n].reshape(np.shape(x))))
        start += n
    return jax.tree.unflatten(treedef, out)


class QuarticProblem:
    r"""L(w) = 1/2 w^T A w + b^T w + 1/4 sum w^4 on a dict of two leaves.

    Gradient and Hessian have closed forms in numpy (the independent formulas
    the tests check against): grad = A w + b + w^3, H = A + 3 diag(w^2).
    """

    def __init__(self, seed: int = 0, n_w: int = 6, n_b: int = 3):
        rng = np.random.default_rng(seed)
        n = n_w + n_b
        m = rng.normal(size=(n, n))
        self.A = m @ m.T / n + 0.5 * np.eye(n)
        self.b = rng.normal(size=n)
        self.shapes = {"w": (2, n_w // 2), "bias": (n_b,)}
        self.params = unflat(rng.normal(size=n), self.like())

    def like(self):
        return {k: np.zeros(s) for k, s in self.shapes.items()}

    def loss(self, params):
        v = jnp.concatenate([params["bias"].ravel(), params["w"].ravel()])
        return 0.5 * v @ (jnp.asarray(self.A) @ v) + jnp.asarray(self.b) @ v + 0.25 * jnp.sum(v**4)

    # --- numpy side, in the order of ``flat`` (leaves sorted by key: bias, w) ---
    def np_grad(self, v: np.ndarray) -> np.ndarray:
        return self.A @ v + self.b + v**3

    def np_loss(self, v: np.ndarray) -> float:
        return float(0.5 * v @ self.A @ v + self.b @ v + 0.25 * np.sum(v**4))

    def np_hess(self, v: np.ndarray) -> np.ndarray:
        return self.A + 3 * np.diag(v**2)


def np_eps_p(g: np.ndarray, rho: float, p: float) -> np.ndarray:
    """Eq. (2) written out in numpy: rho sign(g)|g|^(q-1) / ||g||_q^(q-1)."""
    if np.isinf(p):
        return rho * np.sign(g)
    q = p / (p - 1)
    return rho * np.sign(g) * np.abs(g) ** (q - 1) / np.sum(np.abs(g) ** q) ** (1 / p)


# --------------------------------------------------------------------------
# Two real processes on 127.0.0.1 (jax.distributed).
# --------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a jax.distributed coordinator)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_all(
    procs: list[subprocess.Popen], timeout: float, until: Callable[[list[str]], bool] | None = None
) -> tuple[list[str], list[int]]:
    """Reads every process's output (text stdout piped) as it comes, until all end or ``timeout``.

    A full pipe never blocks one process while another is waited for.
    ``until(outputs)``, polled, ends the wait early when it returns True.
    Every process still running then is killed (SIGKILL: a process under
    ``jax.distributed`` takes SIGTERM for jax's preemption notifier and goes
    on). Returns the outputs and the indices of the processes that were
    still running.
    """
    chunks: list[list[str]] = [[] for _ in procs]
    readers = [
        threading.Thread(target=lambda p=p, out=out: out.extend(p.stdout), daemon=True)
        for p, out in zip(procs, chunks)
    ]
    for r in readers:
        r.start()
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        if until is not None and until(["".join(c) for c in chunks]):
            break
        time.sleep(0.05)
    running = [i for i, p in enumerate(procs) if p.poll() is None]
    for i in running:
        procs[i].kill()
    for p in procs:
        p.wait()
    for r in readers:
        r.join(timeout=10)
    return ["".join(c) for c in chunks], running


def describe(procs: list[subprocess.Popen], outputs: list[str], tail: int = 40) -> str:
    """Every process's exit code and the last ``tail`` lines of its output."""
    parts = []
    for i, (p, out) in enumerate(zip(procs, outputs)):
        lines = out.splitlines()[-tail:]
        parts.append(f"--- process {i} (exit {p.returncode}), last {len(lines)} lines:")
        parts.extend(lines)
    return "\n".join(parts)


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[str]:
    """Waits for every process; asserts each ended in time with exit 0; returns their outputs.

    A failure, a timeout included, shows every process's last lines.
    """
    outputs, running = run_all(procs, timeout)
    if running:
        raise AssertionError(
            f"process(es) {running} still running after {timeout:g} s, all killed:\n"
            + describe(procs, outputs)
        )
    failed = [i for i, p in enumerate(procs) if p.returncode != 0]
    assert not failed, f"process(es) {failed} failed:\n" + describe(procs, outputs)
    return outputs
