"""The registry of every method of the SAM family, and the small problem the contract runs on.

A new method is one :data:`METHODS` line from being held to every test of
``tests/test_contract.py`` (and the properties, the memory relations and the
program's comparison): its factory, its own hyperparameters for the tests,
whether it wraps the base optimizer, whether its ``value_fn`` returns
per-example losses, and how many params-sized buffers it stores.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sam_optax


@dataclasses.dataclass(frozen=True)
class Method:
    """One method of the family, as the tests build and call it.

    Attributes:
      name: the factory's name in ``sam_optax``.
      hyper: its own hyperparameters for the tests (numbers are injectable).
      wraps: the factory takes the base optimizer first (``msam(inner, rho)``)
        instead of going first in a chain.
      per_example: ``value_fn`` returns per-example losses (ESAM).
      stored: params-sized float32 buffers its state keeps beyond the base
        optimizer's.
      refuses: the options of ``SAMOptions`` it does not take.
      static: its hyperparameters ``optax.inject_hyperparams`` must keep static.
      always: hyperparameters that make every step a SAM step (for the
        switching methods).
      scratch: the scratch memory its step may hold beyond a hand-written SAM
        step, in units of the params' bytes (what its maths keeps alive at
        once; ``tests/test_memory.py`` holds it to that, ``benchmarks/memory.py``
        prints it).
    """

    name: str
    hyper: dict[str, Any] = dataclasses.field(default_factory=dict)
    wraps: bool = False
    per_example: bool = False
    stored: int = 0
    refuses: tuple[str, ...] = ()
    static: tuple[str, ...] = ()
    always: dict[str, Any] = dataclasses.field(default_factory=dict)
    scratch: float = 0.05

    @property
    def factory(self) -> Callable[..., Any]:
        return getattr(sam_optax, self.name)

    def tx(self, rho: Any, base: optax.GradientTransformation, *, always=False, **options: Any):
        """The whole optimizer: the method and the base optimizer, composed as documented.

        ``always`` takes the SAM branch at every step (switching methods).
        """
        hyper = {**self.hyper, **self.always} if always else self.hyper
        if self.wraps:
            return self.factory(base, rho, **hyper, **options)
        return optax.chain(self.factory(rho, **hyper, **options), base)

    def injected(self, rho: Any, base: optax.GradientTransformation, **options: Any):
        """The same through ``optax.inject_hyperparams`` (rho and the numeric hyper injected)."""
        inject = optax.inject_hyperparams(self.factory, static_args=self.static)
        if self.wraps:
            return inject(base, rho, **self.hyper, **options)
        return optax.chain(inject(rho, **self.hyper, **options), base)

    def update(self, tx, grads, state, params, per_example_fn, losses=None):
        """``tx.update`` with the closure (and clean value) this method takes."""
        if self.per_example:
            return tx.update(grads, state, params, value_fn=per_example_fn, value=losses)
        value = None if losses is None else jnp.mean(losses)
        return tx.update(
            grads, state, params, value_fn=lambda p: jnp.mean(per_example_fn(p)), value=value
        )

    def accepts(self, option: str) -> bool:
        return option not in self.refuses


_MOMENT_ONLY = (
    "norm", "adaptive", "eta", "ascent_steps", "second_order", "direction",
    "sync_perturbation", "cosine", "seed",
)  # fmt: skip

_GRADIENT_ONLY = (
    "adaptive", "eta", "ascent_steps", "second_order", "direction", "sync_perturbation",
)  # fmt: skip

# scratch: g and g_SAM together (GSAM, WSAM, LookSAM's SAM steps); g alive
# through the branch (RST, AE-SAM); g and the direction g - sigma m while m is
# updated in place (F-SAM); g and its kept leaves (ESAM with beta < 1).
METHODS = [
    Method("sam"),
    Method("gsam", {"alpha": 0.3}, scratch=1.05),
    Method("looksam", {"every": 2, "alpha": 0.5}, stored=1, scratch=1.05),
    Method("rst", {"probability": 0.5}, always={"probability": 1.0}, scratch=1.05),
    Method("aesam", {"threshold": 0.0}, always={"threshold": -1e9}, scratch=1.05),
    Method("fsam", {"sigma": 0.5}, stored=1, scratch=1.05),
    Method("vasso", {"theta": 0.5}, stored=1),
    Method(
        "esam",
        {"beta": 0.6, "gamma": 0.5},
        per_example=True,
        refuses=("ascent_steps", "second_order", "direction"),
        scratch=1.05,
    ),
    Method("msam", wraps=True, refuses=_MOMENT_ONLY, scratch=0.1),
    Method("wsam", {"gamma": 0.7, "learning_rate": 0.05}, wraps=True, scratch=1.05),
    Method(
        "sampa",
        {"lam": 0.3},
        wraps=True,
        stored=1,
        refuses=(*_GRADIENT_ONLY, "cosine", "seed"),
        scratch=1.05,
    ),
]
BY_NAME = {m.name: m for m in METHODS}


# --------------------------------------------------------------------------
# The contract's problem: a two-layer network, per-example squared errors.
# --------------------------------------------------------------------------


class Problem:
    """A 5-8-3 tanh network on a fixed batch of 16, one loss per example.

    ``params`` is ``{'hidden': {'b', 'w'}, 'out': {'b', 'w'}}``;
    ``batch(i)`` the i-th batch (inputs, targets).
    """

    def __init__(self, seed: int = 0, dtype: Any = jnp.float32, batch: int = 16):
        rng = np.random.default_rng(seed)
        self.params = {
            "hidden": {
                "b": jnp.asarray(rng.normal(size=8) * 0.1, dtype),
                "w": jnp.asarray(rng.normal(size=(5, 8)) / np.sqrt(5), dtype),
            },
            "out": {
                "b": jnp.asarray(rng.normal(size=3) * 0.1, dtype),
                "w": jnp.asarray(rng.normal(size=(8, 3)) / np.sqrt(8), dtype),
            },
        }
        self.dtype = dtype
        self._rng = rng
        self._size = batch

    def batch(self, i: int = 0) -> tuple[jax.Array, jax.Array]:
        rng = np.random.default_rng(1000 + i)
        x = jnp.asarray(rng.normal(size=(self._size, 5)), self.dtype)
        y = jnp.asarray(rng.normal(size=(self._size, 3)), self.dtype)
        return x, y

    @staticmethod
    def per_example(params: Any, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
        x, y = batch
        h = jnp.tanh(x @ params["hidden"]["w"] + params["hidden"]["b"][None, :])
        out = h @ params["out"]["w"] + params["out"]["b"][None, :]
        return jnp.sum((out - y).astype(jnp.float32) ** 2, axis=-1)


def step_fn(method: Method, tx: optax.GradientTransformation, problem: Problem = Problem):
    """A jitted ``step(params, state, batch) -> (params, state)`` of ``tx`` on the problem."""

    @jax.jit
    def step(params, state, batch):
        def per(p):
            return problem.per_example(p, batch)

        (_, losses), grads = jax.value_and_grad(lambda p: (jnp.mean(per(p)), per(p)), has_aux=True)(
            params
        )
        updates, state = method.update(tx, grads, state, params, per, losses)
        return optax.apply_updates(params, updates), state

    return step


def run(method: Method, tx, problem: Problem, steps: int):
    """``steps`` steps on batches 0, 1, ...: the params and states after each."""
    step = step_fn(method, tx, problem)
    params, state = problem.params, tx.init(problem.params)
    history = []
    for t in range(steps):
        params, state = step(params, state, problem.batch(t))
        history.append((params, state))
    return history
