"""examples/language_model.py: the methods train, accumulation nests right, SAM-LoRA's memory.

The accumulation facts are checked on a tiny nonlinear least-squares problem
in plain optax (float32; "equal" is to float32 rounding, 1e-6): what
``optax.MultiSteps`` computes with each family member inside it and outside
it. The example's own ``make_optimizer`` is checked against the same facts.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sam_optax

_PATH = Path(__file__).parent.parent / "examples" / "language_model.py"
_SPEC = importlib.util.spec_from_file_location("language_model", _PATH)
lm = importlib.util.module_from_spec(_SPEC)
sys.modules["language_model"] = lm  # dataclasses resolve the module's annotations through it
_SPEC.loader.exec_module(lm)

TINY = lm.Config(
    steps=12,
    micro_batch=4,
    accumulate=3,
    seq_len=16,
    d_model=32,
    n_layers=1,
    n_heads=2,
    learning_rate=1e-2,
    warmup=2,
    looksam_every=2,
    corpus_bytes=60_000,
    eval_every=6,
    eval_windows=16,
)


@pytest.fixture(scope="module")
def corpus():
    return lm.load_corpus(TINY.corpus_bytes)


def _batch(corpus, config=TINY, seed=0):
    return lm.sample_batch(
        corpus.train, np.random.default_rng(seed), config.micro_batch, config.seq_len
    )


# --------------------------------------------------------------------------
# Data and model.
# --------------------------------------------------------------------------


def test_corpus_is_capped_split_by_file_and_deterministic(corpus):
    assert len(corpus.train) + len(corpus.valid) == TINY.corpus_bytes
    assert corpus.train.dtype == np.uint8 and len(corpus.valid) > 0
    assert not set(corpus.train_files) & set(corpus.valid_files)
    again = lm.load_corpus(TINY.corpus_bytes)
    assert again.valid_files == corpus.valid_files
    np.testing.assert_array_equal(again.train, corpus.train)
    files = lm.stdlib_sources()
    assert files == sorted(files) and all(p.suffix == ".py" for p in files)
    assert not any({"test", "tests", "site-packages"} & set(p.parts) for p in files)
    only = lm.load_corpus(20_000, packages=("json",), valid_every=2)
    assert all(name.startswith("json/") for name in only.train_files + only.valid_files)
    with pytest.raises(ValueError, match="none of them a validation file"):
        lm.load_corpus(1_000)


def test_transformer_is_causal_bfloat16_with_float32_params(corpus):
    model = lm.Transformer(TINY, rngs=nnx.Rngs(0))
    batch = _batch(corpus)
    forward = nnx.jit(lambda model, x: model(x))
    logits = forward(model, batch["inputs"])
    assert logits.shape == (TINY.micro_batch, TINY.seq_len, lm.VOCAB)
    assert logits.dtype == jnp.float32
    assert {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype("float32")}
    assert model.blocks[0].up.dtype == jnp.bfloat16
    changed = forward(model, batch["inputs"].at[:, -1].set((batch["inputs"][:, -1] + 1) % 256))
    np.testing.assert_array_equal(changed[:, :-1], logits[:, :-1])  # t sees 0..t only
    assert not np.array_equal(changed[:, -1], logits[:, -1])


# --------------------------------------------------------------------------
# Training.
# --------------------------------------------------------------------------

# SAM's run is the fast one; the others compile steps of their own (seconds each).
_SLOW = pytest.mark.slow


@pytest.mark.parametrize(
    "method", [m if m == "sam" else pytest.param(m, marks=_SLOW) for m in lm.METHODS]
)
def test_each_method_trains(method, corpus):
    history = lm.train(dataclasses.replace(TINY, method=method), corpus=corpus)
    assert history.valid_step == [0, 6, 12]
    assert history.valid_loss[-1] < history.valid_loss[0] - 0.5, history.valid_loss
    assert all(np.isfinite(history.train_loss))
    if method in ("sam", "msam", "wsam"):  # value= reached SAM: the diagnostic is recorded
        assert all(np.isfinite(history.sharpness)), history.sharpness


def test_donated_step_repeats_and_multisteps_emits_every_k(corpus):
    # TINY's SAM run again: make_optimizer returns the same tx, nnx.jit its compiled step.
    model, optimizer = lm.build(dataclasses.replace(TINY, method="sam"))

    def kernel():
        return np.array(model.blocks[0].up.kernel[...])  # a copy: a view would pin the buffer

    before, changed = kernel(), []
    for i in range(2 * TINY.accumulate):
        old = model.blocks[0].up.kernel[...]
        lm.train_step(model, optimizer, _batch(corpus, seed=i))
        assert old.is_deleted()  # donated: the step wrote over the model's buffers
        now = kernel()
        changed.append(not np.array_equal(now, before))
        before = now
    assert changed == [False, False, True] * 2
    sam_state, accumulation = optimizer.opt_state  # chain(sam, MultiSteps(base))
    assert int(sam_state.count[...]) == 2 * TINY.accumulate  # one per micro-batch
    assert int(accumulation.gradient_step[...]) == 2  # one per optimizer step


# --------------------------------------------------------------------------
# Gradient accumulation: which nesting computes what.
# --------------------------------------------------------------------------

K, LR, RHO = 4, 0.1, 0.05
_RNG = np.random.default_rng(0)
W0 = {"a": jnp.asarray(_RNG.normal(size=3), jnp.float32), "b": jnp.asarray(0.3, jnp.float32)}
XS = jnp.asarray(_RNG.normal(size=(2 * K, 5, 3)), jnp.float32)
YS = jnp.asarray(_RNG.normal(size=(2 * K, 5)), jnp.float32)


def _loss(w, i):
    """Micro-batch ``i``'s loss (nonlinear, so the SAM gradient is not the clean one)."""
    return jnp.mean((jnp.tanh(XS[i] @ w["a"]) + w["b"] - YS[i]) ** 2)


def _batch_loss(j):
    """The mean loss over optimizer step ``j``'s K micro-batches."""
    return lambda w: sum(_loss(w, i) for i in range(j * K, (j + 1) * K)) / K


_grad = jax.jit(jax.grad(_loss))


def _update(tx):
    """``tx.update`` with micro-batch ``i``'s closure and clean loss, jitted (``i`` traced)."""

    @jax.jit
    def update(grads, state, w, i):
        return tx.update(grads, state, w, value_fn=lambda p: _loss(p, i), value=_loss(w, i))

    return update


def _run(tx, micro_steps, w=W0):
    """A training loop: one ``tx.update`` per micro-batch."""
    state, updates, update = tx.init(w), [], _update(tx)
    for i in range(micro_steps):
        u, state = update(_grad(w, i), state, w, i)
        updates.append(u)
        w = optax.apply_updates(w, u)
    return w, updates


def _mean(trees):
    return jax.tree.map(lambda *x: sum(x) / len(x), *trees)


def _axpy(a, x, y):
    return jax.tree.map(lambda x, y: a * x + y, x, y)


def _sam_gradient(w, i, direction):
    """∇L_i(w + ρ d/‖d‖)."""
    return _grad(_axpy(RHO / (optax.tree.norm(direction) + 1e-12), direction, w), i)


def _close(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)


def _differ(a, b, by=1e-3):
    gaps = [float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]
    return max(gaps) > by


def _inside(base):
    return optax.MultiSteps(base, K).gradient_transformation()


def test_sam_outside_multisteps_averages_the_micro_batch_sam_gradients():
    w, updates = _run(optax.chain(sam_optax.sam(RHO), _inside(optax.sgd(LR))), K)
    assert all(not _differ(u, optax.tree.zeros_like(u), 0.0) for u in updates[:-1])
    per_micro = [_sam_gradient(W0, i, _grad(W0, i)) for i in range(K)]
    _close(w, _axpy(-LR, _mean(per_micro), W0))


def test_sam_inside_multisteps_keeps_the_last_micro_batch_perturbed_by_the_mean():
    w, _ = _run(optax.MultiSteps(optax.chain(sam_optax.sam(RHO), optax.sgd(LR)), K), K)
    mean_clean = _mean([_grad(W0, i) for i in range(K)])
    _close(w, _axpy(-LR, _sam_gradient(W0, K - 1, mean_clean), W0))  # 1/k of the data
    right, _ = _run(optax.chain(sam_optax.sam(RHO), _inside(optax.sgd(LR))), K)
    assert _differ(w, right, 0.1)


def _momentum():
    return optax.sgd(LR, momentum=0.9)


def _msam_on_whole_batches(steps):
    tx, w = sam_optax.msam(_momentum(), RHO), W0
    state = tx.init(w)
    for j in range(steps):
        grads = jax.grad(_batch_loss(j))(w)
        u, state = jax.jit(lambda g, s, w, j=j: tx.update(g, s, w, value_fn=_batch_loss(j)))(
            grads, state, w
        )
        w = optax.apply_updates(w, u)
    return w


def test_msam_around_multisteps_finds_the_momentum_and_is_msam_on_the_whole_batch():
    # The base's momentum is read inside MultiSteps' state; it changes once per
    # k micro-batches, so they share one perturbation and their mean is MSAM's
    # gradient on the whole batch (the 2nd step is perturbed: m != 0 there).
    w, _ = _run(sam_optax.msam(_inside(_momentum()), RHO), 2 * K)
    _close(w, _msam_on_whole_batches(2))
    unperturbed, _ = _run(sam_optax.msam(_inside(_momentum()), 0.0), 2 * K)
    assert _differ(w, unperturbed)


def test_msam_inside_multisteps_steps_on_the_last_micro_batch_alone():
    w, _ = _run(optax.MultiSteps(sam_optax.msam(_momentum(), RHO), K), 2 * K)
    base = _momentum()
    state = base.init(W0)
    u, state = base.update(_grad(W0, K - 1), state, W0)  # m = 0: unperturbed
    w1 = optax.apply_updates(W0, u)
    m = state[0].trace
    point = _axpy(-RHO / optax.tree.norm(m), m, w1)
    u, state = base.update(_grad(point, 2 * K - 1), state, w1)
    _close(w, optax.apply_updates(w1, u))
    assert _differ(w, _msam_on_whole_batches(2), 0.1)


def test_looksam_outside_multisteps_is_the_mean_of_its_micro_batch_outputs():
    # LookSAM's state runs on every micro-batch (its period counts micro-batches).
    w, _ = _run(optax.chain(sam_optax.looksam(RHO, every=3), _inside(optax.sgd(LR))), 2 * K)
    look, ref = sam_optax.looksam(RHO, every=3), W0
    state, update = look.init(ref), _update(look)
    for j in range(2):
        outs = []
        for i in range(j * K, (j + 1) * K):
            o, state = update(_grad(ref, i), state, ref, i)
            outs.append(o)
        ref = _axpy(-LR, _mean(outs), ref)
    _close(w, ref)


def test_looksam_inside_multisteps_sees_the_mean_gradient_and_the_last_closure():
    w, _ = _run(
        optax.MultiSteps(optax.chain(sam_optax.looksam(RHO, every=3), optax.sgd(LR)), K), 2 * K
    )
    look, ref = sam_optax.looksam(RHO, every=3), W0
    state, update = look.init(ref), _update(look)
    for j in range(2):  # its count advances once per k micro-batches
        mean_clean = _mean([_grad(ref, i) for i in range(j * K, (j + 1) * K)])
        o, state = update(mean_clean, state, ref, (j + 1) * K - 1)
        ref = _axpy(-LR, o, ref)
    _close(w, ref)


def test_wsam_around_multisteps_folded_averages_decoupled_steps_every_micro_batch():
    alpha = 0.9 / (1 - 0.9)
    w, _ = _run(sam_optax.wsam(_inside(optax.sgd(LR)), RHO, 0.9), K)
    mixed = [
        _axpy(alpha, jax.tree.map(jnp.subtract, _sam_gradient(W0, i, _grad(W0, i)), _grad(W0, i)), _grad(W0, i))
        for i in range(K)
    ]  # fmt: skip
    _close(w, _axpy(-LR, _mean(mixed), W0))
    # Decoupled (learning_rate=): the sharpness step is taken on every
    # micro-batch, outside the accumulation, and moves the params between them.
    w, updates = _run(sam_optax.wsam(_inside(optax.sgd(LR)), RHO, 0.9, learning_rate=LR), K)
    assert all(_differ(u, optax.tree.zeros_like(u)) for u in updates)
    ref, clean = W0, []
    for i in range(K):
        g = _grad(ref, i)
        clean.append(g)
        u = jax.tree.map(lambda s, g: -LR * alpha * (s - g), _sam_gradient(ref, i, g), g)
        if i == K - 1:
            u = _axpy(-LR, _mean(clean), u)
        ref = optax.apply_updates(ref, u)
    _close(w, ref)


@pytest.mark.parametrize("method", ["sam", "msam"])
def test_make_optimizer_nests_sam_outside_the_accumulation(method):
    config = dataclasses.replace(TINY, accumulate=K, rho=RHO)
    w, _ = _run(lm.make_optimizer(method, config), K)
    base = lm.base_optimizer(config)
    if method == "sam":
        grads = _mean([_sam_gradient(W0, i, _grad(W0, i)) for i in range(K)])
    else:  # the first MSAM step: m = 0, the clean mean gradient
        grads = _mean([_grad(W0, i) for i in range(K)])
    u, _ = base.update(grads, base.init(W0), W0)
    _close(w, optax.apply_updates(W0, u))


# --------------------------------------------------------------------------
# LoRA: SAM on the adapters.
# --------------------------------------------------------------------------


# A model whose params dominate its activations, as in LLM fine-tuning.
LORA = dataclasses.replace(
    TINY, d_model=64, n_heads=4, n_layers=1, seq_len=8, micro_batch=1, accumulate=1, lora_rank=4
)


@pytest.fixture(scope="module")
def lora_steps(corpus):
    """Plain LoRA and SAM-LoRA built from one model, their steps compiled (XLA's analysis)."""
    pretrained = lm.Transformer(dataclasses.replace(LORA, lora_rank=0), rngs=nnx.Rngs(0))
    batch = _batch(corpus, LORA)
    out = {"pretrained": pretrained, "batch": batch}
    for method in ("adamw", "sam"):
        model, optimizer = lm.build(
            dataclasses.replace(LORA, method=method), lm.copy_model(pretrained)
        )
        out[method] = (model, optimizer, lm.step_memory(model, optimizer, batch))
    return out


def test_adapter_mask_selects_the_lora_params(lora_steps):
    model = lora_steps["sam"][0]
    adapters = {path for path, _ in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))}
    assert len(adapters) == 4 * 2 * LORA.n_layers  # a and b of qkv, out, up, down
    for params in (nnx.state(model, nnx.Param), nnx.as_pure(nnx.state(model, nnx.Param))):
        mask = lm.adapter_mask(model)(params)
        chosen = {path for path, on in nnx.to_flat_state(nnx.as_pure(mask)) if on}
        assert chosen == adapters
    # With it, SAM moves the adapters alone: for L = |w|^2 / 2 the gradient at
    # w + eps is w + eps, so SAM's output minus w is eps (its direction from
    # the incoming gradient, here all ones).
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    sam = sam_optax.sam(0.1, mask=lm.adapter_mask(model))
    half_square = lambda p: 0.5 * sum(jnp.sum(x**2) for x in jax.tree.leaves(p))  # noqa: E731
    update = jax.jit(lambda g, s, p: sam.update(g, s, p, value_fn=half_square))
    out, _ = update(jax.tree.map(jnp.ones_like, params), sam.init(params), params)
    eps = jax.tree.map(jnp.subtract, out, params)
    moved = {path for path, e in nnx.to_flat_state(eps) if float(jnp.max(jnp.abs(e))) > 0}
    assert moved == adapters


def test_sam_lora_memory_over_plain_lora_is_not_model_sized(lora_steps):
    plain, sam = lora_steps["adamw"][2], lora_steps["sam"][2]
    extra, adapters = sam["temp"] - plain["temp"], sam["trained"]
    # What SAM-LoRA keeps beyond LoRA is activations (it does not change with
    # the depth or the LoRA rank, it grows with the tokens and d_model:
    # 8-17 bytes a token per unit of d_model from d_model 32 to 256,
    # benchmarks/language_model.py --memory-only), plus at most the adapters'
    # gradient and perturbed copy.
    tokens = LORA.micro_batch * LORA.seq_len
    assert extra <= 2 * adapters + 20 * LORA.d_model * tokens, (extra, adapters)
    assert extra <= 0.05 * sam["params"], (extra, sam["params"])


def test_sam_lora_perturbs_and_trains_the_adapters_alone(lora_steps, corpus):
    model, optimizer, _ = lora_steps["sam"]
    pretrained, batch = lora_steps["pretrained"], lora_steps["batch"]
    forward = nnx.jit(lambda model, x: model(x))
    np.testing.assert_array_equal(
        forward(model, batch["inputs"]), forward(pretrained, batch["inputs"])
    )
    for i in range(2):
        lm.train_step(model, optimizer, _batch(corpus, LORA, seed=i))
    assert _differ(model.blocks[0].up.lora.lora_b[...], jnp.zeros(()), 0.0)
    np.testing.assert_array_equal(
        model.blocks[0].up.kernel[...], pretrained.blocks[0].up.kernel[...]
    )
    assert np.isfinite(float(optax.tree.get(optimizer.opt_state, "sharpness")[...]))


def _hand_written_sam_lora_step(rho):
    """SAM on the adapters written out by hand: two gradients, one update."""

    @functools.partial(nnx.jit, donate_argnames=("model", "optimizer"))
    def step(model, optimizer, batch):
        graphdef, adapters, rest = nnx.split(model, nnx.LoRAParam, ...)

        def loss(adapters):
            return lm.loss_fn(nnx.merge(graphdef, adapters, rest), batch)

        value, grads = jax.value_and_grad(loss)(adapters)
        scale = rho / (optax.tree.norm(grads) + 1e-12)
        perturbed = jax.tree.map(lambda a, g: a + scale * g, adapters, grads)
        optimizer.update(model, jax.grad(loss)(perturbed))
        return value

    return step


def test_sam_lora_is_the_hand_written_step_and_holds_what_it_holds(lora_steps, corpus):
    # The floor: plain LoRA's optimizer driven by SAM written out by hand.
    # The library's SAM-LoRA takes the same steps (to the rounding of a
    # bfloat16 forward) and its memory exceeds the hand-written step's by
    # less than the adapters' bytes: what both hold beyond plain LoRA (the
    # test above) is SAM's under XLA, not this library's. (d_model 64, 1,024
    # tokens: library 538,112 bytes over LoRA, hand-written 525,824,
    # adapters 16,384.)
    pretrained, batch = lora_steps["pretrained"], lora_steps["batch"]
    model, optimizer = lm.build(
        dataclasses.replace(LORA, method="adamw"), lm.copy_model(pretrained)
    )
    step = _hand_written_sam_lora_step(lm.DEFAULT_RHO["sam"])
    compiled = step.lower(model, optimizer, batch).compile()
    hand = int(compiled.memory_analysis().temp_size_in_bytes)
    ours = lora_steps["sam"][2]
    assert ours["temp"] <= hand + ours["trained"], (ours["temp"], hand, ours["trained"])

    config = dataclasses.replace(LORA, method="sam")
    sam_model, sam_optimizer = lm.build(config, lm.copy_model(pretrained))
    for i in range(3):
        step(model, optimizer, _batch(corpus, LORA, seed=10 + i))
        lm.train_step(sam_model, sam_optimizer, _batch(corpus, LORA, seed=10 + i))
    assert _differ(model.blocks[0].up.lora.lora_b[...], jnp.zeros(()), 0.0)
    ours_leaves = jax.tree.leaves(nnx.state(sam_model, nnx.LoRAParam))
    hand_leaves = jax.tree.leaves(nnx.state(model, nnx.LoRAParam))
    assert len(ours_leaves) == len(hand_leaves) == 4 * 2 * LORA.n_layers
    for ours_leaf, hand_leaf in zip(ours_leaves, hand_leaves):
        np.testing.assert_allclose(ours_leaf, hand_leaf, rtol=0, atol=1e-3 * config.learning_rate)


@pytest.mark.slow
def test_sam_lora_extra_memory_does_not_grow_with_depth(corpus):
    # Four times the blocks, four times the adapters and about three times the
    # params: the extra over plain LoRA stays the same (to a layer's adapters).
    extras = {}
    for layers in (1, 4):
        config = dataclasses.replace(LORA, n_layers=layers)
        pretrained = lm.Transformer(dataclasses.replace(config, lora_rank=0), rngs=nnx.Rngs(0))
        batch = _batch(corpus, config)
        temp = {}
        for method in ("adamw", "sam"):
            run = dataclasses.replace(config, method=method)
            model, optimizer = lm.build(run, lm.copy_model(pretrained))
            temp[method] = lm.step_memory(model, optimizer, batch)
        extras[layers] = temp["sam"]["temp"] - temp["adamw"]["temp"]
        adapters = temp["sam"]["trained"]
    assert abs(extras[4] - extras[1]) <= adapters / 4, (extras, adapters)


@pytest.mark.slow
def test_sam_on_the_adapters_while_every_param_trains(lora_steps, corpus):
    config = dataclasses.replace(LORA, method="sam", train_base=True)
    pretrained = lora_steps["pretrained"]
    model, optimizer = lm.build(config, lm.copy_model(pretrained))
    assert optimizer.wrt is nnx.Param
    for i in range(2):
        lm.train_step(model, optimizer, _batch(corpus, LORA, seed=i))
    assert _differ(model.blocks[0].up.kernel[...], pretrained.blocks[0].up.kernel[...], 0.0)
    assert _differ(model.blocks[0].up.lora.lora_b[...], jnp.zeros(()), 0.0)


# --------------------------------------------------------------------------
# The command line.
# --------------------------------------------------------------------------


def test_command_line_sizes(monkeypatch):
    monkeypatch.delenv("SAM_OPTAX_FULL", raising=False)
    args, config = lm.parse_args(["--method", "msam", "--steps", "7", "--rho", "0.5"])
    assert (args.method, config.steps, config.rho, config.d_model) == ("msam", 7, 0.5, 64)
    monkeypatch.setenv("SAM_OPTAX_FULL", "1")
    _, config = lm.parse_args(["--steps", "7"])
    assert (config.steps, config.d_model) == (7, lm.FULL["d_model"])  # the flag wins
    with pytest.raises(SystemExit):
        lm.parse_args(["--method", "adam"])


@pytest.mark.slow
def test_main_runs_a_tiny_config(capsys):
    tiny = ["--steps", "2", "--micro-batch", "2", "--seq-len", "16", "--d-model", "32"]
    tiny += ["--n-layers", "1", "--n-heads", "2", "--corpus-bytes", "60000", "--eval-every", "1"]
    results = lm.main(["--method", "sam", *tiny])
    assert set(results) == {"sam"} and len(results["sam"].valid_loss) == 3
    assert "| sam |" in capsys.readouterr().out


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--steps", "0"], "--steps must be an integer >= 1"),
        (["--accumulate", "0"], "--accumulate must be an integer >= 1"),
        (["--micro-batch", "0"], "--micro-batch must be an integer >= 1"),
        (["--eval-every", "0"], "--eval-every must be an integer >= 1"),
        (["--rho", "-1"], "--rho must be a finite number >= 0"),
        (["--n-heads", "3"], "--n-heads 3 must divide --d-model 64"),
        (["--train-base"], "--train-base goes with --lora"),
    ],
)
def test_command_line_refuses_bad_values_naming_the_flag(flags, named, monkeypatch, capsys):
    monkeypatch.delenv("SAM_OPTAX_FULL", raising=False)
    with pytest.raises(SystemExit) as exit_:
        lm.parse_args(flags)
    assert exit_.value.code == 2
    assert named in capsys.readouterr().err
