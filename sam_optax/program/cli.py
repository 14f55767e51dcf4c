"""The ``sam-optax`` command line: ``train``, ``compare`` and ``analyze``.

The run flags are generated from the fields of
:class:`~sam_optax.program.configs.Config`: one flag per field (``--`` and
the name in kebab case), its help text from the field's metadata, its type
from the field's annotation, its default from the recipe (shown per dataset).
A bad value exits with code 2 and a message naming the flag.

Before a command runs, the packages of the ``program`` extra (read from the
installed package's own metadata, or from the ``pyproject.toml`` of the
source tree it runs from) are checked, so that without them ``sam-optax``
says which are missing and the ``pip`` command that installs them here,
instead of dying with a traceback. Ctrl-C or SIGTERM stops a run between two
steps with a checkpoint of that step: two lines (where it stopped, the
checkpoint, the command that continues it) and exit code 130 (Ctrl-C) or
143 (SIGTERM).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import math
import os
import re
import shlex
import signal
import sys
import threading
import time
import tomllib
import warnings
from collections.abc import Callable
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sam_optax import _known_issues
from sam_optax.program import configs
from sam_optax.program.errors import ConfigFileError
from sam_optax.program.errors import DataError
from sam_optax.program.errors import Interrupted
from sam_optax.program.errors import RunDirError
from sam_optax.program.errors import TrainingDiverged
from sam_optax.program.errors import UsageError

DISTRIBUTION, EXTRA = "sam-optax", "program"
DEFAULT_SEEDS = [0, 1, 2]
# The Config fields whose flags `compare` replaces by comma lists (the grid).
GRID_FIELDS = ("rho", "seed", "method")


def _installed() -> importlib.metadata.Distribution | None:
    try:
        return importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None


# The folder above the package: a clone's root when it holds sam-optax's pyproject.toml.
PACKAGE_PARENT = Path(__file__).resolve().parents[2]


def source_tree() -> Path | None:
    """The root of the clone this package runs from (``pip install -e .``, or not
    installed at all), or ``None`` for a package installed into site-packages."""
    pyproject = PACKAGE_PARENT / "pyproject.toml"
    if not pyproject.is_file():
        return None
    name = tomllib.loads(pyproject.read_text()).get("project", {}).get("name")
    return PACKAGE_PARENT if name == DISTRIBUTION else None


def install_hint() -> str:
    """The command that installs the ``program`` extra here.

    From a clone: ``pip install -e '<clone>[program]'`` (PyPI has no
    sam-optax); from an installed package: ``pip install 'sam-optax[program]'``
    (pip reads the extra from the installed package's own metadata).
    """
    root = source_tree()
    if root is None:
        return f"pip install {shlex.quote(f'{DISTRIBUTION}[{EXTRA}]')}"
    return f"pip install -e {shlex.quote(f'{root}[{EXTRA}]')}"


def program_requirements() -> list[str]:
    """The distributions the ``program`` extra requires: from the installed package's
    metadata, else from the ``pyproject.toml`` of the source tree it runs from.

    Empty when neither can be read: then nothing can be checked.
    """
    dist = _installed()
    if dist is not None:
        requires = []
        for requirement in dist.requires or []:
            spec, _, marker = requirement.partition(";")
            if re.search(rf"""extra\s*==\s*["']{EXTRA}["']""", marker):
                requires.append(spec)
    else:
        root = source_tree()
        if root is None:
            return []
        pyproject = tomllib.loads((root / "pyproject.toml").read_text())
        requires = pyproject["project"]["optional-dependencies"][EXTRA]
    return [re.match(r"[A-Za-z0-9._-]+", spec.strip()).group() for spec in requires]


def missing_program_packages() -> list[str]:
    """The distributions of the ``program`` extra that are not installed here."""
    missing = []
    for name in program_requirements():
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    return missing


# --------------------------------------------------------------------------
# Flags: one per Config field, each default shown once (it comes from the recipe).
# --------------------------------------------------------------------------


def _value_parser(name: str) -> Callable[[str], Any]:
    """argparse's ``type`` for field ``name``: the message names what was expected."""

    def parse(text: str) -> Any:
        try:
            return configs.parse_value(name, text)
        except UsageError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return parse


def _list_parser(kind: Callable[[str], Any], what: str) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a comma list of {what}, got {text!r}"
            ) from None
        twice = sorted({str(v) for v in values if values.count(v) > 1})
        if twice:  # a run counted twice would make a spread out of one result
            raise argparse.ArgumentTypeError(
                f"{', '.join(twice)} given more than once in {text!r}: name each once"
            )
        return values

    return parse


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _shown(name: str, value: Any) -> str:
    if value is None:
        return configs.Config.__dataclass_fields__[name].metadata["none"][0]
    return value if isinstance(value, str) else repr(value)


def _recipe_defaults(name: str) -> str | None:
    """``'default 40 (digits), 200 (cifar10, ...)'``: the default of each dataset (``None``
    when every recipe leaves the field unset)."""
    values = {d: getattr(configs.recipe(r), name) for d, r in configs.DATASET_RECIPES.items()}
    if name == "dataset":
        return f"default {configs.recipe(configs.DEFAULT_RECIPE).dataset}"
    if all(v is None for v in values.values()):
        return None
    by_value: dict[str, list[str]] = {}
    for dataset, value in values.items():
        by_value.setdefault(_shown(name, value), []).append(dataset)
    if len(by_value) == 1:
        return f"default {next(iter(by_value))}"
    return "default " + ", ".join(f"{v} ({', '.join(d)})" for v, d in by_value.items())


def _add_config_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One flag per :class:`~sam_optax.program.configs.Config` field (absent flags stay absent)."""
    for field in dataclasses.fields(configs.Config):
        if field.name in skip:
            continue
        text = field.metadata["help"]
        if field.metadata["choices"]:
            text += f"; one of {', '.join(field.metadata['choices'])}"
        defaults = _recipe_defaults(field.name)
        if defaults:
            text += f" [{defaults}]"
        kind, _ = configs.field_kinds()[field.name]
        if kind is bool:
            kwargs: dict[str, Any] = {"action": argparse.BooleanOptionalAction}
        else:
            kwargs = {"type": _value_parser(field.name), "metavar": field.name.upper()}
        parser.add_argument(
            configs.flag(field.name),
            dest=field.name,
            default=argparse.SUPPRESS,
            help=text.replace("%", "%%"),
            **kwargs,
        )


def _add_run_flags(parser: argparse.ArgumentParser, command: str) -> None:
    """The recipe and config flags (each defaulting to the recipe), then the run controls."""
    parser.add_argument(
        "--config",
        default=argparse.SUPPRESS,
        metavar="RECIPE|PATH",
        help=f"the settings the other flags override: a recipe, one of {', '.join(configs.RECIPES)}, "
        "or a saved config.json (or the run directory holding one) to start a new run from "
        f"(default: the recipe of --dataset, else {configs.DEFAULT_RECIPE})",
    )
    _add_config_flags(parser, skip=GRID_FIELDS if command == "compare" else ())
    if command == "compare":
        _add_grid_flags(parser)
    _add_control_flags(parser, command)
    _add_host_flags(parser)


def _add_grid_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--method",
        dest="methods",
        type=_list_parser(str.strip, "method names"),
        default=None,
        help=f"comma list of sgd, {', '.join(configs.METHODS)} "
        "(default: the recipe's method, and SGD through --rho 0)",
    )
    parser.add_argument(
        "--rho",
        dest="rhos",
        type=_list_parser(float, "numbers"),
        default=None,
        help="comma list of rho values, 0 meaning SGD (default: 0 and the recipe's rho; "
        "with --method, the recipe's rho). A method with a radius of its own "
        "(MSAM: --msam-rho) runs once per seed.",
    )
    parser.add_argument(
        "--seeds",
        type=_list_parser(int, "integers"),
        default=None,
        help=f"comma list of seeds (default: {','.join(map(str, DEFAULT_SEEDS))})",
    )


def _add_control_flags(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument(
        "--out",
        help=f"run directory, never overwritten (default: runs/{command}-DATASET-TIMESTAMP)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last checkpoint, with its own settings "
        "(a flag given must agree with them)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help=f"replace the {'run' if command == 'train' else 'comparison'} in --out: its files "
        "are deleted first (refused for a directory sam-optax did not write, or one in use)",
    )
    parser.add_argument(
        "--checkpoint-every",
        type=_positive_int,
        default=None,
        metavar="STEPS",
        help="also checkpoint every STEPS steps within an epoch (default: at epoch ends only)",
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bars on stderr (default: when stderr is a terminal)",
    )


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


# Measured: `time sam-optax compare` (the default comparison, 9 runs), docs/guide/program.md.
COMPARE_TIME = "163 s measured on 2 CPU cores busy with other work: count on about 3 minutes"


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
        f"(the default: digits with 40%% label noise, {COMPARE_TIME})",
    )
    _add_run_flags(compare, "compare")
    analyze = sub.add_parser(
        "analyze",
        help="sharpness of a finished run: Hessian top eigenvalues, ascent sharpness, landscapes",
    )
    analyze.add_argument(
        "run_dir",
        help="a run directory written by `sam-optax train` (or one of a comparison's: "
        "DIR/runs/NAME; given the comparison, analyze lists them)",
    )
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


def given_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The Config values given as flags (absent flags are absent)."""
    names = {f.name for f in dataclasses.fields(configs.Config)}
    return {k: v for k, v in vars(args).items() if k in names}


def config_from_args(args: argparse.Namespace) -> tuple[str, configs.Config]:
    """``(base recipe name, resolved Config)`` of a new run from parsed flags."""
    return configs.resolve(getattr(args, "config", None), given_settings(args))


# --------------------------------------------------------------------------
# Commands.
# --------------------------------------------------------------------------


def _out_dir(args: argparse.Namespace, dataset: str | None) -> Path:
    """The run directory: ``--out``, else a new one under ``runs/``; checked before any work.

    Kept as ``args.out_dir`` for the message of a second Ctrl-C (:func:`main`).
    """
    from sam_optax.program.rundir import check_out_path

    if args.resume and not args.out:
        raise UsageError("--resume needs --out (the run directory to continue).")
    if args.resume and args.overwrite:
        raise UsageError(
            "--resume continues the run in --out, --overwrite replaces it: pass one of them."
        )
    if args.out:
        out = Path(args.out)
    else:
        out = Path("runs") / f"{args.command}-{dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    check_out_path(out)
    args.out_dir = out
    return out


def _command_line(argv: list[str]) -> str:
    return "sam-optax " + " ".join(shlex.quote(a) for a in argv)


def _resume_command(args: argparse.Namespace, out: Path) -> str:
    return f"sam-optax {args.command} --out {shlex.quote(str(out))} --resume"


def _without(argv: list[str], flags: dict[str, int]) -> list[str]:
    """``argv`` less each of ``flags`` (``--flag`` and its ``n`` values, or ``--flag=value``)."""
    kept, skip = [], 0
    for arg in argv:
        if skip:
            skip -= 1
            continue
        name, given_value = arg.split("=", 1)[0], "=" in arg
        if name in flags:
            skip = 0 if given_value else flags[name]
            continue
        kept.append(arg)
    return kept


def _retry_command(
    args: argparse.Namespace, argv: list[str], out: Path, config: configs.Config
) -> str | None:
    """After a divergence: the same command with a tenth of the learning rate, replacing the
    run in ``out`` (``--overwrite``); a resumed run starts from its own ``config.json``."""
    kept = _without(argv, {"--resume": 0, "--overwrite": 0, "--lr": 1, "--out": 1})
    if args.resume:
        if args.command != "train":
            return None
        kept = ["--config", str(out / "config.json"), *_without(kept, {"--config": 1})]
    retry = [*kept, "--lr", f"{config.lr / 10:g}", "--out", str(out), "--overwrite"]
    return _command_line(retry)


def _options(args: argparse.Namespace, stop: threading.Event | None) -> Any:
    """How the run is carried out: progress bars on a terminal (stderr), one line per epoch on
    stdout unless the bars show there (stdout a terminal too)."""
    from sam_optax.program import train

    progress = sys.stderr.isatty() if args.progress is None else args.progress
    return train.RunOptions(
        resume=args.resume,
        progress=progress,
        checkpoint_every=args.checkpoint_every,
        stop=stop,
        overwrite=args.overwrite,
        epoch_lines=not (progress and sys.stdout.isatty()),
    )


def _settings_title(name: str) -> str:
    origin = f"recipe {name}" if name in configs.RECIPES else f"from {name}"
    return f"settings ({origin}; * = changed by a flag):"


# What each file and folder of a run (or comparison) directory holds, for the last line.
RUN_FILES = {
    "config.json": "the settings",
    "label_noise.json": "the flipped labels",
    "metrics.jsonl": "one line per epoch",
    "checkpoints/": "the last two",
    "summary.json": "the result",
    "analysis/": "sam-optax analyze's",
}
COMPARE_FILES = {
    "compare.json": "the grid",
    "runs/": "one run directory per run",
    "results.md": "the table above",
    "results.json": "every number",
    "results.png": "test accuracy per epoch",
    "pareto.png": "accuracy against cost",
}


def written(out: Path, described: dict[str, str]) -> str:
    """``'config.json (the settings), metrics.jsonl (...), ...'``: what ``out`` holds now."""
    names = [p.name + ("/" if p.is_dir() else "") for p in out.iterdir()]
    names = [n for n in described if n in names] + sorted(
        n for n in names if n not in described and not n.startswith(".")
    )
    return ", ".join(f"{n} ({described[n]})" if n in described else n for n in names)


def _train(args: argparse.Namespace, argv: list[str], stop: threading.Event | None) -> int:
    import jax

    from sam_optax.program import train
    from sam_optax.program.rundir import RunDir

    if args.resume:
        out = _out_dir(args, None)
        saved = RunDir(out).saved_config()
        config = configs.resumed(
            saved, getattr(args, "config", None), given_settings(args), out / "config.json"
        )
        settings = configs.describe(config, f"settings of the run in {out} (resumed):")
    else:
        name, config = config_from_args(args)
        own = configs.METHODS[config.method].radius
        given_rho = given_settings(args).get("rho")
        if own != "rho" and given_rho not in (None, 0):
            flag = "--" + own.replace("_", "-")
            raise UsageError(
                f"--rho {given_rho:g} is not the radius of --method {config.method}: it takes "
                f"{flag} ({getattr(config, own):g}, on its own scale), and --rho only switches it "
                f"off (--rho 0 trains with SGD). Pass {flag} {given_rho:g} instead."
            )
        out = _out_dir(args, config.dataset)
        reference = configs.base_config(name)[1]
        settings = configs.describe(config, _settings_title(name), reference=reference)
    configs.validate(config, jax.device_count())
    print(f"{_command_line(argv)}\n{settings}", flush=True)
    try:
        summary = train.train_and_evaluate(config, out, _options(args, stop))
    except Interrupted as err:
        raise Interrupted(str(err), _resume_command(args, out), err.signum) from None
    except TrainingDiverged as err:
        raise TrainingDiverged(str(err), _retry_command(args, argv, out, config)) from None
    print(
        f"{summary['optimizer']} rho={config.radius:g}: test accuracy "
        f"{summary['test_accuracy']:.4f} after {config.epochs} epochs "
        f"({summary['wall_seconds']:.1f} s).\nWrote in {out}: {written(out, RUN_FILES)}."
    )
    return 0


def _grid_line(methods: list[str], rhos: list[float], seeds: list[int], runs: int) -> str:
    """``grid: SGD (rho 0, E and 2E epochs), sam at rho 0.2; seeds 0,1,2: 9 runs``."""
    parts = ["SGD (rho 0, at 1x and 2x the epochs)"] if 0.0 in rhos else []
    radii = ",".join(f"{r:g}" for r in rhos if r > 0)
    for method in methods if radii else []:
        own = configs.METHODS[method].radius
        parts.append(
            f"{method} at --{own.replace('_', '-')} {radii if own == 'rho' else '(its own)'}"
        )
    return f"grid: {', '.join(parts)}; seeds {','.join(map(str, seeds))}: {runs} runs"


def _compare(args: argparse.Namespace, argv: list[str], stop: threading.Event | None) -> int:
    import jax

    from sam_optax.program import compare

    reference = None
    if args.resume:
        out = _out_dir(args, None)
        saved = compare.saved_grid(out)
        where = out / "compare.json"
        config = configs.resumed(
            saved["base"], getattr(args, "config", None), given_settings(args), where
        )
        methods, rhos, seeds = _resumed_grid(args, config, saved, where)
        title = f"settings of the comparison in {out} (resumed):"
    else:
        name, config = config_from_args(args)
        out = _out_dir(args, config.dataset)
        methods, rhos = _grid(args.methods, args.rhos, config)
        seeds = DEFAULT_SEEDS if args.seeds is None else args.seeds
        title, reference = _settings_title(name), configs.base_config(name)[1]
    if not seeds:
        raise UsageError("--seeds must name at least one seed.")
    for method in methods or [config.method]:
        for rho in rhos:
            configs.validate(config.replace(method=method, rho=rho), jax.device_count())
    plan = compare.plan_runs(config, methods, rhos, seeds)
    settings = configs.describe(config, title, reference=reference, runs=plan, skip=GRID_FIELDS)
    grid = _grid_line(methods, rhos, seeds, len(plan))
    print(f"{_command_line(argv)}\n{settings}\n  {grid}", flush=True)
    try:
        results = compare.compare(
            config,
            rhos,
            seeds,
            out,
            methods=methods,
            options=_options(args, stop),
            command=_command_line(argv),
        )
    except Interrupted as err:
        raise Interrupted(str(err), _resume_command(args, out), err.signum) from None
    except TrainingDiverged as err:
        raise TrainingDiverged(str(err), _retry_command(args, argv, out, config)) from None
    print(results["markdown"])
    print(f"Wrote in {out}: {written(out, COMPARE_FILES)}.")
    return 0


def _grid(
    methods: list[str] | None, rhos: list[float] | None, config: configs.Config
) -> tuple[list[str], list[float]]:
    """``(methods, rhos)`` of a comparison from ``--method`` and ``--rho``: SGD runs when 0 is
    among the radii, and every method at every positive radius; ``--method sgd,...`` adds 0."""
    given = methods is not None
    methods = methods if given else [config.method]
    unknown = [m for m in methods if m != "sgd" and m not in configs.METHODS]
    if not methods or unknown:
        raise UsageError(
            f"--method must be a comma list of sgd, {', '.join(configs.METHODS)}; got {methods}."
        )
    default = [config.rho] if given else [0.0, config.rho]
    rhos = rhos if rhos is not None else default
    if not rhos or any(r < 0 or not math.isfinite(r) for r in rhos):
        raise UsageError(f"--rho must be a comma list of numbers >= 0, got {rhos}.")
    if "sgd" in methods:
        rhos = [0.0, *rhos]
    methods = [m for m in methods if m != "sgd"]
    if not methods:
        rhos = [0.0]
    return methods, sorted(set(rhos))


def _resumed_grid(
    args: argparse.Namespace, config: configs.Config, saved: dict[str, Any], where: Path
) -> tuple[list[str], list[float], list[int]]:
    """The saved grid of a resumed comparison; ``--method``, ``--rho`` and ``--seeds``,
    when given, must agree with it."""
    methods, rhos, seeds = saved["methods"], saved["rhos"], saved["seeds"]
    ran = (["sgd"] if 0.0 in rhos else []) + methods
    asked_methods, asked_rhos = _grid(
        args.methods if args.methods is not None else ran, args.rhos, config
    )
    conflicts = []
    if args.methods is not None and asked_methods != methods:
        conflicts.append(f"--method {','.join(args.methods)} (the comparison has {','.join(ran)})")
    if args.rhos is not None and asked_rhos != rhos:
        conflicts.append(
            f"--rho {','.join(f'{r:g}' for r in args.rhos)} "
            f"(the comparison has {','.join(f'{r:g}' for r in rhos)})"
        )
    if args.seeds is not None and args.seeds != seeds:
        conflicts.append(
            f"--seeds {','.join(map(str, args.seeds))} "
            f"(the comparison has {','.join(map(str, seeds))})"
        )
    if conflicts:
        raise UsageError(
            f"--resume: {'; '.join(conflicts)}, in {where}. A resumed comparison keeps its own "
            "grid: leave those flags out, or start a new one in another --out."
        )
    return methods, rhos, seeds


def _analyze(args: argparse.Namespace, argv: list[str], stop: threading.Event | None) -> int:
    del argv, stop
    from sam_optax.program import analyze

    if args.examples < 1:
        raise UsageError(f"--examples must be at least 1 (training examples), got {args.examples}.")
    if args.iterations < 5:
        raise UsageError(
            f"--iterations must be at least 5 (Lanczos iterations for the 5 largest Hessian "
            f"eigenvalues), got {args.iterations}."
        )
    if not (math.isfinite(args.rho) and args.rho > 0):
        raise UsageError(f"--rho must be a finite radius > 0, got {args.rho}.")

    analyze.analyze_run(
        args.run_dir,
        rho=args.rho,
        examples=args.examples,
        plots=not args.no_plots,
        num_iterations=args.iterations,
    )
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace, list[str], threading.Event | None], int]] = {
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
    else:
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
    note = _known_issues.avoid_persistent_cache_hang()
    if note:
        print(f"sam-optax: note: {note}", file=sys.stderr, flush=True)


class StopRequest(threading.Event):
    """Set by the first Ctrl-C (SIGINT) or SIGTERM; ``signum`` is the signal's number."""

    signum: int = signal.SIGINT

    def request(self, signum: int) -> None:
        self.signum = signum
        self.set()


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopRequest | None]:
    """A :class:`StopRequest` that the first Ctrl-C (SIGINT) or SIGTERM sets: the run
    checkpoints the step it is at and stops before the next.

    A second signal interrupts at once (``KeyboardInterrupt``). A signal whose
    handler is not Python's default (ignored, as SIGINT for a job a
    non-interactive shell started in the background, or taken over by the
    caller) is left alone; outside the main thread nothing is installed and
    ``None`` is yielded. Under ``jax.distributed``, jax's preemption service
    takes SIGTERM (its handler replaces this one when it starts) and Ctrl-C is
    forwarded to it as a SIGTERM to this process, so that every process stops
    at the same step (:mod:`sam_optax.program.train`).
    """
    if threading.current_thread() is not threading.main_thread():
        yield None
        return
    defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
    ours = [s for s in STOP_SIGNALS if signal.getsignal(s) is defaults[s]]
    stop = StopRequest()

    def handler(signum: int, frame: Any) -> None:
        if stop.is_set():
            for s in ours:
                signal.signal(s, defaults[s])
            stop.signum = signum
            raise KeyboardInterrupt
        stop.request(signum)
        jax = sys.modules.get("jax")
        if (
            signum == signal.SIGINT
            and jax is not None
            and jax.distributed.is_initialized()
            and jax.config.jax_enable_preemption_service
        ):
            os.kill(os.getpid(), signal.SIGTERM)  # to jax's preemption service

    for s in ours:
        signal.signal(s, handler)
    try:
        yield stop
    finally:
        for s in ours:
            if signal.getsignal(s) is handler:
                signal.signal(s, defaults[s])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    missing = missing_program_packages()
    if missing:
        print(
            f"sam-optax: error: the program needs the '{EXTRA}' extra; missing here: "
            f"{', '.join(missing)}. Install it with: {install_hint()}",
            file=sys.stderr,
        )
        return 2
    stoppable = stop_on_signals() if args.command != "analyze" else contextlib.nullcontext()
    stop = None
    try:
        with stoppable as stop:
            if args.command != "analyze":
                _initialize_distributed(args)
            return COMMANDS[args.command](args, argv, stop)
    except (UsageError, DataError, RunDirError, ConfigFileError) as err:
        print(f"sam-optax: error: {err}", file=sys.stderr)
        return 2
    except TrainingDiverged as err:
        print(f"sam-optax: error: {err}", file=sys.stderr)
        if err.retry:
            print(
                f"sam-optax: to start again with a tenth of the learning rate, replacing "
                f"this run: {err.retry}",
                file=sys.stderr,
            )
        return 3
    except Interrupted as err:
        print(f"sam-optax: {err}", file=sys.stderr)
        if err.resume:
            print(f"sam-optax: continue with: {err.resume}", file=sys.stderr)
        return 128 + err.signum
    except KeyboardInterrupt:
        print("sam-optax: interrupted at once (a second signal).", file=sys.stderr)
        out = getattr(args, "out_dir", None)
        marker = "compare.json" if args.command == "compare" else "config.json"
        if out is not None and (Path(out) / marker).is_file():
            print(
                "sam-optax: the checkpoints written so far are kept; continue with: "
                f"{_resume_command(args, out)}",
                file=sys.stderr,
            )
        # The checkpoint being written when it came is abandoned: its coroutine
        # is never awaited, which Python would report at exit.
        warnings.filterwarnings("ignore", message="coroutine .* was never awaited")
        return 128 + (stop.signum if stop is not None else signal.SIGINT)
    except BrokenPipeError:  # stdout closed early (`sam-optax ... | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
