"""``sam-optax analyze RUN_DIR``: the sharpness of a trained model (paper section 4).

Rebuilds the run's model and training data (with its label noise), restores
the final checkpoint and measures, on the first ``examples`` training
examples with the model in evaluation mode (running BatchNorm statistics, no
dropout, no augmentation, so the loss is a function of the weights alone):

* the top-5 Hessian eigenvalues, lambda_max and lambda_max / lambda_5 (4.2);
* the ascent sharpness max_{|eps| <= rho} L(w + eps) - L(w) with 1 and 5
  projected ascent steps (C.6, Table 11);

and saves a 1-D and a 2-D filter-normalized loss landscape (Figure 1) and the
spectral density as PNGs. Everything lands in ``RUN_DIR/analysis/``.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sam_optax import analysis
from sam_optax import flax as sam_flax
from sam_optax.program import configs
from sam_optax.program import input_pipeline
from sam_optax.program import models
from sam_optax.program.errors import RunDirError
from sam_optax.program.rundir import restore_final
from sam_optax.program.trainer import normalizer

HVP_BATCH = 256


def _load_run(run_dir: Path, examples: int):
    """The run's config, its first ``examples`` training examples (label noise included)
    and its final params and BatchNorm statistics."""
    config_file = run_dir / "config.json"
    if not config_file.is_file():
        raise RunDirError(_not_a_run(run_dir))
    config = configs.read_config(
        config_file, "Repair it (it holds the run's settings, as `sam-optax train` wrote them)."
    )
    dataset = input_pipeline.load(config.dataset, config.data_dir)
    y = dataset.y_train
    if config.label_noise > 0:
        y, _ = input_pipeline.symmetric_label_noise(
            y, config.label_noise, dataset.num_classes, config.seed
        )
    n = min(examples, len(y))
    n -= n % min(n, HVP_BATCH)
    state = restore_final(run_dir)
    return config, dataset, (dataset.x_train[:n], y[:n]), state["params"], state.get("batch_stats")


def _not_a_run(path: Path) -> str:
    """Why ``path`` cannot be analyzed, and what can: the runs of a comparison, listed."""
    if not path.exists():
        return f"{path}: no such directory (analyze takes a run directory of `sam-optax train`)."
    runs = sorted(p.parent for p in path.glob("runs/*/config.json"))
    if (path / "compare.json").is_file() and runs:
        listed = "\n".join(f"  sam-optax analyze {shlex.quote(str(r))}" for r in runs)
        return (
            f"{path} is a comparison (`sam-optax compare`), not one run; analyze one of "
            f"its {len(runs)} runs:\n{listed}"
        )
    return f"{path} is not a run directory of `sam-optax train` (no config.json)."


def _eval_loss(config, dataset, batch_stats):
    """``loss(params, (x, y))`` of the model in evaluation mode: a function of the weights alone."""
    model = models.create_model(config.model, dataset.num_classes, config.dropout)
    normalize = normalizer(dataset)
    forward = sam_flax.linen_loss_fn(
        model.apply,
        lambda logits, y: optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(),
        update_batch_stats=False,
        train=False,
    )

    def loss(params: Any, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
        return forward(params, (normalize(batch[0]), batch[1]), batch_stats)[0]

    return loss


def analyze_run(
    run_dir: str | Path,
    *,
    rho: float = 0.05,
    examples: int = 512,
    plots: bool = True,
    num_iterations: int = 40,
) -> dict[str, Any]:
    """Measures a finished run (see the module docstring) and writes ``RUN_DIR/analysis/``."""
    run_dir = Path(run_dir)
    config, dataset, (x, y), params, batch_stats = _load_run(run_dir, examples)
    loss = _eval_loss(config, dataset, batch_stats)
    n, chunk = len(y), min(len(y), HVP_BATCH)
    batches = (
        jnp.asarray(x).reshape(n // chunk, chunk, *x.shape[1:]),
        jnp.asarray(y).reshape(n // chunk, chunk),
    )
    full = (jnp.asarray(x), jnp.asarray(y))

    def full_loss(p: Any) -> jax.Array:
        return loss(p, full)

    lams = analysis.hessian_top_eigenvalues(
        loss, params, k=5, batches=batches, num_iterations=num_iterations
    )
    result = {
        "run_dir": str(run_dir),
        "optimizer": config.optimizer,
        "rho_trained": config.rho,
        "examples": n,
        "loss": float(full_loss(params)),
        "top_eigenvalues": [float(v) for v in lams],
        "lambda_max": float(lams[0]),
        "lambda_max_over_lambda_5": float(lams[0] / lams[4]),
        "sharpness_rho": rho,
        "sharpness_1_step": float(analysis.sharpness(full_loss, params, rho, 1)),
        "sharpness_5_steps": float(analysis.sharpness(full_loss, params, rho, 5)),
    }
    out = run_dir / "analysis"
    out.mkdir(exist_ok=True)
    if plots:
        _plots(out, full_loss, loss, params, batches, lams, config)
        result["plots"] = [
            str(out / name) for name in ("landscape_1d.png", "landscape_2d.png", "spectrum.png")
        ]
    (out / "analysis.json").write_text(json.dumps(result, indent=2) + "\n")
    _print(run_dir, config, result, rho, out)
    return result


def _print(run_dir, config, result, rho, out) -> None:
    print(
        f"{run_dir}: {config.optimizer} (rho={config.rho:g}), {result['examples']} training examples\n"
        f"  loss {result['loss']:.4f}\n"
        f"  lambda_max {result['lambda_max']:.4g}, lambda_max/lambda_5 {result['lambda_max_over_lambda_5']:.3g}\n"
        f"  sharpness (rho={rho:g}): {result['sharpness_1_step']:.4g} (1 step), "
        f"{result['sharpness_5_steps']:.4g} (5 steps)\n"
        f"  written to {out}"
    )


def _plots(out: Path, full_loss, loss, params, batches, lams, config) -> None:
    from matplotlib.figure import Figure

    from sam_optax.analysis import plots

    title = f"{config.model}, {config.optimizer} (ρ={config.rho:g})"
    alphas, losses = analysis.loss_landscape_1d(full_loss, params, key=jax.random.key(1))
    ax = plots.plot_landscape_1d(alphas, losses, ax=Figure(figsize=(5, 3.5)).subplots())
    ax.set_title(f"1-D landscape: {title}")
    ax.figure.tight_layout()
    ax.figure.savefig(out / "landscape_1d.png", dpi=110)

    a, b, z = analysis.loss_landscape_2d(full_loss, params, key=jax.random.key(2))
    ax = plots.plot_landscape_2d(a, b, z, ax=Figure(figsize=(5, 4)).subplots())
    ax.set_title(f"2-D landscape: {title}")
    ax.figure.tight_layout()
    ax.figure.savefig(out / "landscape_2d.png", dpi=110)

    grid, density, _ = analysis.hessian_spectral_density(
        loss, params, batches=batches, num_iterations=40, num_draws=2
    )
    ax = plots.plot_spectrum(
        grid, density, eigenvalues=np.asarray(lams), ax=Figure(figsize=(5, 3.5)).subplots()
    )
    ax.set_title(f"Hessian spectrum: {title}")
    ax.figure.tight_layout()
    ax.figure.savefig(out / "spectrum.png", dpi=110)
