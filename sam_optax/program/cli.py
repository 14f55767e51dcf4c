"""The ``sam-optax`` command line: ``train``, ``compare`` and ``analyze``."""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from pathlib import Path

from sam_optax.program import configs
from sam_optax.program.errors import DataError
from sam_optax.program.errors import RunDirError
from sam_optax.program.errors import UsageError

DEFAULT = configs.recipe(configs.DEFAULT_RECIPE)


def _m(value: str) -> int | None:
    if value.lower() in ("none", "all", "batch", "0"):
        return None
    return int(value)


def _floats(value: str) -> list[float]:
    return [float(v) for v in value.split(",") if v.strip()]


def _ints(value: str) -> list[int]:
    return [int(v) for v in value.split(",") if v.strip()]


def _default(name: str) -> str:
    return f"(default: {getattr(DEFAULT, name)!r} in --config {configs.DEFAULT_RECIPE})"


def _add_run_flags(p: argparse.ArgumentParser, command: str) -> None:
    from sam_optax.program.augment import AUGMENTATIONS
    from sam_optax.program.input_pipeline import DATASETS
    from sam_optax.program.models import MODELS

    p.add_argument(
        "--config",
        default=configs.DEFAULT_RECIPE,
        help=f"a recipe whose values the other flags override; one of {', '.join(configs.RECIPES)} "
        f"(default: {configs.DEFAULT_RECIPE})",
    )
    p.add_argument("--dataset", help=f"one of {', '.join(DATASETS)} {_default('dataset')}")
    p.add_argument(
        "--data-dir",
        help="folder holding the dataset files (cifar-10-batches-bin/, cifar-100-binary/, "
        "fashion_mnist/*.gz) (default: $SAM_OPTAX_DATA or ~/.cache/sam_optax; digits needs none)",
    )
    p.add_argument("--model", help=f"one of {', '.join(MODELS)} {_default('model')}")
    p.add_argument(
        "--dropout", type=float, help=f"dropout rate of models that have it {_default('dropout')}"
    )
    p.add_argument("--epochs", type=int, help=f"training epochs {_default('epochs')}")
    p.add_argument("--batch-size", type=int, help=f"global batch size {_default('batch_size')}")
    p.add_argument("--lr", type=float, help=f"peak learning rate, cosine decay {_default('lr')}")
    p.add_argument("--momentum", type=float, help=f"SGD momentum {_default('momentum')}")
    p.add_argument(
        "--nesterov", action="store_true", default=None, help="Nesterov momentum (default: off)"
    )
    p.add_argument("--weight-decay", type=float, help=f"weight decay {_default('weight_decay')}")
    if command == "compare":
        p.add_argument(
            "--rho",
            type=_floats,
            help="comma list of rho values, 0 meaning SGD (default: 0 and the config's rho, "
            f"'0,{DEFAULT.rho:g}' in --config {configs.DEFAULT_RECIPE})",
        )
    else:
        p.add_argument("--rho", type=float, help=f"SAM radius, 0 for SGD {_default('rho')}")
    p.add_argument(
        "--norm", type=float, help=f"p of the perturbation ball, 'inf' for sign {_default('norm')}"
    )
    p.add_argument("--adaptive", action="store_true", default=None, help="ASAM (default: off)")
    p.add_argument(
        "--m",
        type=_m,
        default=argparse.SUPPRESS,
        help=f"examples per perturbation (m-sharpness), 'batch' for the per-device batch {_default('m')}",
    )
    p.add_argument(
        "--sync-perturbation",
        action="store_true",
        default=None,
        help="one perturbation for the whole batch (default: off, per device / per group)",
    )
    p.add_argument(
        "--label-noise",
        type=float,
        help=f"fraction of training labels flipped {_default('label_noise')}",
    )
    p.add_argument(
        "--label-smoothing", type=float, help=f"label smoothing {_default('label_smoothing')}"
    )
    p.add_argument("--augment", help=f"one of {', '.join(AUGMENTATIONS)} {_default('augment')}")
    if command == "compare":
        p.add_argument(
            "--seeds", type=_ints, default=[0, 1, 2], help="comma list of seeds (default: 0,1,2)"
        )
    else:
        p.add_argument(
            "--seed", type=int, help=f"seed of init, data order and noise {_default('seed')}"
        )
    p.add_argument(
        "--out",
        help=f"run directory, never overwritten (default: runs/{command}-DATASET-TIMESTAMP)",
    )
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its last checkpoint"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sam-optax",
        description="Sharpness-Aware Minimization experiments (Foret et al., ICLR 2021).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser(
        "train", help="one training run", formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    _add_run_flags(p_train, "train")
    p_compare = sub.add_parser(
        "compare",
        help="SGD vs SAM over seeds, the paper's table, results.{md,json,png} "
        "(the default: digits with 40%% label noise, ~4 minutes on 2 CPU cores)",
    )
    _add_run_flags(p_compare, "compare")
    p_analyze = sub.add_parser(
        "analyze",
        help="sharpness of a finished run: Hessian top eigenvalues, ascent sharpness, landscapes",
    )
    p_analyze.add_argument("run_dir", help="a run directory written by `sam-optax train`")
    p_analyze.add_argument(
        "--rho", type=float, default=0.05, help="radius of the ascent sharpness (default: 0.05)"
    )
    p_analyze.add_argument(
        "--examples", type=int, default=512, help="training examples used (default: 512)"
    )
    p_analyze.add_argument(
        "--iterations", type=int, default=40, help="Lanczos iterations (default: 40)"
    )
    p_analyze.add_argument("--no-plots", action="store_true", help="numbers only, no PNGs")
    return parser


_FIELDS = {
    "dataset": "dataset",
    "data_dir": "data_dir",
    "model": "model",
    "dropout": "dropout",
    "epochs": "epochs",
    "batch_size": "batch_size",
    "lr": "lr",
    "momentum": "momentum",
    "nesterov": "nesterov",
    "weight_decay": "weight_decay",
    "norm": "norm",
    "adaptive": "adaptive",
    "sync_perturbation": "sync_perturbation",
    "label_noise": "label_noise",
    "label_smoothing": "label_smoothing",
    "augment": "augment",
}


def config_from_args(args: argparse.Namespace) -> configs.Config:
    config = configs.recipe(args.config)
    changes = {
        field: getattr(args, attr)
        for attr, field in _FIELDS.items()
        if getattr(args, attr) is not None
    }
    if hasattr(args, "m"):  # --m has no default: absent means "the recipe's"
        changes["m"] = args.m
    if args.command == "train":
        if args.rho is not None:
            changes["rho"] = args.rho
        if args.seed is not None:
            changes["seed"] = args.seed
    return config.replace(**changes)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command_line = "sam-optax " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    try:
        if args.command == "analyze":
            from sam_optax.program import analyze

            analyze.analyze_run(
                args.run_dir,
                rho=args.rho,
                examples=args.examples,
                plots=not args.no_plots,
                num_iterations=args.iterations,
            )
            return 0
        import jax

        config = config_from_args(args)
        n_devices = jax.local_device_count()
        out = (
            Path(args.out)
            if args.out
            else Path("runs") / f"{args.command}-{config.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
        )
        if args.resume and not args.out:
            raise UsageError("--resume needs --out (the run directory to continue).")
        if args.command == "train":
            configs.validate(config, n_devices)
            from sam_optax.program import train

            summary = train.train_and_evaluate(
                config, out, resume=args.resume, progress=not args.no_progress
            )
            print(
                f"{summary['optimizer']} rho={config.rho:g}: test accuracy "
                f"{summary['test_accuracy']:.4f} after {config.epochs} epochs "
                f"({summary['wall_seconds']:.1f} s); run directory {out}"
            )
            return 0
        rhos = args.rho if args.rho is not None else [0.0, config.rho]
        if not rhos or any(r < 0 or not math.isfinite(r) for r in rhos):
            raise UsageError(f"--rho must be a comma list of numbers >= 0, got {rhos}.")
        if not args.seeds:
            raise UsageError("--seeds must name at least one seed.")
        for rho in rhos:
            configs.validate(config.replace(rho=rho), n_devices)
        from sam_optax.program import compare

        results = compare.compare(
            config,
            rhos,
            args.seeds,
            out,
            resume=args.resume,
            progress=not args.no_progress,
            command=command_line,
        )
        print(results["markdown"])
        print(f"Wrote {out / 'results.md'}, {out / 'results.json'} and {out / 'results.png'}.")
        return 0
    except (UsageError, DataError, RunDirError) as err:
        print(f"sam-optax: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
