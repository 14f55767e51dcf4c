"""The ``sam-optax`` command line: ``train``, ``compare`` and ``analyze``.

This module imports nothing beyond the standard library and
:mod:`sam_optax.program.configs` until a command runs, so that without the
``program`` extra ``sam-optax`` says which packages are missing and how to
install them instead of dying with a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import math
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sam_optax.program import configs
from sam_optax.program.errors import DataError
from sam_optax.program.errors import RunDirError
from sam_optax.program.errors import TrainingDiverged
from sam_optax.program.errors import UsageError

# Imported by name (module, the package pip installs it from) before a command runs.
PROGRAM_MODULES = (
    ("flax", "flax"),
    ("orbax.checkpoint", "orbax-checkpoint"),
    ("sklearn", "scikit-learn"),
    ("scipy", "scipy"),
    ("matplotlib", "matplotlib"),
    ("tqdm", "tqdm"),
)
INSTALL_HINT = "pip install 'sam-optax[program]'"


def missing_program_modules() -> list[str]:
    """The packages of the ``program`` extra that cannot be imported here."""
    missing = []
    for module, package in PROGRAM_MODULES:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(package)
    return missing


# --------------------------------------------------------------------------
# Flags: one per Config field, each default shown once (it comes from the recipe).
# --------------------------------------------------------------------------


def _m(value: str) -> int | None:
    if value.lower() in ("none", "all", "batch", "0"):
        return None
    return int(value)


def _optional_float(value: str) -> float | None:
    return None if value.lower() in ("none", "off", "0") else float(value)


def _floats(value: str) -> list[float]:
    return [float(v) for v in value.split(",") if v.strip()]


def _names(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _ints(value: str) -> list[int]:
    return [int(v) for v in value.split(",") if v.strip()]


def _recipe_defaults(field: str) -> str:
    """``'40 (digits), 200 (cifar10, cifar100, fashion_mnist)'``: the default of each dataset."""
    by_value: dict[str, list[str]] = {}
    for dataset, name in configs.DATASET_RECIPES.items():
        by_value.setdefault(repr(getattr(configs.recipe(name), field)), []).append(dataset)
    if len(by_value) == 1:
        return f"default {next(iter(by_value))}"
    return "default " + ", ".join(f"{v} ({', '.join(d)})" for v, d in by_value.items())


# (flag, Config field, type or action, what it is); the default is the recipe's.
RUN_FLAGS: tuple[tuple[str, str, Any, str], ...] = (
    ("--dataset", "dataset", str, f"one of {', '.join(configs.DATASETS)}; picks its recipe"),
    ("--data-dir", "data_dir", str, "folder with the dataset files (default: $SAM_OPTAX_DATA or ~/.cache/sam_optax)"),
    ("--model", "model", str, f"one of {', '.join(configs.MODELS)}"),
    ("--dropout", "dropout", float, "dropout rate of models that have it"),
    ("--epochs", "epochs", int, "training epochs"),
    ("--batch-size", "batch_size", int, "global batch size"),
    ("--lr", "lr", float, "peak learning rate, cosine decay"),
    ("--momentum", "momentum", float, "SGD momentum"),
    ("--nesterov", "nesterov", argparse.BooleanOptionalAction, "Nesterov momentum"),
    ("--weight-decay", "weight_decay", float, "weight decay"),
    ("--l2-in-loss", "l2_in_loss", argparse.BooleanOptionalAction, "weight decay as 0.5*wd*|w|^2 in the loss, as the paper's code (else decoupled)"),
    ("--clip-norm", "clip_norm", _optional_float, "clip the averaged gradient to this global norm ('none': off)"),
    ("--rho", "rho", float, "SAM radius, 0 for SGD"),
    ("--method", "method", str, f"one of {', '.join(configs.METHODS)}"),
    ("--norm", "norm", float, "p of the perturbation ball, 'inf' for sign"),
    ("--adaptive", "adaptive", argparse.BooleanOptionalAction, "ASAM"),
    ("--m", "m", _m, "examples per perturbation (m-sharpness), 'batch' for the per-device batch"),
    ("--sync-perturbation", "sync_perturbation", argparse.BooleanOptionalAction, "one perturbation for the whole batch"),
    ("--label-noise", "label_noise", float, "fraction of training labels flipped"),
    ("--label-smoothing", "label_smoothing", float, "label smoothing"),
    ("--augment", "augment", str, f"one of {', '.join(configs.AUGMENTATIONS)}"),
    ("--seed", "seed", int, "seed of init, data order and noise"),
    ("--mesh", "mesh", str, "device mesh like 'data=4,model=2': data replicas x params sharded over model"),
    ("--sync-group", "sync_group", int, "devices sharing one perturbation (the paper's inner_group_size)"),
    ("--gsam-alpha", "gsam_alpha", float, "GSAM's alpha"),
    ("--looksam-every", "looksam_every", int, "LookSAM's period k"),
    ("--looksam-alpha", "looksam_alpha", float, "LookSAM's alpha"),
    ("--msam-rho", "msam_rho", float, "MSAM's radius (not on SAM's scale)"),
    ("--rst-probability", "rst_probability", float, "RST's probability of a SAM step"),
    ("--aesam-threshold", "aesam_threshold", float, "AE-SAM's c, moved linearly from +c to -c"),
    ("--fsam-sigma", "fsam_sigma", float, "F-SAM's sigma"),
    ("--fsam-decay", "fsam_decay", float, "F-SAM's running-mean decay"),
)  # fmt: skip


def _add_run_flags(parser: argparse.ArgumentParser, command: str) -> None:
    """The recipe and config flags (each defaulting to the recipe), then the run controls."""
    parser.add_argument(
        "--config",
        default=argparse.SUPPRESS,
        help=f"a recipe whose values the other flags override; one of {', '.join(configs.RECIPES)} "
        f"(default: the recipe of --dataset, else {configs.DEFAULT_RECIPE})",
    )
    for flag, field, kind, text in RUN_FLAGS:
        if command == "compare" and field in ("rho", "seed", "method"):
            continue
        kwargs = {"action": kind} if kind is argparse.BooleanOptionalAction else {"type": kind}
        default = "" if field == "data_dir" else f" [{_recipe_defaults(field)}]"
        parser.add_argument(
            flag, dest=field, default=argparse.SUPPRESS, help=text + default, **kwargs
        )
    if command == "compare":
        _add_grid_flags(parser)
    _add_control_flags(parser, command)
    _add_host_flags(parser)


def _add_grid_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--method",
        dest="methods",
        type=_names,
        default=None,
        help=f"comma list of sgd, {', '.join(configs.METHODS)} "
        "(default: the recipe's method, and SGD through --rho 0)",
    )
    parser.add_argument(
        "--rho",
        dest="rhos",
        type=_floats,
        default=None,
        help="comma list of rho values, 0 meaning SGD (default: 0 and the recipe's rho; "
        "with --method, the recipe's rho)",
    )
    parser.add_argument(
        "--seeds", type=_ints, default=[0, 1, 2], help="comma list of seeds (default: 0,1,2)"
    )


def _add_control_flags(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument(
        "--out",
        help=f"run directory, never overwritten (default: runs/{command}-DATASET-TIMESTAMP)",
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its last checkpoint"
    )
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=None,
        metavar="STEPS",
        help="also checkpoint every STEPS steps within an epoch (default: at epoch ends only)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_host_flags(parser: argparse.ArgumentParser) -> None:
    hosts = parser.add_argument_group(
        "many hosts",
        "run one process per host with the same flags; each reads its slice of every batch",
    )
    hosts.add_argument(
        "--distributed",
        action="store_true",
        help="jax.distributed.initialize() from the cluster's environment (TPU pods, SLURM, ...)",
    )
    hosts.add_argument(
        "--coordinator", metavar="HOST:PORT", help="the coordinator's address (process 0's)"
    )
    hosts.add_argument("--num-processes", type=int, help="how many processes take part")
    hosts.add_argument(
        "--process-id", type=int, help="this process's index, 0 .. num-processes - 1"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sam-optax",
        description="Sharpness-Aware Minimization experiments (Foret et al., ICLR 2021). "
        "Each run starts from a recipe (--config, or the recipe of --dataset); every flag "
        "given replaces one of its values.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run_flags(sub.add_parser("train", help="one training run"), "train")
    compare = sub.add_parser(
        "compare",
        help="SGD vs SAM over seeds, the paper's table, results.{md,json,png} "
        "(the default: digits with 40%% label noise, ~1 minute on 2 CPU cores)",
    )
    _add_run_flags(compare, "compare")
    analyze = sub.add_parser(
        "analyze",
        help="sharpness of a finished run: Hessian top eigenvalues, ascent sharpness, landscapes",
    )
    analyze.add_argument("run_dir", help="a run directory written by `sam-optax train`")
    analyze.add_argument(
        "--rho", type=float, default=0.05, help="radius of the ascent sharpness (default: 0.05)"
    )
    analyze.add_argument(
        "--examples", type=int, default=512, help="training examples used (default: 512)"
    )
    analyze.add_argument(
        "--iterations", type=int, default=40, help="Lanczos iterations (default: 40)"
    )
    analyze.add_argument("--no-plots", action="store_true", help="numbers only, no PNGs")  # fmt: skip
    return parser


def config_from_args(args: argparse.Namespace) -> tuple[str, configs.Config]:
    """``(base recipe name, resolved Config)`` from parsed flags (absent flags are absent)."""
    fields = {f for _, f, _, _ in RUN_FLAGS}
    overrides = {k: v for k, v in vars(args).items() if k in fields}
    return configs.resolve(getattr(args, "config", None), overrides)


# --------------------------------------------------------------------------
# Commands.
# --------------------------------------------------------------------------


def _out_dir(args: argparse.Namespace, config: configs.Config) -> Path:
    if args.resume and not args.out:
        raise UsageError("--resume needs --out (the run directory to continue).")
    if args.checkpoint_every is not None and args.checkpoint_every < 1:
        raise UsageError(f"--checkpoint-every must be >= 1, got {args.checkpoint_every}.")
    if args.out:
        return Path(args.out)
    return Path("runs") / f"{args.command}-{config.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"


def _train(args: argparse.Namespace, command_line: str) -> int:
    import jax

    name, config = config_from_args(args)
    configs.validate(config, jax.device_count())
    out = _out_dir(args, config)
    from sam_optax.program import train

    print(f"{command_line}\n{configs.describe(name, config)}", flush=True)
    summary = train.train_and_evaluate(
        config,
        out,
        resume=args.resume,
        progress=not args.no_progress,
        checkpoint_every=args.checkpoint_every,
    )
    print(
        f"{summary['optimizer']} rho={config.rho:g}: test accuracy "
        f"{summary['test_accuracy']:.4f} after {config.epochs} epochs "
        f"({summary['wall_seconds']:.1f} s); run directory {out}"
    )
    return 0


def _compare(args: argparse.Namespace, command_line: str) -> int:
    import jax

    name, config = config_from_args(args)
    methods, rhos = _grid(args, config)
    if not args.seeds:
        raise UsageError("--seeds must name at least one seed.")
    for method in methods or [config.method]:
        for rho in rhos:
            configs.validate(config.replace(method=method, rho=rho), jax.device_count())
    out = _out_dir(args, config)
    from sam_optax.program import compare

    print(f"{command_line}\n{configs.describe(name, config)}", flush=True)
    results = compare.compare(
        config,
        rhos,
        args.seeds,
        out,
        methods=methods,
        resume=args.resume,
        progress=not args.no_progress,
        command=command_line,
        checkpoint_every=args.checkpoint_every,
    )
    print(results["markdown"])
    print(f"Wrote {out / 'results.md'}, results.json, results.png and pareto.png in {out}.")
    return 0


def _grid(args: argparse.Namespace, config: configs.Config) -> tuple[list[str], list[float]]:
    """``(methods, rhos)`` of a comparison: SGD runs when 0 is among the radii, and
    every method at every positive radius; ``--method sgd,...`` adds 0."""
    given = args.methods is not None
    methods = args.methods if given else [config.method]
    unknown = [m for m in methods if m != "sgd" and m not in configs.METHODS]
    if not methods or unknown:
        raise UsageError(
            f"--method must be a comma list of sgd, {', '.join(configs.METHODS)}; got {methods}."
        )
    default = [config.rho] if given else [0.0, config.rho]
    rhos = args.rhos if args.rhos is not None else default
    if not rhos or any(r < 0 or not math.isfinite(r) for r in rhos):
        raise UsageError(f"--rho must be a comma list of numbers >= 0, got {rhos}.")
    if "sgd" in methods:
        rhos = [0.0, *rhos]
    methods = [m for m in methods if m != "sgd"]
    if not methods:
        rhos = [0.0]
    return methods, sorted(set(rhos))


def _analyze(args: argparse.Namespace, command_line: str) -> int:
    del command_line
    from sam_optax.program import analyze

    analyze.analyze_run(
        args.run_dir,
        rho=args.rho,
        examples=args.examples,
        plots=not args.no_plots,
        num_iterations=args.iterations,
    )
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace, str], int]] = {
    "train": _train,
    "compare": _compare,
    "analyze": _analyze,
}


def _initialize_distributed(args: argparse.Namespace) -> None:
    """``jax.distributed.initialize`` before any JAX work, when asked to."""
    explicit = (args.coordinator, args.num_processes, args.process_id)
    if not args.distributed and all(v is None for v in explicit):
        return
    import jax

    if args.distributed:
        jax.distributed.initialize()
        return
    if any(v is None for v in explicit):
        raise UsageError("--coordinator, --num-processes and --process-id go together.")
    if not 0 <= args.process_id < args.num_processes:
        raise UsageError(
            f"--process-id must be in [0, {args.num_processes}), got {args.process_id}."
        )
    jax.distributed.initialize(
        coordinator_address=args.coordinator,
        num_processes=args.num_processes,
        process_id=args.process_id,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command_line = "sam-optax " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    missing = missing_program_modules()
    if missing:
        print(
            f"sam-optax: error: the program needs the 'program' extra; missing here: "
            f"{', '.join(missing)}. Install it with: {INSTALL_HINT}",
            file=sys.stderr,
        )
        return 2
    try:
        if args.command != "analyze":
            _initialize_distributed(args)
        return COMMANDS[args.command](args, command_line)
    except (UsageError, DataError, RunDirError) as err:
        print(f"sam-optax: error: {err}", file=sys.stderr)
        return 2
    except TrainingDiverged as err:
        print(f"sam-optax: error: {err}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
