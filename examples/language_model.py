"""A byte-level language model trained with SAM: AdamW, SAM, MSAM, LookSAM side by side.

    python examples/language_model.py --method sam --steps 200
    python examples/language_model.py --method all            # the four methods, one table
    python examples/language_model.py --method sam --lora 8   # LoRA fine-tuning, SAM on the adapters
    SAM_OPTAX_FULL=1 python examples/language_model.py --method all  # the full size (or --full)

A decoder-only transformer in Flax NNX (token and learned position
embeddings, pre-norm blocks of causal multi-head self-attention and an MLP, a
final norm and an output projection; bfloat16 compute, float32 params) reads
bytes (a vocabulary of 256) of the one text every Python installation has
offline: the source files of its standard library. The files are sorted and
split by file (every tenth one is validation); nothing is downloaded.

The optimizer is the way large models are trained today: AdamW with a
warmup-cosine schedule, gradients clipped by their global norm, gradients
accumulated over micro-batches with ``optax.MultiSteps``, one ``nnx.jit``
step that donates the model and the optimizer. SAM sits OUTSIDE the
accumulation, ``optax.chain(sam_optax.sam(rho), optax.MultiSteps(base,
k).gradient_transformation())``: each micro-batch is perturbed with its own
gradient and the base optimizer steps on the mean of the k SAM gradients.
``optax.MultiSteps(optax.chain(sam, base), k)`` would hand the base
optimizer the last micro-batch's SAM gradient alone, perturbed along the
running mean of the clean gradients (see ``make_optimizer``).

LoRA (``--lora RANK``): the linear layers of the blocks become
``nnx.LoRALinear``; with ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)`` the
params SAM sees, perturbs and the base optimizer updates are the adapters
alone. ``--train-base`` trains every param and SAM perturbs the adapters
only, through its ``mask=`` option (``adapter_mask``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import statistics
import sysconfig
import time
from collections.abc import Callable
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import sam_optax
from sam_optax import flax as sam_flax

VOCAB = 256  # bytes
METHODS = ("adamw", "sam", "msam", "looksam", "wsam")
#: Each method's default radius. MSAM's is a step along the unit momentum
#: (not scaled by a gradient norm); its authors use larger radii than SAM's.
DEFAULT_RHO = {"adamw": 0.0, "sam": 0.05, "msam": 0.3, "looksam": 0.05, "wsam": 0.05}
#: Folders of the standard library left out: tests (not installed everywhere,
#: and large) and third-party packages.
SKIPPED_FOLDERS = frozenset({"test", "tests", "site-packages", "dist-packages", "__pycache__"})


# --------------------------------------------------------------------------
# Configuration.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Config:
    """One training run. The defaults train a method in under a minute on a laptop CPU."""

    method: str = "adamw"
    steps: int = 200  # optimizer steps
    micro_batch: int = 8  # sequences per micro-batch
    accumulate: int = 2  # micro-batches per optimizer step (optax.MultiSteps)
    seq_len: int = 64
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    mlp_ratio: int = 4
    dtype: str = "bfloat16"  # compute dtype; params are float32
    learning_rate: float = 3e-3
    end_learning_rate: float = 3e-4
    warmup: int = 20
    weight_decay: float = 0.1
    clip: float = 1.0
    rho: float | None = None  # None: DEFAULT_RHO[method]
    looksam_every: int = 5
    looksam_alpha: float = 0.7  # weight of the reused direction (LookSAM's default)
    wsam_gamma: float = 0.9
    lora_rank: int = 0  # > 0: the blocks' linear layers carry LoRA adapters
    train_base: bool = False  # with LoRA: train every param, SAM perturbs the adapters only
    corpus_bytes: int = 1_000_000
    packages: tuple[str, ...] | None = None  # only these top-level stdlib folders
    exclude: tuple[str, ...] = ()  # leave out these top-level stdlib folders
    eval_every: int = 25
    eval_windows: int = 64
    seed: int = 0


#: The full size, for an accelerator (hours on a CPU): a 3.4M-param model on
#: the whole standard library, 64 sequences of 256 bytes an optimizer step.
FULL = {
    "steps": 2000,
    "micro_batch": 16,
    "accumulate": 4,
    "seq_len": 256,
    "d_model": 256,
    "n_layers": 4,
    "n_heads": 8,
    "learning_rate": 1e-3,
    "end_learning_rate": 1e-4,
    "warmup": 100,
    "corpus_bytes": 20_000_000,
    "eval_every": 100,
    "eval_windows": 256,
}


def full_size() -> bool:
    """Whether ``SAM_OPTAX_FULL=1`` asks for the full size."""
    return os.environ.get("SAM_OPTAX_FULL") == "1"


# --------------------------------------------------------------------------
# Data: the standard library's source, bytes as tokens.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Byte streams (``uint8``) of the training and validation files, and the files' names."""

    train: np.ndarray
    valid: np.ndarray
    train_files: tuple[str, ...]
    valid_files: tuple[str, ...]


def stdlib_sources(
    root: str | Path | None = None,
    *,
    packages: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
) -> list[Path]:
    """The standard library's ``*.py`` files, sorted; tests and third-party folders left out."""
    root = Path(sysconfig.get_paths()["stdlib"] if root is None else root)
    files = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if SKIPPED_FOLDERS & set(parts[:-1]):
            continue
        top = parts[0] if len(parts) > 1 else ""
        if packages is not None and top not in packages:
            continue
        if top in exclude:
            continue
        files.append(path)
    return files


def load_corpus(
    max_bytes: int = 1_000_000,
    *,
    valid_every: int = 10,
    packages: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    root: str | Path | None = None,
) -> Corpus:
    """Reads the standard library's sources, at most ``max_bytes`` of them, split by file.

    Files are taken in sorted order until ``max_bytes`` are read (the last
    one cut); every ``valid_every``-th file is validation, the others
    training: the split depends on the file names only.
    """
    if valid_every < 2:
        raise ValueError(f"valid_every must be at least 2, got valid_every={valid_every!r}.")
    files = stdlib_sources(root, packages=packages, exclude=exclude)
    if not files:
        raise ValueError(f"no Python source found (packages={packages!r}, exclude={exclude!r}).")
    base = Path(sysconfig.get_paths()["stdlib"] if root is None else root)
    parts: dict[bool, list[bytes]] = {True: [], False: []}
    names: dict[bool, list[str]] = {True: [], False: []}
    left = max_bytes
    for i, path in enumerate(files):
        if left <= 0:
            break
        with path.open("rb") as f:
            data = f.read(left)
        left -= len(data)
        is_valid = i % valid_every == valid_every - 1
        parts[is_valid].append(data)
        names[is_valid].append(str(path.relative_to(base)))
    if not parts[True]:
        raise ValueError(
            f"max_bytes={max_bytes} reads {len(names[False])} files, none of them a validation "
            f"file (every {valid_every}th): read more bytes, or pass a smaller valid_every."
        )
    train, valid = (np.frombuffer(b"".join(parts[v]), np.uint8) for v in (False, True))
    return Corpus(train, valid, tuple(names[False]), tuple(names[True]))


def sample_batch(
    tokens: np.ndarray, rng: np.random.Generator, batch: int, seq_len: int
) -> dict[str, jax.Array]:
    """``batch`` random windows of ``seq_len + 1`` bytes: inputs and next-byte targets."""
    starts = rng.integers(0, len(tokens) - seq_len - 1, batch)
    windows = tokens[starts[:, None] + np.arange(seq_len + 1)[None, :]].astype(np.int32)
    return {"inputs": jnp.asarray(windows[:, :-1]), "targets": jnp.asarray(windows[:, 1:])}


def eval_windows(tokens: np.ndarray, count: int, seq_len: int) -> dict[str, jax.Array]:
    """``count`` windows evenly spaced over ``tokens``: the same for every run."""
    starts = np.linspace(0, len(tokens) - seq_len - 1, count).astype(np.int64)
    windows = tokens[starts[:, None] + np.arange(seq_len + 1)[None, :]].astype(np.int32)
    return {"inputs": jnp.asarray(windows[:, :-1]), "targets": jnp.asarray(windows[:, 1:])}


# --------------------------------------------------------------------------
# The model.
# --------------------------------------------------------------------------


def _dense_factory(config: Config, rngs: nnx.Rngs) -> Callable[[int, int], nnx.Linear]:
    """``dense(in, out)``: an ``nnx.Linear``, or an ``nnx.LoRALinear`` when ``config.lora_rank``."""
    dtype = jnp.dtype(config.dtype)
    kwargs = {"dtype": dtype, "param_dtype": jnp.float32, "rngs": rngs}
    if config.lora_rank:
        return functools.partial(
            nnx.LoRALinear, lora_rank=config.lora_rank, lora_dtype=dtype, **kwargs
        )
    return functools.partial(nnx.Linear, **kwargs)


def _norm(features: int, config: Config, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(
        features, dtype=jnp.dtype(config.dtype), param_dtype=jnp.float32, rngs=rngs
    )


class CausalSelfAttention(nnx.Module):
    """Multi-head self-attention where position t sees positions 0..t."""

    def __init__(self, config: Config, dense: Callable[[int, int], nnx.Linear]):
        if config.d_model % config.n_heads:
            raise ValueError(
                f"d_model={config.d_model} is not a multiple of n_heads={config.n_heads}."
            )
        self.n_heads = config.n_heads
        self.qkv = dense(config.d_model, 3 * config.d_model)
        self.out = dense(config.d_model, config.d_model)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        q, k, v = jnp.split(self.qkv(x).reshape(b, t, 3 * self.n_heads, d // self.n_heads), 3, 2)
        y = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.reshape(b, t, d))


class Block(nnx.Module):
    """Pre-norm transformer block: ``x + attention(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, config: Config, dense: Callable[[int, int], nnx.Linear], rngs: nnx.Rngs):
        d, hidden = config.d_model, config.mlp_ratio * config.d_model
        self.attention_norm = _norm(d, config, rngs)
        self.attention = CausalSelfAttention(config, dense)
        self.mlp_norm = _norm(d, config, rngs)
        self.up = dense(d, hidden)
        self.down = dense(hidden, d)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attention(self.attention_norm(x))
        return x + self.down(jax.nn.gelu(self.up(self.mlp_norm(x))))


class Transformer(nnx.Module):
    """A decoder-only transformer on bytes: ``model(tokens) -> logits`` (float32)."""

    def __init__(self, config: Config, *, rngs: nnx.Rngs):
        dense = _dense_factory(config, rngs)
        init = nnx.initializers.normal(0.02)
        self.dtype = jnp.dtype(config.dtype)
        self.embed = nnx.Embed(
            VOCAB, config.d_model, dtype=self.dtype, embedding_init=init, rngs=rngs
        )
        self.position = nnx.Param(init(rngs.params(), (config.seq_len, config.d_model)))
        self.blocks = nnx.List([Block(config, dense, rngs) for _ in range(config.n_layers)])
        self.final_norm = _norm(config.d_model, config, rngs)
        self.head = nnx.Linear(
            config.d_model, VOCAB, dtype=self.dtype, param_dtype=jnp.float32, rngs=rngs
        )

    def __call__(self, tokens: jax.Array) -> jax.Array:
        t = tokens.shape[1]
        x = self.embed(tokens) + self.position[...][None, :t].astype(self.dtype)
        for block in self.blocks:
            x = block(x)
        return self.head(self.final_norm(x)).astype(jnp.float32)


def loss_fn(model: Transformer, batch: dict[str, jax.Array]) -> jax.Array:
    """Mean next-byte cross-entropy (nats per byte)."""
    logits = model(batch["inputs"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()


def copy_model(model: nnx.Module) -> nnx.Module:
    """A copy of ``model`` with buffers of its own.

    ``nnx.clone`` shares the arrays: donating the clone to :func:`train_step`
    would delete the original's arrays too.
    """
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(jnp.copy, state))


def with_adapters(model: Transformer, config: Config) -> Transformer:
    """A LoRA twin of ``model`` (``config.lora_rank`` > 0) holding ``model``'s params.

    ``nnx.LoRALinear`` keeps ``kernel`` and ``bias`` where ``nnx.Linear``
    has them, so the trained params go in unchanged; the adapters start at
    zero (``lora_b``), so the twin computes what ``model`` computes.
    """
    if not config.lora_rank:
        raise ValueError("with_adapters needs config.lora_rank > 0.")
    twin = Transformer(config, rngs=nnx.Rngs(config.seed + 1))
    nnx.update(twin, jax.tree.map(jnp.copy, nnx.state(model, nnx.Param)))  # buffers of its own
    return twin


def adapter_mask(model: nnx.Module, kind: type = nnx.LoRAParam) -> Callable[[Any], Any]:
    """``params -> mask`` for SAM's ``mask=``: ``True`` on the variables of type ``kind``.

    :func:`sam_optax.flax.nnx_variable_mask`: the paths come from the model
    (the params ``nnx.Optimizer`` hands ``tx.update`` are a pure state).
    """
    return sam_flax.nnx_variable_mask(model, kind)


# --------------------------------------------------------------------------
# The optimizer.
# --------------------------------------------------------------------------


def _decay_mask(params: Any) -> Any:
    """Weight decay on the matrices (kernels, embeddings), not on biases and norm scales."""
    return jax.tree.map(lambda x: x.ndim >= 2, params)


def base_optimizer(config: Config) -> optax.GradientTransformation:
    """Clipping by global norm, then AdamW on a warmup-cosine schedule.

    Inside ``optax.MultiSteps`` its step count, hence the schedule, advances
    once per optimizer step (every k micro-batches).
    """
    schedule = optax.warmup_cosine_decay_schedule(
        config.learning_rate / max(config.warmup, 1),  # not 0: a first step of 0 is wasted
        config.learning_rate,
        config.warmup,
        max(config.steps, config.warmup + 1),
        end_value=config.end_learning_rate,
    )
    return optax.chain(
        optax.clip_by_global_norm(config.clip),
        optax.adamw(schedule, b2=0.95, weight_decay=config.weight_decay, mask=_decay_mask),
    )


@functools.cache
def make_optimizer(
    method: str, config: Config, *, mask: Callable[[Any], Any] | None = None
) -> optax.GradientTransformation:
    """The training transformation of ``method``, gradient accumulation nested right.

    ``base`` is :func:`base_optimizer`, wrapped in ``optax.MultiSteps(base,
    k).gradient_transformation()`` when ``config.accumulate = k > 1``. SAM
    sits outside it: every micro-batch is perturbed with its own gradient
    (the paper's m-sharpness with m the micro-batch) and ``base`` steps once
    per k micro-batches on the mean of their SAM gradients:

    * ``"adamw"``: ``base``;
    * ``"sam"``: ``chain(sam(rho), base)``;
    * ``"looksam"``: ``chain(looksam(rho, every), base)``; its period counts
      micro-batches;
    * ``"msam"``: ``msam(base, rho)``; it reads AdamW's first moment inside
      ``MultiSteps``' state (updated once per optimizer step), so the k
      micro-batches share one perturbation and their mean is MSAM's gradient
      on the whole batch;
    * ``"wsam"``: ``wsam(base, rho, gamma)``, the sharpness folded into the
      gradient ``base`` sees (WSAM's decoupled step, ``learning_rate=``,
      would be taken on every micro-batch, outside the accumulation).

    ``optax.MultiSteps(chain(sam, base), k)``, the other way round, gives
    SAM the running mean of the clean gradients for its direction and keeps
    the update of the LAST micro-batch only: the base optimizer sees one
    micro-batch's SAM gradient (1/k of the data), and k-1 perturbed passes
    are thrown away.

    Args:
      method: one of :data:`METHODS`.
      config: the run's settings (learning rate, schedule, ``rho``, ...).
      mask: SAM's ``mask=``: which params are perturbed (e.g. :func:`adapter_mask`).

    Returns:
      An optax transformation for ``nnx.Optimizer``; pass ``value_fn=`` (and
      ``value=``) to its update (:func:`train_step` does). The same
      arguments return the same object (``functools.cache``): ``nnx.jit``
      keys its cache on the optimizer's ``tx``, so runs of one configuration
      compile :func:`train_step` once.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got method={method!r}.")
    base = base_optimizer(config)
    if config.accumulate > 1:
        base = optax.MultiSteps(base, config.accumulate).gradient_transformation()
    rho = DEFAULT_RHO[method] if config.rho is None else config.rho
    options = {} if mask is None else {"mask": mask}
    if method == "adamw":
        return base
    if method == "sam":
        return optax.chain(sam_optax.sam(rho, **options), base)
    if method == "looksam":
        looksam = sam_optax.looksam(
            rho, every=config.looksam_every, alpha=config.looksam_alpha, **options
        )
        return optax.chain(looksam, base)
    if method == "msam":
        return sam_optax.msam(base, rho, **options)
    return sam_optax.wsam(base, rho, config.wsam_gamma, **options)


def build(config: Config, model: Transformer | None = None) -> tuple[Transformer, nnx.Optimizer]:
    """The model (fresh, or ``model`` given adapters when ``config.lora_rank``) and its optimizer.

    Full training: ``wrt=nnx.Param``. LoRA: ``wrt=nnx.LoRAParam`` (the
    optimizer, SAM included, sees the adapters alone), or with
    ``config.train_base`` every param trained and SAM's ``mask=`` set to the
    adapters.
    """
    if model is None:
        model = Transformer(dataclasses.replace(config, lora_rank=0), rngs=nnx.Rngs(config.seed))
    if config.lora_rank and not nnx.state(model, nnx.LoRAParam):
        model = with_adapters(model, config)
    mask = None
    wrt: Any = nnx.Param
    if config.lora_rank and config.train_base:
        mask = adapter_mask(model)
    elif config.lora_rank:
        wrt = nnx.LoRAParam
    return model, nnx.Optimizer(model, make_optimizer(config.method, config, mask=mask), wrt=wrt)


# --------------------------------------------------------------------------
# Steps.
# --------------------------------------------------------------------------


@functools.partial(nnx.jit, donate_argnames=("model", "optimizer"))
def train_step(
    model: Transformer, optimizer: nnx.Optimizer, batch: dict[str, jax.Array]
) -> jax.Array:
    """One micro-batch: the clean pass, then ``optimizer.update`` (SAM's pass inside).

    Model and optimizer are donated: their buffers are updated in place.
    The clean loss goes to ``tx.update`` as ``value=`` (SAM records the
    sharpness estimate); a transformation without SAM ignores the closure
    and XLA drops it. Returns the clean loss.
    """
    loss, grads, value_fn = sam_flax.nnx_value_and_grad(loss_fn, wrt=optimizer.wrt)(model, batch)
    optimizer.update(model, grads, value_fn=value_fn, value=loss)
    return loss


@nnx.jit
def eval_step(model: Transformer, batch: dict[str, jax.Array]) -> jax.Array:
    return loss_fn(model, batch)


def evaluate(model: Transformer, windows: dict[str, jax.Array], batch: int = 64) -> float:
    """Mean loss (nats per byte) over ``windows``, ``batch`` at a time."""
    n = windows["inputs"].shape[0]
    total = 0.0
    for i in range(0, n, batch):
        chunk = {k: v[i : i + batch] for k, v in windows.items()}
        total += float(eval_step(model, chunk)) * chunk["inputs"].shape[0]
    return total / n


def step_memory(
    model: Transformer, optimizer: nnx.Optimizer, batch: dict[str, jax.Array]
) -> dict[str, int]:
    """XLA's memory analysis of :func:`train_step` (compiled, not run), in bytes.

    ``temp`` is the scratch the step needs beyond its arguments and outputs
    (deterministic for a jaxlib); ``params`` the bytes of the model's
    ``nnx.Param`` (adapters included) and ``trained`` those the optimizer updates.
    """
    compiled = train_step.lower(model, optimizer, batch).compile()
    analysis = compiled.memory_analysis()
    return {
        "temp": int(analysis.temp_size_in_bytes),
        "params": _nbytes(nnx.state(model, nnx.Param)),
        "trained": _nbytes(nnx.state(model, optimizer.wrt)),
    }


def _nbytes(tree: Any) -> int:
    return sum(int(x.nbytes) for x in jax.tree.leaves(tree))


# --------------------------------------------------------------------------
# Training.
# --------------------------------------------------------------------------


@dataclasses.dataclass
class History:
    """What :func:`train` measured; ``model`` and ``optimizer`` as training left them."""

    config: Config
    step: list[int] = dataclasses.field(default_factory=list)
    train_loss: list[float] = dataclasses.field(default_factory=list)  # mean since last eval
    valid_step: list[int] = dataclasses.field(default_factory=list)
    valid_loss: list[float] = dataclasses.field(default_factory=list)
    sharpness: list[float] = dataclasses.field(default_factory=list)  # L(w+e) - L(w), last step
    step_seconds: list[float] = dataclasses.field(default_factory=list)  # per optimizer step
    model: Transformer | None = None
    optimizer: nnx.Optimizer | None = None

    @property
    def median_step_seconds(self) -> float:
        """Median wall time of an optimizer step, the first (compiling) one left out."""
        return statistics.median(self.step_seconds[1:] or self.step_seconds)


def _sharpness(optimizer: nnx.Optimizer) -> float:
    found = optax.tree.get_all_with_path(optimizer.opt_state, "sharpness")
    return float(found[0][1][...]) if found else float("nan")


def train(
    config: Config,
    *,
    corpus: Corpus | None = None,
    model: Transformer | None = None,
    log: Callable[[str], None] | None = None,
) -> History:
    """Trains (or, with ``config.lora_rank``, fine-tunes ``model``) and records the losses.

    Each optimizer step runs ``config.accumulate`` micro-batches of
    ``config.micro_batch`` random windows through :func:`train_step`; every
    ``config.eval_every`` steps (and at steps 0 and ``config.steps``) the
    validation loss over fixed windows is recorded.
    """
    if corpus is None:
        corpus = load_corpus(config.corpus_bytes, packages=config.packages, exclude=config.exclude)
    model, optimizer = build(config, model)
    windows = eval_windows(corpus.valid, config.eval_windows, config.seq_len)
    rng = np.random.default_rng(config.seed)
    history = History(config)
    history.valid_step.append(0)
    history.valid_loss.append(evaluate(model, windows))
    losses = []
    for step in range(1, config.steps + 1):
        batches = [
            sample_batch(corpus.train, rng, config.micro_batch, config.seq_len)
            for _ in range(config.accumulate)
        ]
        start = time.perf_counter()
        for batch in batches:
            losses.append(train_step(model, optimizer, batch))
        jax.block_until_ready(losses[-1])
        history.step_seconds.append(time.perf_counter() - start)
        if step % config.eval_every == 0 or step == config.steps:
            history.step.append(step)
            history.train_loss.append(float(np.mean(jax.device_get(losses))))
            history.sharpness.append(_sharpness(optimizer))
            history.valid_step.append(step)
            history.valid_loss.append(evaluate(model, windows))
            losses = []
            if log is not None:
                log(
                    f"{config.method:8s} step {step:5d}  train {history.train_loss[-1]:.3f}  "
                    f"valid {history.valid_loss[-1]:.3f}  "
                    f"{1e3 * history.median_step_seconds:.0f} ms/step"
                )
    history.model, history.optimizer = model, optimizer
    return history


# --------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------


#: Config fields settable from the command line (``--micro-batch 8`` sets ``micro_batch``).
CLI_FIELDS = (
    "steps",
    "micro_batch",
    "accumulate",
    "seq_len",
    "d_model",
    "n_layers",
    "n_heads",
    "learning_rate",
    "rho",
    "corpus_bytes",
    "eval_every",
    "seed",
)


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, Config]:
    """The command line's options and the :class:`Config` they describe."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="sam", help=f"one of {METHODS}, or 'all' (the first 4)")
    parser.add_argument(
        "--lora", type=int, default=0, metavar="RANK", help="fine-tune LoRA adapters"
    )
    parser.add_argument("--pretrain-steps", type=int, default=200, help="AdamW steps before LoRA")
    parser.add_argument("--train-base", action="store_true", help="with --lora: train all params")
    parser.add_argument("--full", action="store_true", help="the full size (or SAM_OPTAX_FULL=1)")
    defaults = Config()
    for name in CLI_FIELDS:
        kind = float if name in ("learning_rate", "rho") else int
        parser.add_argument(
            f"--{name.replace('_', '-')}", type=kind, help=f"default {getattr(defaults, name)}"
        )
    args = parser.parse_args(argv)
    if args.method != "all" and args.method not in METHODS:
        parser.error(f"--method must be one of {METHODS} or 'all', got {args.method!r}")
    given = {n: getattr(args, n) for n in CLI_FIELDS if getattr(args, n) is not None}
    size = FULL if args.full or full_size() else {}
    config = Config(**{**size, **given})
    for name in CLI_FIELDS:
        value = getattr(config, name)
        least = 0 if name == "seed" else 1
        if name in ("learning_rate", "rho"):
            if value is not None and not (math.isfinite(value) and value >= 0):
                parser.error(
                    f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}"
                )
        elif value < least:
            parser.error(f"--{name.replace('_', '-')} must be an integer >= {least}, got {value}")
    if config.d_model % config.n_heads:
        parser.error(
            f"--n-heads {config.n_heads} must divide --d-model {config.d_model} "
            "(each head takes d_model / n_heads features)"
        )
    if args.lora < 0 or args.pretrain_steps < 1:
        parser.error("--lora must be >= 0 and --pretrain-steps >= 1")
    if args.train_base and not args.lora:
        parser.error("--train-base goes with --lora RANK (it trains every param under LoRA)")
    return args, config


def main(argv: Sequence[str] | None = None) -> dict[str, History]:
    args, config = parse_args(argv)
    methods = METHODS[:4] if args.method == "all" else (args.method,)
    try:
        corpus = load_corpus(config.corpus_bytes)
    except ValueError as error:
        raise SystemExit(
            f"language_model.py: error: --corpus-bytes {config.corpus_bytes} is too few bytes "
            f"({error}); pass a larger --corpus-bytes."
        ) from None
    print(
        f"corpus: {len(corpus.train):,} training bytes ({len(corpus.train_files)} files), "
        f"{len(corpus.valid):,} validation bytes ({len(corpus.valid_files)} files)"
    )
    pretrained = None
    if args.lora:
        pre = dataclasses.replace(config, method="adamw", steps=args.pretrain_steps)
        pretrained = train(pre, corpus=corpus, log=print).model
    results = {}
    for method in methods:
        run = dataclasses.replace(
            config, method=method, lora_rank=args.lora, train_base=args.train_base
        )
        start = None if pretrained is None else copy_model(pretrained)
        results[method] = train(run, corpus=corpus, model=start, log=print)
    print("\n| method | validation loss, start -> end (nats/byte) | ms / step |")
    print("|---|---|---:|")
    for method, h in results.items():
        print(
            f"| {method} | {h.valid_loss[0]:.3f} -> {h.valid_loss[-1]:.3f} | "
            f"{1e3 * h.median_step_seconds:.1f} |"
        )
    return results


if __name__ == "__main__":
    main()
