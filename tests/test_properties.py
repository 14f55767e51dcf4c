"""Property-based tests of the core (hypothesis): random pytrees, dtypes, masks, norms, variants.

Each property runs ``EXAMPLES`` random cases (``FACTORY_EXAMPLES`` for the
one that runs every factory), shrunk to a minimal one on failure; the
``@example``s are cases kept as regression tests. ``SAM_OPTAX_EXAMPLES=N``
runs N cases of each (a deeper search than CI's).
"""

import math
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck
from hypothesis import example
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import sam_optax

from family import METHODS
from helpers import np_eps_p

EXAMPLES = int(os.environ.get("SAM_OPTAX_EXAMPLES", 25))
DTYPES = {
    "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
    "float32": np.float32,
    "float64": np.float64,
    "complex64": np.complex64,
}
# Relative accuracy an output of each dtype can have.
RTOL = {"float16": 4e-3, "bfloat16": 2e-2, "float32": 2e-6, "float64": 1e-12, "complex64": 2e-6}

FACTORY_EXAMPLES = int(
    os.environ.get("SAM_OPTAX_EXAMPLES", 12)
)  # each example compiles a factory's update: the costliest property
PROPERTY = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@st.composite
def trees(draw, dtype=None, zeros=False):
    """A nested dict/tuple of 1 to 4 arrays, 0-d to 4-d, one dtype, and a mask over it.

    Values are kept away from 0 (the sphere properties need a non-zero
    gradient); with ``zeros=True`` any leaf may be all zeros instead.
    """
    dtype = dtype or draw(st.sampled_from(sorted(DTYPES)))
    n = draw(st.integers(1, 4))
    # A sign and a magnitude in [2^-6, 3], built rather than filtered (a filter
    # on |v| trips hypothesis's filter_too_much health check on some seeds).
    away_from_zero = st.builds(
        lambda negative, v: -v if negative else v,
        st.booleans(),
        st.floats(2**-6, 3, width=32),
    )
    leaves = []
    for _ in range(n):
        shape = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=4)))
        size = int(np.prod(shape))
        values = draw(
            st.lists(
                away_from_zero,
                min_size=size * (2 if dtype == "complex64" else 1),
                max_size=size * (2 if dtype == "complex64" else 1),
            )
        )
        x = np.asarray(values, np.float64)
        if zeros and draw(st.booleans()):
            x = np.zeros_like(x)
        if dtype == "complex64":
            x = x[:size] + 1j * x[size:]
        leaves.append(x.reshape(shape).astype(DTYPES[dtype]))
    layout = draw(st.sampled_from(["dict", "tuple", "nested"]))
    if layout == "dict":
        tree = {f"p{i}": x for i, x in enumerate(leaves)}
    elif layout == "tuple":
        tree = tuple(leaves)
    else:
        tree = {"a": tuple(leaves[:1]), "b": {f"c{i}": x for i, x in enumerate(leaves[1:])}}
    mask = jax.tree.map(lambda _: draw(st.booleans()), tree)
    if not any(jax.tree.leaves(mask)):
        mask = jax.tree.map(lambda _: True, tree)
    return dtype, tree, mask  # numpy leaves: made jax arrays inside the test's x64 context


def _selected(tree, mask):
    parts = [
        np.asarray(x).astype(np.complex128 if np.iscomplexobj(x) else np.float64).ravel()
        for x, m in zip(jax.tree.leaves(tree), jax.tree.leaves(mask))
        if m
    ]
    return np.concatenate(parts)


def _p_norm(v, p):
    a = np.abs(v)
    return a.max() if np.isinf(p) else np.sum(a**p) ** (1 / p)


NORMS = st.sampled_from([2.0, 3.0, 1.5, math.inf])


@PROPERTY
@given(case=trees(), rho=st.floats(1e-3, 2.0), p=NORMS)
@example(  # a 0-d bfloat16 leaf alone: the norm must not round to zero
    case=("bfloat16", {"p0": np.asarray(0.0117, ml_dtypes.bfloat16)}, {"p0": True}), rho=0.5, p=2.0
)
def test_ascent_direction_lies_on_the_sphere_and_keeps_dtypes(case, rho, p):
    dtype, grads, mask = case
    with jax.enable_x64(dtype == "float64"):
        grads = jax.tree.map(jnp.asarray, grads)
        out = sam_optax.ascent_direction(grads, rho, norm=p, mask=mask, eps=0.0)
        for g, o, m in zip(jax.tree.leaves(grads), jax.tree.leaves(out), jax.tree.leaves(mask)):
            assert o.dtype == g.dtype and o.shape == g.shape
            assert np.all(np.isfinite(np.asarray(o).astype(np.complex128)))
            if not m:
                assert np.all(np.asarray(o) == 0)
        norm = _p_norm(_selected(out, mask), p)
        tol = RTOL[dtype] * (8 if p in (1.5, 3.0) else 2)
        np.testing.assert_allclose(norm, rho, rtol=tol)


@PROPERTY
@given(case=trees(dtype="float64"), rho=st.floats(1e-3, 2.0), p=NORMS)
def test_ascent_direction_is_eq2_in_float64(case, rho, p):
    _, grads, mask = case
    with jax.enable_x64(True):
        grads = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), grads)
        out = sam_optax.ascent_direction(grads, rho, norm=p, mask=mask, eps=0.0)
        np.testing.assert_allclose(
            _selected(out, mask), np_eps_p(_selected(grads, mask), rho, p), rtol=1e-10, atol=1e-14
        )


def _loss(tree):
    return sum(
        jnp.sum(jnp.abs(x.astype(jnp.complex64 if jnp.iscomplexobj(x) else jnp.float32)) ** 2)
        + 0.1 * jnp.sum(jnp.abs(x.astype(jnp.float32)) ** 4 if not jnp.iscomplexobj(x) else 0.0)
        for x in jax.tree.leaves(tree)
    )


# Every method of the registry (tests/family.py), and sam's own variants.
FACTORIES = {m.name: m for m in METHODS}
SAM_VARIANTS = {"sam-adaptive": {"adaptive": True}, "sam-steps2": {"ascent_steps": 2}}


def _build(name, rho, p, mask, base):
    """The whole optimizer: ``name``'s method (its norm p where it takes one) and ``base``."""
    method = FACTORIES.get(name, FACTORIES["sam"])
    options = {"mask": mask, **SAM_VARIANTS.get(name, {})}
    if method.accepts("norm"):
        options["norm"] = p
    return method, method.tx(rho, base, **options)


def _per_example(tree):
    """Two "examples" whose mean is the loss (ESAM takes per-example losses)."""
    loss = jnp.real(_loss(tree))
    return jnp.stack([0.5 * loss, 1.5 * loss])


@settings(PROPERTY, max_examples=FACTORY_EXAMPLES)
@given(
    case=trees(zeros=True),
    rho=st.floats(1e-3, 1.0),
    p=NORMS,
    name=st.sampled_from(sorted([*FACTORIES, *SAM_VARIANTS])),
)
def test_every_factory_keeps_dtypes_and_stays_finite(case, rho, p, name):
    # Random masks, zero leaves (a zero gradient), every dtype, two steps.
    _, params, mask = case
    params = jax.tree.map(jnp.asarray, params)
    method, tx = _build(name, rho, p, mask, optax.sgd(0.1, momentum=0.9))
    state = tx.init(params)
    for _ in range(2):  # the second step reuses stored state (looksam, fsam, msam)
        grads = optax.tree.conj(jax.grad(lambda t: jnp.real(_loss(t)))(params))
        out, state = method.update(tx, grads, state, params, _per_example)
        for o, w in zip(jax.tree.leaves(out), jax.tree.leaves(params)):
            assert o.dtype == w.dtype and o.shape == w.shape
            assert np.all(np.isfinite(np.asarray(o).astype(np.complex128)))
        params = optax.apply_updates(params, out)


@PROPERTY
@given(case=trees(zeros=True), name=st.sampled_from(sorted([*FACTORIES, *SAM_VARIANTS])))
def test_rho_zero_hands_on_the_base_step_unchanged(case, name):
    _, params, mask = case
    params = jax.tree.map(jnp.asarray, params)
    base = optax.sgd(0.1, momentum=0.9)
    method, tx = _build(name, 0.0, 2.0, mask, base)
    grads = jax.tree.map(lambda x: x * 0.5 + 1, params)
    out, _ = method.update(tx, grads, tx.init(params), params, _per_example)
    want, _ = base.update(grads, base.init(params), params)
    for o, g in zip(jax.tree.leaves(out), jax.tree.leaves(want)):
        assert o.dtype == g.dtype
        np.testing.assert_array_equal(np.asarray(o), np.asarray(g))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_strategies_cover_what_they_claim(dtype):
    # A guard on the generator itself: leaves of every rank and the dtype asked for.
    @settings(PROPERTY, max_examples=30)
    @given(case=trees(dtype=dtype))
    def collect(case):
        seen.update(x.ndim for x in jax.tree.leaves(case[1]))
        assert all(x.dtype == np.dtype(DTYPES[dtype]) for x in jax.tree.leaves(case[1]))

    seen: set[int] = set()
    collect()
    assert len(seen) >= 3, seen
