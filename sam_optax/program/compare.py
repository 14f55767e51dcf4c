"""A grid of runs (SGD and SAM over seeds) and the paper-style report.

The paper's protocol (section 3.1): each SGD configuration is trained for the
same number of epochs as SAM and for twice as many (SAM costs two gradients a
step), and the better of the two is reported; every number is a mean over
independent seeds with its 95% confidence interval.
"""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from sam_optax.program import configs
from sam_optax.program import train
from sam_optax.program.errors import RunDirError


def plan_runs(base: configs.Config, rhos: list[float], seeds: list[int]) -> list[configs.Config]:
    """The runs of a comparison, SGD (rho = 0) at 1x and 2x the epochs."""
    plan = []
    for seed in seeds:
        for rho in rhos:
            if rho == 0:
                for epochs in (base.epochs, 2 * base.epochs):
                    plan.append(base.replace(rho=0.0, m=None, seed=seed, epochs=epochs))
            else:
                plan.append(base.replace(rho=rho, seed=seed))
    return plan


def run_name(c: configs.Config) -> str:
    m = "all" if c.m is None else c.m
    return f"{c.optimizer}-rho{c.rho:g}-m{m}-e{c.epochs}-seed{c.seed}"


def confidence_interval(values: list[float], level: float = 0.95) -> float:
    """Half-width of the t-interval of the mean (NaN for fewer than two values)."""
    if len(values) < 2:
        return math.nan
    from scipy import stats

    sem = float(np.std(values, ddof=1)) / math.sqrt(len(values))
    return float(stats.t.ppf(0.5 + level / 2, len(values) - 1)) * sem


def compare(
    base: configs.Config,
    rhos: list[float],
    seeds: list[int],
    out: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    command: str | None = None,
    checkpoint_every: int | None = None,
) -> dict[str, Any]:
    """Runs the grid (or resumes it) and writes results.json, results.md and results.png."""
    out = Path(out)
    grid = {"base": base.to_dict(), "rhos": rhos, "seeds": seeds}
    grid_file = out / "compare.json"
    if resume:
        if not grid_file.is_file():
            raise RunDirError(f"--resume: {out} holds no comparison to resume (no compare.json).")
        if json.loads(grid_file.read_text()) != json.loads(json.dumps(grid)):
            raise RunDirError(f"--resume: the settings differ from the comparison in {out}.")
    else:
        if out.exists() and any(out.iterdir()):
            raise RunDirError(
                f"--out {out} already exists and is not empty; pass --resume to continue "
                "that comparison, or choose another --out."
            )
        out.mkdir(parents=True, exist_ok=True)
        grid_file.write_text(json.dumps(grid, indent=2) + "\n")

    plan = plan_runs(base, rhos, seeds)
    summaries, curves = [], defaultdict(list)
    for i, config in enumerate(plan, 1):
        run_dir = out / "runs" / run_name(config)
        label = f"[{i}/{len(plan)}] {config.optimizer} rho={config.rho:g} e={config.epochs} seed={config.seed}"
        if (run_dir / "summary.json").is_file():
            summary = json.loads((run_dir / "summary.json").read_text())
        else:
            summary = train.train_and_evaluate(
                config,
                run_dir,
                resume=resume and (run_dir / "config.json").is_file(),
                progress=progress,
                description=label,
                checkpoint_every=checkpoint_every,
            )
        summaries.append(summary)
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        curves[_key(config)].append([r["test_accuracy"] for r in rows])
        if progress:
            print(
                f"{label}: test accuracy {summary['test_accuracy']:.4f} ({summary['wall_seconds']:.1f} s)",
                file=sys.stderr,
            )

    results = _report(base, plan, summaries, command)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(results["markdown"])
    _plot(out / "results.png", base, curves, results)
    return results


def _key(c: configs.Config) -> tuple:
    return (c.optimizer, c.rho, c.m, c.epochs)


def _report(base, plan, summaries, command) -> dict[str, Any]:
    groups: dict[tuple, list[float]] = defaultdict(list)
    for c, s in zip(plan, summaries, strict=True):
        groups[_key(c)].append(s["test_accuracy"])
    sgd = {k: v for k, v in groups.items() if k[0] == "sgd"}
    best_sgd = max(sgd, key=lambda k: np.mean(sgd[k])) if sgd else None
    table = []
    for key, values in groups.items():
        if key[0] == "sgd" and key != best_sgd:
            continue
        optimizer, rho, m, epochs = key
        table.append(
            {
                "method": "SGD" if optimizer == "sgd" else "SAM",
                "rho": rho,
                "m": m,
                "epochs": epochs,
                "seeds": len(values),
                "mean": float(np.mean(values)),
                "ci95": confidence_interval(values),
                "values": values,
            }
        )

    def epoch_cost(optimizer: str) -> float:
        return float(
            np.median(
                [s["median_epoch_seconds"] for s in summaries if s["optimizer"] == optimizer]
                or [math.nan]
            )
        )

    timing = {
        "sgd_median_epoch_seconds": epoch_cost("sgd"),
        "sam_median_epoch_seconds": epoch_cost("sam"),
    }
    timing["sam_over_sgd_epoch_cost"] = (
        timing["sam_median_epoch_seconds"] / timing["sgd_median_epoch_seconds"]
    )

    noise = f"{base.label_noise:.0%} of the training labels flipped, " if base.label_noise else ""
    lines = [
        f"# SAM vs SGD: {base.dataset}, {base.model}",
        "",
        f"{noise}batch {base.batch_size}, lr {base.lr:g} (cosine), momentum {base.momentum:g}, "
        f"weight decay {base.weight_decay:g}, augmentation {base.augment}; "
        f"{len(set(s['seed'] for s in summaries))} seeds.",
        "",
        "| method | ρ | m | epochs | test accuracy (%) |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in table:
        ci = "n/a" if math.isnan(row["ci95"]) else f"{100 * row['ci95']:.1f}"
        m = "-" if row["method"] == "SGD" else ("batch" if row["m"] is None else str(row["m"]))
        lines.append(
            f"| {row['method']} | {row['rho']:g} | {m} | {row['epochs']} | "
            f"{100 * row['mean']:.1f} ± {ci} |"
        )
    lines += [
        "",
        "Mean over seeds ± half-width of the 95% t-interval. SGD is trained for the "
        "same number of epochs as SAM and for twice as many; the better is reported "
        "(the paper's protocol). All SGD rows:",
        "",
    ]
    for key, values in sgd.items():
        lines.append(
            f"- SGD {key[3]} epochs: {100 * np.mean(values):.1f} ± {100 * confidence_interval(values):.1f}"
        )
    lines += [
        "",
        f"Per-epoch cost of SAM relative to SGD in this run: {timing['sam_over_sgd_epoch_cost']:.2f}x "
        f"(median epoch {timing['sam_median_epoch_seconds']:.3f} s vs {timing['sgd_median_epoch_seconds']:.3f} s).",
    ]
    if command:
        lines += ["", f"Command: `{command}`"]
    return {
        "command": command,
        "config": base.to_dict(),
        "runs": summaries,
        "table": table,
        "timing": timing,
        "markdown": "\n".join(lines) + "\n",
    }


def _plot(path: Path, base, curves, results) -> None:
    # A bare Figure: no pyplot, so no backend is switched in the caller's
    # process (a notebook keeps its inline plots).
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    for (optimizer, rho, m, epochs), runs in sorted(
        curves.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][3])
    ):
        acc = 100 * np.asarray(runs)
        mean, std = acc.mean(0), acc.std(0)
        x = np.arange(1, len(mean) + 1)
        label = (
            f"SGD, {epochs} epochs"
            if optimizer == "sgd"
            else f"SAM ρ={rho:g}, m={'batch' if m is None else m}"
        )
        line = ax.plot(x, mean, label=label, linestyle="--" if optimizer == "sgd" else "-")[0]
        ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    noise = f", {base.label_noise:.0%} label noise" if base.label_noise else ""
    ax.set_title(f"{base.dataset} ({base.model}{noise}): test accuracy per epoch")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
