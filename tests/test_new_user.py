"""What a new user wrote, from the docs alone, and must not crash or silently mislead (issue 26).

Each test provokes one finding of the second new-user trial through the
public API, the way the user did.
"""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys
import typing
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sam_optax
from sam_optax import parallel
from sam_optax.flax import nnx_train_step

from family import METHODS


def _parabola(w):
    return jnp.sum((w - 1.0) ** 2)


def _loss(w, batch):
    return jnp.mean((batch @ w - 1.0) ** 2)


BATCH = jnp.asarray(np.random.default_rng(0).normal(size=(8, 3)), jnp.float32)


def _user_warnings(record):
    return [str(r.message) for r in record if issubclass(r.category, UserWarning)]


# 4. The SAM method after the base optimizer turns training into ascent.


@pytest.mark.parametrize("base", [optax.sgd(0.1), optax.adam(0.05)], ids=["sgd", "adam"])
def test_sam_after_the_base_optimizer_is_named_at_the_first_steps(base):
    wrong = optax.chain(base, sam_optax.sam(0.05))
    step = parallel.grouped_step(_loss, wrong)
    w = jnp.zeros(3)
    state = wrong.init(w)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(5):
            w, state, _ = step(w, state, BATCH)
    (message,) = _user_warnings(record)  # once
    assert "went downhill" in message and "optax.chain(sam_optax.sam(rho), base)" in message


def test_the_right_order_is_not_warned_about():
    right = optax.chain(sam_optax.sam(0.05), optax.sgd(0.1))
    step = parallel.grouped_step(_loss, right)
    w = jnp.zeros(3)
    state = right.init(w)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(8):
            w, state, value = step(w, state, BATCH)
    assert not _user_warnings(record)
    assert float(value) < float(_loss(jnp.zeros(3), BATCH))


def test_nnx_train_step_names_the_wrong_order():
    model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(
        model, optax.chain(optax.sgd(0.1), sam_optax.sam(0.05)), wrt=nnx.Param
    )
    step = nnx_train_step(lambda m, x: jnp.mean((m(x) - 1.0) ** 2))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(5):
            step(model, optimizer, BATCH)
    assert any("went downhill" in m for m in _user_warnings(record))


# 5. value= of the wrong shape.


def test_value_of_the_wrong_shape_is_refused():
    tx = optax.chain(sam_optax.sam(0.05), optax.sgd(0.1))
    w = jnp.zeros(3)
    grads = jax.grad(_parabola)(w)
    with pytest.raises(ValueError, match=r"value= must be the clean loss.*shape \(3,\)"):
        tx.update(grads, tx.init(w), w, value_fn=_parabola, value=jnp.ones(3))
    with pytest.raises(TypeError, match="value= must be"):
        tx.update(grads, tx.init(w), w, value_fn=_parabola, value="0.5")
    tx.update(grads, tx.init(w), w, value_fn=_parabola, value=_parabola(w))  # a scalar is fine


# 6. Diagnostics that read NaN in a per-step log.


def test_the_builders_and_helpers_record_sharpness():
    tx = optax.chain(sam_optax.looksam(0.05, every=3), optax.sgd(0.1))
    step = parallel.grouped_step(_loss, tx)
    w = jnp.zeros(3)
    state = tx.init(w)
    for _ in range(5):  # LookSAM's cheap steps keep the last SAM step's value
        w, state, _ = step(w, state, BATCH)
        assert np.isfinite(float(optax.tree.get(state, "sharpness")))

    model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(
        model, optax.chain(sam_optax.sam(0.05), optax.sgd(0.1)), wrt=nnx.Param
    )
    nnx_train_step(lambda m, x: jnp.mean((m(x) - 1.0) ** 2))(model, optimizer, BATCH)
    assert np.isfinite(float(optax.tree.get(optimizer.opt_state, "sharpness")))


# 7. msam / wsam swapped in like the other methods.


@pytest.mark.parametrize("factory", [sam_optax.msam, sam_optax.wsam], ids=["msam", "wsam"])
def test_a_wrapping_method_given_rho_first_names_the_call(factory):
    name = factory.__name__
    with pytest.raises(
        TypeError, match=rf"{name} wraps the base optimizer.*sam_optax\.{name}\(optax\.sgd"
    ):
        factory(0.05)


# 8. ESAM through inject_hyperparams.


def test_esam_injected_with_its_defaults_runs_under_jit():
    per_example = lambda w: (BATCH @ w - 1.0) ** 2  # noqa: E731
    w = jnp.zeros(3)
    grads = jax.grad(lambda w: jnp.mean(per_example(w)))(w)
    for tx in (
        optax.inject_hyperparams(sam_optax.esam, static_args=("gamma",))(rho=0.05),
        optax.inject_hyperparams(sam_optax.esam)(rho=0.05, gamma=0.5),
    ):
        updates, _ = jax.jit(lambda s, tx=tx: tx.update(grads, s, w, value_fn=per_example))(
            tx.init(w)
        )
        assert np.all(np.isfinite(np.asarray(updates)))
    # gamma injected (traced) selects the examples a static gamma selects.
    injected = optax.inject_hyperparams(sam_optax.esam)(rho=0.05, gamma=0.5)
    static = sam_optax.esam(0.05, gamma=0.5)
    a = jax.jit(lambda s: injected.update(grads, s, w, value_fn=per_example)[0])(injected.init(w))
    b = static.update(grads, static.init(w), w, value_fn=per_example)[0]
    np.testing.assert_allclose(a, b, rtol=1e-6)


# 9. sam_optax.flax without Flax.


def test_sam_optax_flax_without_flax_says_what_to_install():
    code = "import sys; sys.modules['flax'] = None; import sam_optax.flax"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 1
    assert "pip install 'flax>=0.12.7'" in out.stderr and "pip install -e '.[flax]'" in out.stderr


# 17. The options visible to help(), IDEs and type checkers.


def test_every_factory_shows_the_option_names():
    hints = typing.get_type_hints(sam_optax.SAMOptionKeywords)
    fields = typing.get_type_hints(sam_optax.SAMOptions)
    assert set(hints) - {"options"} == {f.name for f in dataclasses.fields(sam_optax.SAMOptions)}
    for name, kind in fields.items():  # the same types, written the same way
        assert kind == hints[name], name
    for method in METHODS:
        options = inspect.signature(method.factory).parameters["options"]
        assert options.kind is inspect.Parameter.VAR_KEYWORD
        assert options.annotation == "Unpack[SAMOptionKeywords]", method.name


def test_infinite_hyperparameters_and_a_frozen_vasso_are_refused():
    # sam(inf) trained straight to NaN; vasso(theta=0) never moves its direction.
    for make, expected in (
        (lambda: sam_optax.sam(float("inf")), "rho must be a finite number"),
        (lambda: sam_optax.looksam(0.1, alpha=float("inf")), "alpha must be a finite number"),
        (lambda: sam_optax.vasso(0.1, theta=0.0), r"theta must be in \(0, 1\]"),
    ):
        with pytest.raises(ValueError, match=expected):
            make()
    sam_optax.vasso(0.1, theta=1.0)  # theta = 1 is SAM
