"""Shared test problems, the tree-close helpers and the two-process launch helpers.

Tolerances: exact algebra in float64 at rtol 1e-9 unless a test states
another, sharded vs single device at 1e-6 (float32) or 1e-9 (float64),
convergence ~3e-2.
"""

from __future__ import annotations

import socket
import subprocess

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


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[str]:
    """Waits for every process (killing the rest on a timeout); asserts each exited 0.

    Returns their combined stdout/stderr; a failure shows the failing one's.
    """
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"process {i} failed:\n{outputs[i] if i < len(outputs) else ''}"
    return outputs
