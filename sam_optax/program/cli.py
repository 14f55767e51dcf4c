"""The ``sam-optax`` command line: ``train``, ``compare`` and ``analyze``.

The run flags are generated from the fields of
:class:`~sam_optax.program.configs.Config`: one flag per field (``--`` and
the name in kebab case), its help text from the field's metadata, its type
from the field's annotation, its default from the recipe (shown per dataset).
A bad value exits with code 2 and a message naming the flag.

Before a command runs, the packages of the ``program`` extra (read from the
installed package's own metadata) are checked, so that without them
``sam-optax`` says which are missing and how to install them instead of
dying with a traceback. Ctrl-C stops a run between two steps: two lines
(where it stopped, the last checkpoint, the command that continues it) and
exit code 130.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import math
import re
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sam_optax import _known_issues
from sam_optax.program import configs
from sam_optax.program.errors import DataError
from sam_optax.program.errors import Interrupted
from sam_optax.program.errors import RunDirError
from sam_optax.program.errors import TrainingDiverged
from sam_optax.program.errors import UsageError

DISTRIBUTION, EXTRA = "sam-optax", "program"
INSTALL_HINT = f"pip install '{DISTRIBUTION}[{EXTRA}]'"
DEFAULT_SEEDS = [0, 1, 2]
# The Config fields whose flags `compare` replaces by comma lists (the grid).
GRID_FIELDS = ("rho", "seed", "method")


def program_requirements() -> list[str]:
    """The distributions the ``program`` extra requires, from the installed package's metadata.

    Empty when the package is not installed (run from a source tree): then
    nothing can be checked.
    """
    try:
        requires = importlib.metadata.requires(DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        return []
    names = []
    for requirement in requires:
        spec, _, marker = requirement.partition(";")
        if re.search(rf"""extra\s*==\s*["']{EXTRA}["']""", marker):
            names.append(re.match(r"[A-Za-z0-9._-]+", spec.strip()).group())
    return names


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
            return [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a comma list of {what}, got {text!r}"
            ) from None

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
        help=f"a recipe whose values the other flags override; one of {', '.join(configs.RECIPES)} "
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
    if args.resume and not args.out:
        raise UsageError("--resume needs --out (the run directory to continue).")
    if args.out:
        return Path(args.out)
    return Path("runs") / f"{args.command}-{dataset}-{time.strftime('%Y%m%d-%H%M%S')}"


def _resume_command(args: argparse.Namespace, out: Path) -> str:
    return f"sam-optax {args.command} --out {shlex.quote(str(out))} --resume"


def _options(args: argparse.Namespace, stop: threading.Event | None) -> Any:
    from sam_optax.program import train

    progress = sys.stderr.isatty() if args.progress is None else args.progress
    return train.RunOptions(
        resume=args.resume, progress=progress, checkpoint_every=args.checkpoint_every, stop=stop
    )


def _train(args: argparse.Namespace, command_line: str, stop: threading.Event | None) -> int:
    import jax

    from sam_optax.program import train
    from sam_optax.program.rundir import RunDir

    if args.resume:
        out = _out_dir(args, None)
        saved = RunDir(out).saved_config()
        config = configs.resumed(
            saved, getattr(args, "config", None), given_settings(args), out / "config.json"
        )
        settings = configs.describe(config, title=f"settings of the run in {out} (resumed)")
    else:
        name, config = config_from_args(args)
        out = _out_dir(args, config.dataset)
        settings = configs.describe(config, base=name)
    configs.validate(config, jax.device_count())
    print(f"{command_line}\n{settings}", flush=True)
    try:
        summary = train.train_and_evaluate(config, out, _options(args, stop))
    except Interrupted as err:
        raise Interrupted(str(err), resume=_resume_command(args, out)) from None
    print(
        f"{summary['optimizer']} rho={config.radius:g}: test accuracy "
        f"{summary['test_accuracy']:.4f} after {config.epochs} epochs "
        f"({summary['wall_seconds']:.1f} s); run directory {out}"
    )
    return 0


def _compare(args: argparse.Namespace, command_line: str, stop: threading.Event | None) -> int:
    import jax

    from sam_optax.program import compare

    if args.resume:
        out = _out_dir(args, None)
        saved = compare.saved_grid(out)
        where = out / "compare.json"
        config = configs.resumed(
            saved["base"], getattr(args, "config", None), given_settings(args), where
        )
        methods, rhos, seeds = _resumed_grid(args, config, saved, where)
        settings = configs.describe(config, title=f"settings of the comparison in {out} (resumed)")
    else:
        name, config = config_from_args(args)
        out = _out_dir(args, config.dataset)
        methods, rhos = _grid(args.methods, args.rhos, config)
        seeds = DEFAULT_SEEDS if args.seeds is None else args.seeds
        settings = configs.describe(config, base=name)
    if not seeds:
        raise UsageError("--seeds must name at least one seed.")
    for method in methods or [config.method]:
        for rho in rhos:
            configs.validate(config.replace(method=method, rho=rho), jax.device_count())
    print(f"{command_line}\n{settings}", flush=True)
    try:
        results = compare.compare(
            config,
            rhos,
            seeds,
            out,
            methods=methods,
            options=_options(args, stop),
            command=command_line,
        )
    except Interrupted as err:
        raise Interrupted(str(err), resume=_resume_command(args, out)) from None
    print(results["markdown"])
    print(f"Wrote {out / 'results.md'}, results.json, results.png and pareto.png in {out}.")
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


def _analyze(args: argparse.Namespace, command_line: str, stop: threading.Event | None) -> int:
    del command_line, stop
    from sam_optax.program import analyze

    analyze.analyze_run(
        args.run_dir,
        rho=args.rho,
        examples=args.examples,
        plots=not args.no_plots,
        num_iterations=args.iterations,
    )
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace, str, threading.Event | None], int]] = {
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


@contextlib.contextmanager
def stop_on_interrupt() -> Iterator[threading.Event | None]:
    """An event the first Ctrl-C (SIGINT) sets: the run stops before its next step.

    A second Ctrl-C interrupts at once. Where SIGINT is not Python's (ignored,
    as for a job a non-interactive shell started in the background, or taken
    over by the caller) or outside the main thread, nothing is installed and
    ``None`` is yielded.
    """
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield None
        return
    stop = threading.Event()

    def handler(signum: int, frame: Any) -> None:
        if stop.is_set():
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        stop.set()

    signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command_line = "sam-optax " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    missing = missing_program_packages()
    if missing:
        print(
            f"sam-optax: error: the program needs the '{EXTRA}' extra; missing here: "
            f"{', '.join(missing)}. Install it with: {INSTALL_HINT}",
            file=sys.stderr,
        )
        return 2
    interruptible = stop_on_interrupt() if args.command != "analyze" else contextlib.nullcontext()
    try:
        with interruptible as stop:
            if args.command != "analyze":
                _initialize_distributed(args)
            return COMMANDS[args.command](args, command_line, stop)
    except (UsageError, DataError, RunDirError) as err:
        print(f"sam-optax: error: {err}", file=sys.stderr)
        return 2
    except TrainingDiverged as err:
        print(f"sam-optax: error: {err}", file=sys.stderr)
        return 3
    except Interrupted as err:
        print(f"sam-optax: {err}", file=sys.stderr)
        if err.resume:
            print(f"sam-optax: continue with: {err.resume}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("sam-optax: interrupted.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
