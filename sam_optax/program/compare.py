"""A grid of runs (SGD and SAM-family methods over seeds), the paper-style report and the Pareto figure.

The paper's protocol (section 3.1): each SGD configuration is trained for the
same number of epochs as SAM and for twice as many (SAM costs two gradients a
step), and the better of the two is reported; every number is a mean over
independent seeds with its 95% confidence interval. Each method's cost is
measured in the same comparison: gradient evaluations per step (from the
methods' own ``sam_step`` diagnostics) and the median wall time of an epoch
relative to that of the SGD row reported; ``pareto.png`` plots test accuracy
against both.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from sam_optax.program import configs
from sam_optax.program import train
from sam_optax.program.errors import ConfigFileError
from sam_optax.program.errors import RunDirError
from sam_optax.program.rundir import check_out_path
from sam_optax.program.rundir import clear_for_overwrite
from sam_optax.program.rundir import make_out_directory
from sam_optax.program.rundir import to_json
from sam_optax.program.rundir import write_atomic

LABELS = {"sgd": "SGD", **{name: method.label for name, method in configs.METHODS.items()}}


def plan_runs(
    base: configs.Config, methods: list[str], rhos: list[float], seeds: list[int]
) -> list[configs.Config]:
    """The runs: SGD (rho = 0) at 1x and 2x the epochs, each method at each positive rho.

    A method whose radius is a field of its own (MSAM's ``msam_rho``) runs once
    per seed: the grid's radii are not on its scale. A method that selects
    examples (ESAM) perturbs once per device batch (``m`` = the batch).
    """
    plan = []
    radii = [r for r in rhos if r > 0]
    for seed in seeds:
        if 0.0 in rhos:
            for epochs in (base.epochs, 2 * base.epochs):
                plan.append(base.replace(rho=0.0, m=None, seed=seed, epochs=epochs))
        for method in methods:
            own = configs.METHODS[method].radius != "rho"
            m = base.m if configs.METHODS[method].groups else None
            plan += [
                base.replace(method=method, rho=r, seed=seed, m=m)
                for r in radii[: 1 if own else None]
            ]
    return plan


def run_name(c: configs.Config) -> str:
    m = "all" if c.m is None else c.m
    return f"{c.optimizer}-rho{c.radius:g}-m{m}-e{c.epochs}-seed{c.seed}"


def t_critical(level: float, df: int) -> float:
    """The t with P(|T| <= t) = ``level`` for Student's T with ``df`` (integer) degrees of freedom.

    The distribution function of T is, for integer ``df``, a finite sum in
    theta = atan(t / sqrt(df)) (Abramowitz and Stegun 26.7.3 and 26.7.4),
    increasing in theta; it is inverted by bisection to machine precision.
    """
    if not 0 < level < 1 or df < 1 or df != int(df):
        raise ValueError(
            f"t_critical needs 0 < level < 1 and an integer df >= 1, got {level}, {df}."
        )
    low, high = 0.0, math.pi / 2
    for _ in range(200):
        mid = (low + high) / 2
        if _t_central_probability(mid, int(df)) < level:
            low = mid
        else:
            high = mid
    return math.sqrt(df) * math.tan((low + high) / 2)


def _t_central_probability(theta: float, df: int) -> float:
    """P(|T| <= sqrt(df) tan(theta)) for Student's T with ``df`` degrees of freedom."""
    s, c, c2 = math.sin(theta), math.cos(theta), math.cos(theta) ** 2
    term = total = 1.0
    if df % 2 == 0:  # sin(theta) (1 + 1/2 c^2 + 1*3/(2*4) c^4 + ... up to c^(df-2))
        for k in range(1, df // 2):
            term *= (2 * k - 1) / (2 * k) * c2
            total += term
        return s * total
    if df == 1:
        return 2 * theta / math.pi
    for k in range(1, (df - 1) // 2):  # 2/pi (theta + sin cos (1 + 2/3 c^2 + 2*4/(3*5) c^4 ...))
        term *= (2 * k) / (2 * k + 1) * c2
        total += term
    return 2 / math.pi * (theta + s * c * total)


def confidence_interval(values: list[float], level: float = 0.95) -> float:
    """Half-width of the t-interval of the mean (NaN for fewer than two values)."""
    if len(values) < 2:
        return math.nan
    sem = float(np.std(values, ddof=1)) / math.sqrt(len(values))
    return t_critical(level, len(values) - 1) * sem


def _prepare(out: Path, grid: dict[str, Any], resume: bool, overwrite: bool = False) -> None:
    grid_file = out / "compare.json"
    check_out_path(out)
    if resume:
        if not grid_file.is_file():
            raise RunDirError(f"--resume: {out} holds no comparison to resume (no compare.json).")
        if saved_grid(out, what="--resume")["grid"] != json.loads(to_json(grid)):
            raise RunDirError(f"--resume: the settings differ from the comparison in {out}.")
        return
    if overwrite:
        clear_for_overwrite(out, grid_file.name)
    elif out.exists() and any(out.iterdir()):
        raise RunDirError(
            f"--out {out} already exists and is not empty; pass --resume to continue "
            "that comparison (with its own settings), --overwrite to replace it (its files "
            "are deleted), or choose another --out."
        )
    make_out_directory(out)
    write_atomic(grid_file, to_json(grid, indent=2) + "\n")


def saved_grid(out: str | Path, what: str = "--resume") -> dict[str, Any]:
    """The comparison in ``out`` (its ``compare.json``): ``base`` (a Config), ``methods``,
    ``rhos``, ``seeds``, and ``grid``, the file's JSON; for ``what`` (``--resume``)."""
    grid_file = Path(out) / "compare.json"
    if not grid_file.is_file():
        raise RunDirError(f"{what}: {out} holds no comparison to resume (no compare.json).")
    fix = "Repair it, or start a new comparison in another --out."
    try:
        grid = json.loads(grid_file.read_text())
    except json.JSONDecodeError as err:
        raise ConfigFileError(
            f"{grid_file} is not valid JSON ({err.msg}: line {err.lineno}, column {err.colno}). "
            f"{fix}"
        ) from None
    keys = ("base", "methods", "rhos", "seeds")
    missing = [k for k in keys if k not in grid] if isinstance(grid, dict) else list(keys)
    if missing:
        raise ConfigFileError(
            f"{grid_file} lacks {', '.join(map(repr, missing))} "
            f"(expected a JSON object with base, methods, rhos and seeds). {fix}"
        )
    try:
        base = configs.Config.from_dict(grid["base"])
    except ValueError as err:
        raise ConfigFileError(f'{grid_file}, in "base": {err}. {fix}') from None
    return {**grid, "base": base, "grid": grid}


def compare(
    base: configs.Config,
    rhos: list[float],
    seeds: list[int],
    out: str | Path,
    *,
    methods: list[str] | None = None,
    options: train.RunOptions | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Runs the grid (or resumes it) and writes results.{json,md,png} and pareto.png.

    SGD runs where 0 is among ``rhos``; each of ``methods`` (default: the
    base's method) at every positive radius. ``options`` (resume, progress,
    ...) apply to every run.
    """
    out = Path(out)
    options = options or train.RunOptions()
    methods = [base.method] if methods is None else methods
    grid = {"base": base.to_dict(), "methods": methods, "rhos": rhos, "seeds": seeds}
    _prepare(out, grid, options.resume, options.overwrite)
    plan = plan_runs(base, methods, rhos, seeds)
    summaries, curves = [], defaultdict(list)
    for i, config in enumerate(plan, 1):
        run_dir = out / "runs" / run_name(config)
        label = (
            f"[{i}/{len(plan)}] {config.optimizer} rho={config.radius:g} "
            f"e={config.epochs} seed={config.seed}"
        )
        if (run_dir / "summary.json").is_file():
            summary = json.loads((run_dir / "summary.json").read_text())
        else:
            resume = options.resume and (run_dir / "config.json").is_file()
            run_options = dataclasses.replace(
                options, resume=resume, overwrite=False, description=label
            )
            summary = train.train_and_evaluate(config, run_dir, run_options)
        summaries.append(summary)
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        curves[_key(config)].append(rows)
        done = f"{label}: test accuracy {summary['test_accuracy']:.4f} ({summary['wall_seconds']:.1f} s)"
        if options.progress:
            print(done, file=sys.stderr)
        if options.epoch_lines:
            print(done, flush=True)
    results = report(base, plan, summaries, command)
    write_atomic(out / "results.json", to_json(results, indent=2) + "\n")
    write_atomic(out / "results.md", results["markdown"])
    _plot_curves(out / "results.png", base, curves)
    _plot_pareto(out / "pareto.png", base, results)
    return results


def _key(c: configs.Config) -> tuple:
    return (c.optimizer, c.radius, c.m, c.epochs)


# --------------------------------------------------------------------------
# The report.
# --------------------------------------------------------------------------


def _rows(plan, summaries) -> list[dict[str, Any]]:
    """One row per configuration (over seeds): accuracy, its interval, the measured costs
    (epoch time relative to the SGD row reported, the better of SGD's two)."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for c, s in zip(plan, summaries, strict=True):
        groups[_key(c)].append(s)
    rows = []
    for (optimizer, rho, m, epochs), runs in groups.items():
        values = [s["test_accuracy"] for s in runs]
        seconds = float(np.median([s["median_epoch_seconds"] for s in runs]))
        rows.append(
            {
                "method": LABELS[optimizer],
                "optimizer": optimizer,
                "rho": rho,
                "m": m,
                "epochs": epochs,
                "seeds": len(values),
                "mean": float(np.mean(values)),
                "ci95": confidence_interval(values),
                "values": values,
                "gradients_per_step": float(np.mean([s["gradients_per_step"] for s in runs])),
                "epoch_seconds": seconds,
            }
        )
    sgd = _best_sgd(rows)
    for r in rows:  # relative to the SGD row reported (1.00 for it)
        r["cost_vs_sgd"] = r["epoch_seconds"] / sgd["epoch_seconds"] if sgd else math.nan
    return rows


def _best_sgd(rows):
    sgd = [r for r in rows if r["optimizer"] == "sgd"]
    return max(sgd, key=lambda r: r["mean"]) if sgd else None


def _retention(rows) -> None:
    """Adds each method's share of SAM's accuracy gain over the best SGD (where both ran)."""
    sgd = _best_sgd(rows)
    sam = [r for r in rows if r["optimizer"] == "sam"]
    gain = None if sgd is None or not sam else max(r["mean"] for r in sam) - sgd["mean"]
    for r in rows:
        keep = gain is not None and gain > 0 and r["optimizer"] != "sgd"
        r["gain_retained"] = (r["mean"] - sgd["mean"]) / gain if keep else None


def report(base, plan, summaries, command) -> dict[str, Any]:
    rows = _rows(plan, summaries)
    _retention(rows)
    best = _best_sgd(rows)
    table = [r for r in rows if r["optimizer"] != "sgd" or r is best]
    timing = {f"{r['optimizer']}_epoch_seconds": r["epoch_seconds"] for r in rows}
    return {
        "command": command,
        "config": base.to_dict(),
        "runs": summaries,
        "table": table,
        "all_rows": rows,
        "timing": timing,
        "markdown": _markdown(base, rows, table, summaries, command),
    }


def _fmt_ci(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100 * value:.1f}"


def _markdown(base, rows, table, summaries, command) -> str:
    noise = f"{base.label_noise:.0%} of the training labels flipped, " if base.label_noise else ""
    lines = [
        f"# SGD and the SAM family: {base.dataset}, {base.model}",
        "",
        f"{noise}batch {base.batch_size}, lr {base.lr:g} (cosine), momentum {base.momentum:g}, "
        f"weight decay {base.weight_decay:g}, augmentation {base.augment}; "
        f"{len({s['seed'] for s in summaries})} seeds.",
        "",
        "| method | ρ | m | epochs | test accuracy (%) | gradients / step | epoch time / SGD | SAM gain kept |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in table:
        m = "-" if r["optimizer"] == "sgd" else ("batch" if r["m"] is None else str(r["m"]))
        kept = "-" if r.get("gain_retained") is None else f"{100 * r['gain_retained']:.0f}%"
        lines.append(
            f"| {r['method']} | {r['rho']:g} | {m} | {r['epochs']} | "
            f"{100 * r['mean']:.1f} ± {_fmt_ci(r['ci95'])} | {r['gradients_per_step']:.2f} | "
            f"{'-' if math.isnan(r['cost_vs_sgd']) else format(r['cost_vs_sgd'], '.2f')} | {kept} |"
        )
    lines += [
        "",
        "Mean over seeds ± half-width of the 95% t-interval. SGD is trained for the "
        "same number of epochs as the others and for twice as many; the better is "
        "reported (the paper's protocol). *Gradients / step*: gradient evaluations per "
        "step (SGD 1, SAM 2), from the runs' own diagnostics. *Epoch time / SGD*: the "
        "median wall time of an epoch divided by that of the SGD row above, both measured "
        "in this comparison on this machine. *SAM gain kept*: (accuracy - SGD's) / (best "
        "SAM accuracy - SGD's), the share of SAM's gain over SGD that a method keeps (100% "
        "for SAM's best row; '-' without a gain to share). All SGD rows:",
        "",
    ]
    for r in rows:
        if r["optimizer"] == "sgd":
            lines.append(
                f"- SGD {r['epochs']} epochs: {100 * r['mean']:.1f} ± {_fmt_ci(r['ci95'])}"
            )
    if command:
        lines += ["", f"Command: `{command}`"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------
# Figures (bare matplotlib Figures: no pyplot, no backend switched in the caller).
# --------------------------------------------------------------------------


def _label(optimizer: str, rho: float, m, epochs: int) -> str:
    if optimizer == "sgd":
        return f"SGD, {epochs} epochs"
    return f"{LABELS[optimizer]} ρ={rho:g}, m={'batch' if m is None else m}"


def _plot_curves(path: Path, base, curves) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    for (optimizer, rho, m, epochs), runs in sorted(curves.items(), key=lambda kv: str(kv[0])):
        acc = 100 * np.asarray([[r["test_accuracy"] for r in rows] for rows in runs])
        mean, std = acc.mean(0), acc.std(0)
        x = np.arange(1, len(mean) + 1)
        style = "--" if optimizer == "sgd" else "-"
        line = ax.plot(x, mean, style, label=_label(optimizer, rho, m, epochs))[0]
        ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.15)
    noise = f", {base.label_noise:.0%} label noise" if base.label_noise else ""
    ax.set_title(f"{base.dataset} ({base.model}{noise}): test accuracy per epoch")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _plot_pareto(path: Path, base, results) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.2))
    axes = fig.subplots(1, 2, sharey=True)
    for r in results["table"]:
        ci = 0.0 if math.isnan(r["ci95"]) else 100 * r["ci95"]
        for ax, x in zip(axes, (r["cost_vs_sgd"], r["gradients_per_step"])):
            ax.errorbar(x, 100 * r["mean"], yerr=ci, fmt="o", capsize=3)
            ax.annotate(
                r["method"], (x, 100 * r["mean"]), textcoords="offset points", xytext=(5, 4)
            )
    axes[0].set_xlabel("epoch wall time / SGD's (measured)")
    axes[1].set_xlabel("gradient evaluations per step")
    axes[0].set_ylabel("test accuracy (%)")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(f"Accuracy against cost: {base.dataset}, {base.model}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
