"""Run configurations: the methods, the paper's recipes, resolution and validation.

A :class:`Config` is plain data: everything a run's result depends on, and
nothing else. Each field carries in its metadata what the command line and
the checks need (:func:`option`): its help text, the test of its value, its
choices. The command line (:mod:`sam_optax.program.cli`) is generated from
these fields, one flag per field (``--`` and the name in kebab case), and
every message about a value names that flag. Settings resolve in three layers:

1. the base recipe: ``--config NAME`` if given, else the recipe of
   ``--dataset`` (:data:`DATASET_RECIPES`: switching the dataset switches
   every default that depends on it), else :data:`DEFAULT_RECIPE`;
2. every flag given on the command line replaces its field;
3. :func:`validate` refuses what cannot run, naming the flag.

A resumed run takes its own saved settings instead (:func:`resumed`).

The SAM-family methods the program runs are one table, :data:`METHODS`:
adding a method is its hyperparameters as :class:`Config` fields and one
entry there.

The default, ``digits-noise``, is the laptop-size version of the paper's
label-noise experiment (section 3.3). The CIFAR and Fashion-MNIST recipes
follow the paper's own training code (google-research/sam): weight decay as
an L2 term in the loss (so it enters the perturbation and is evaluated at
``w + e``), the averaged gradient clipped to global norm 5, Nesterov momentum.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from typing import NamedTuple

import optax

import sam_optax
from sam_optax.program.errors import ConfigFileError
from sam_optax.program.errors import UsageError

DATASETS = ("digits", "cifar10", "cifar100", "fashion_mnist")
MODELS = ("mlp", "cnn", "resnet20", "resnet32", "wrn16_8", "wrn28_2", "wrn28_10")
AUGMENTATIONS = ("none", "basic", "cutout")
MESH_AXES = ("data", "model")


# --------------------------------------------------------------------------
# The methods: one entry each.
# --------------------------------------------------------------------------


class Method(NamedTuple):
    """A SAM-family method of the program.

    ``build(config, options, total_steps, base)`` returns its transformation.
    ``options`` holds the perturbation options (``norm``, ``adaptive``,
    ``axis_name``, ``sync_perturbation``) when ``perturbation_options``,
    else ``axis_name`` alone; ``base`` is the base optimizer (clipping,
    decoupled weight decay, SGD), which the program chains after the
    method's transformation, unless ``wraps_base``: then the transformation
    built is the whole optimizer (a method that reads or wraps the base
    optimizer). ``radius`` names the :class:`Config` field of its radius
    (reported in the tables). ``second_gradient``: its SAM steps take a
    gradient besides the caller's (so a step costs 1 + the fraction of SAM
    steps, from the ``sam_step`` diagnostic). ``hyperparameters`` names its
    own :class:`Config` fields (a run of another method does not use them).
    ``groups``: it perturbs once per group of ``--m`` examples (else once per
    device batch: ESAM selects examples within it, SAMPa perturbs along the
    last step's gradient). ``previous_batch``: its step takes the last step's
    batch too (SAMPa's perturbed gradient is taken on it).
    """

    label: str
    build: Callable[
        [Config, dict[str, Any], int, optax.GradientTransformation],
        optax.GradientTransformationExtraArgs,
    ]
    radius: str = "rho"
    perturbation_options: bool = True
    second_gradient: bool = True
    wraps_base: bool = False
    per_example: bool = False
    hyperparameters: tuple[str, ...] = ()
    groups: bool = True
    previous_batch: bool = False


# Adding a method: its hyperparameters as Config fields (below), one entry here.
METHODS: dict[str, Method] = {
    "sam": Method("SAM", lambda c, kw, steps, base: sam_optax.sam(c.rho, **kw)),
    "gsam": Method(
        "GSAM",
        lambda c, kw, steps, base: sam_optax.gsam(c.rho, c.gsam_alpha, **kw),
        hyperparameters=("gsam_alpha",),
    ),
    "looksam": Method(
        "LookSAM",
        lambda c, kw, steps, base: sam_optax.looksam(c.rho, c.looksam_every, c.looksam_alpha, **kw),
        hyperparameters=("looksam_every", "looksam_alpha"),
    ),
    "msam": Method(
        "MSAM",
        # The authors' SGD-MSAM: SGD's own momentum (clipped gradients and
        # weight decay included) is the direction; decay read at the point held.
        lambda c, kw, steps, base: sam_optax.msam(base, c.msam_rho, sees="perturbed", **kw),
        radius="msam_rho",
        perturbation_options=False,
        second_gradient=False,
        wraps_base=True,
        hyperparameters=("msam_rho",),
    ),
    "rst": Method(
        "RST",
        lambda c, kw, steps, base: sam_optax.rst(c.rho, c.rst_probability, seed=c.seed, **kw),
        hyperparameters=("rst_probability",),
    ),
    "aesam": Method(
        "AE-SAM",
        lambda c, kw, steps, base: sam_optax.aesam(
            c.rho, optax.linear_schedule(c.aesam_threshold, -c.aesam_threshold, steps), **kw
        ),
        hyperparameters=("aesam_threshold",),
    ),
    "fsam": Method(
        "F-SAM",
        lambda c, kw, steps, base: sam_optax.fsam(c.rho, c.fsam_sigma, decay=c.fsam_decay, **kw),
        hyperparameters=("fsam_sigma", "fsam_decay"),
    ),
    "vasso": Method(
        "VaSSO",
        lambda c, kw, steps, base: sam_optax.vasso(c.rho, c.vasso_theta, **kw),
        hyperparameters=("vasso_theta",),
    ),
    "wsam": Method(
        "WSAM",
        # The authors' decoupled form: the sharpness step at the base's learning rate.
        lambda c, kw, steps, base: sam_optax.wsam(
            base,
            c.rho,
            c.wsam_gamma,
            learning_rate=optax.cosine_decay_schedule(c.lr, steps),
            **kw,
        ),
        wraps_base=True,
        hyperparameters=("wsam_gamma",),
    ),
    "esam": Method(
        "ESAM",
        lambda c, kw, steps, base: sam_optax.esam(
            c.rho, c.esam_beta, c.esam_gamma, seed=c.seed, **kw
        ),
        per_example=True,
        hyperparameters=("esam_beta", "esam_gamma"),
        groups=False,
    ),
    "sampa": Method(
        "SAMPa",
        # The authors' code: y is the base optimizer's (SGD's) step, the
        # perturbed gradient is taken on the last step's batch.
        lambda c, kw, steps, base: sam_optax.sampa(base, c.rho, c.sampa_lam, **kw),
        perturbation_options=False,
        wraps_base=True,
        hyperparameters=("sampa_lam",),
        groups=False,
        previous_batch=True,
    ),
}


# --------------------------------------------------------------------------
# The fields: help, check and choices in each field's metadata.
# --------------------------------------------------------------------------


class Check(NamedTuple):
    """The test of one value and what it expects, for the message (``'>= 1'``)."""

    ok: Callable[[Any], bool]
    expected: str


def at_least(low: float) -> Check:
    return Check(lambda v: math.isfinite(v) and v >= low, f">= {low:g}")


def above(low: float) -> Check:
    return Check(lambda v: math.isfinite(v) and v > low, f"> {low:g}")


def fraction(*, closed: bool = False) -> Check:
    """In [0, 1), or [0, 1] when ``closed``."""
    if closed:
        return Check(lambda v: 0 <= v <= 1, "in [0, 1]")
    return Check(lambda v: 0 <= v < 1, "in [0, 1)")


def option(
    default: Any,
    help: str,
    *,
    check: Check | None = None,
    choices: tuple[str, ...] | None = None,
    none: tuple[str, ...] = ("none",),
    used: Callable[[Config], bool] | None = None,
    hints: dict[str, str] | None = None,
) -> Any:
    """A :class:`Config` field: its default, help text, check or choices.

    ``none`` are the words that mean ``None`` on the command line (for the
    fields that may be ``None``; the first is the one shown). ``used(config)``
    says whether a run of ``config`` uses the field (default: always; a
    method's hyperparameters are named in :data:`METHODS` instead); the
    settings printed at the start of a run are those it uses. ``hints`` maps
    a value that is not among the ``choices`` to what to write instead.
    """
    metadata = {
        "help": help,
        "check": check,
        "choices": choices,
        "none": none,
        "used": used,
        "hints": hints or {},
    }
    return dataclasses.field(default=default, metadata=metadata)


def _perturbs(config: Config) -> bool:
    """Whether the run perturbs the weights at all (``rho > 0``: not SGD)."""
    return config.rho > 0


def _takes_perturbation_options(config: Config) -> bool:
    """Whether the run's method takes the perturbation options (``--norm``, ``--adaptive``, ...)."""
    method = METHODS.get(config.method)
    return config.rho > 0 and method is not None and method.perturbation_options


@dataclass(frozen=True)
class Config:
    """Everything one training run depends on (and nothing else)."""

    dataset: str = option("digits", "the dataset; picks its recipe", choices=DATASETS)
    data_dir: str | None = option(
        None, "folder with the dataset files (default: $SAM_OPTAX_DATA or ~/.cache/sam_optax)"
    )
    model: str = option("mlp", "the network", choices=MODELS)
    dropout: float = option(0.0, "dropout rate of models that have it", check=fraction())
    epochs: int = option(40, "training epochs", check=at_least(1))
    batch_size: int = option(64, "global batch size", check=at_least(1))
    lr: float = option(0.05, "peak learning rate, cosine decay", check=above(0))
    momentum: float = option(0.9, "SGD momentum", check=fraction())
    nesterov: bool = option(False, "Nesterov momentum")
    weight_decay: float = option(5e-4, "weight decay", check=at_least(0))
    l2_in_loss: bool = option(
        False,
        "weight decay as 0.5*wd*|w|^2 in the loss, as the paper's code (else decoupled)",
        used=lambda c: c.weight_decay > 0,
    )
    clip_norm: float | None = option(
        None, "clip the averaged gradient to this global norm ('none': off)", check=above(0)
    )
    rho: float = option(0.2, "SAM radius, 0 for SGD", check=at_least(0))
    method: str = option(
        "sam",
        "the SAM-family method",
        choices=tuple(METHODS),
        used=_perturbs,
        hints={
            "sgd": "plain SGD is --rho 0, with any --method; `sam-optax compare "
            "--method sgd,sam` puts SGD beside SAM"
        },
    )
    norm: float = option(
        2.0,
        "p of the perturbation ball, 'inf' for sign",
        check=Check(lambda v: v > 1, "> 1 (inf for the sign)"),
        used=_takes_perturbation_options,
    )
    adaptive: bool = option(False, "ASAM", used=_takes_perturbation_options)
    eta: float = option(
        0.01,
        "ASAM's eta in T = |w| + eta",
        check=at_least(0),
        used=lambda c: _takes_perturbation_options(c) and c.adaptive,
    )
    perturb: str = option(
        "all",
        "which params are perturbed: all, or norm (the normalization layers only: SAM-ON)",
        choices=("all", "norm"),
        used=_perturbs,
    )
    m: int | None = option(
        8,
        "examples per perturbation (m-sharpness), 'batch' for the per-device batch",
        check=at_least(1),
        none=("batch", "all", "none"),
        used=_perturbs,
    )
    sync_perturbation: bool = option(
        False, "one perturbation for the whole batch", used=_takes_perturbation_options
    )
    gsam_alpha: float = option(0.1, "GSAM's alpha", check=at_least(0))
    looksam_every: int = option(5, "LookSAM's period k", check=at_least(1))
    looksam_alpha: float = option(0.7, "LookSAM's alpha")
    msam_rho: float = option(1.0, "MSAM's radius (not on SAM's scale)", check=at_least(0))
    rst_probability: float = option(
        0.5, "RST's probability of a SAM step", check=fraction(closed=True)
    )
    aesam_threshold: float = option(1.0, "AE-SAM's c, moved linearly from +c to -c")
    fsam_sigma: float = option(1.0, "F-SAM's sigma")
    fsam_decay: float = option(0.6, "F-SAM's running-mean decay", check=fraction())
    vasso_theta: float = option(
        0.9,
        "VaSSO's theta (weight of the newest gradient)",
        check=Check(lambda v: 0 < v <= 1, "in (0, 1]"),
    )
    wsam_gamma: float = option(0.9, "WSAM's gamma (weight of the sharpness)", check=fraction())
    esam_beta: float = option(
        0.5,
        "ESAM's beta (probability of perturbing a tensor)",
        check=Check(lambda v: 0 < v <= 1, "in (0, 1]"),
    )
    esam_gamma: float = option(
        0.5,
        "ESAM's gamma (fraction of the examples selected)",
        check=Check(lambda v: 0 < v <= 1, "in (0, 1]"),
    )
    sampa_lam: float = option(
        0.2, "SAMPa's lambda (the authors' og: weight of the gradient at y)",
        check=fraction(closed=True),
    )  # fmt: skip
    label_noise: float = option(0.4, "fraction of training labels flipped", check=fraction())
    label_smoothing: float = option(0.0, "label smoothing", check=fraction())
    augment: str = option("none", "on-device augmentation", choices=AUGMENTATIONS)
    seed: int = option(0, "seed of init, data order and noise")
    mesh: str | None = option(
        None, "device mesh like 'data=4,model=2': data replicas x params sharded over model"
    )
    sync_group: int | None = option(
        None,
        "devices sharing one perturbation (the paper's inner_group_size)",
        check=at_least(1),
        used=_takes_perturbation_options,
    )

    @property
    def optimizer(self) -> str:
        """``'sgd'`` when ``rho == 0``, else the SAM-family method."""
        return self.method if self.rho > 0 else "sgd"

    @property
    def radius(self) -> float:
        """The method's own radius (``msam_rho`` for MSAM), 0 for SGD."""
        return 0.0 if self.rho == 0 else float(getattr(self, METHODS[self.method].radius))

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: a number that is not finite (``--norm inf``) becomes its text."""
        return {
            k: str(v) if isinstance(v, float) and not math.isfinite(v) else v
            for k, v in dataclasses.asdict(self).items()
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Config:
        """A Config from ``config.json`` (fields added since take their defaults).

        Each value must have its field's type (a number may be written as
        ``"inf"``, as :meth:`to_dict` writes it); a key that is no field is
        refused (a misspelt setting would otherwise be silently ignored). The
        ``ValueError`` names the key and what was expected.
        """
        if not isinstance(values, dict):
            raise ValueError(f"expected a JSON object of settings, got {type(values).__name__}")
        kinds = field_kinds()
        unknown = [k for k in values if k not in kinds]
        if unknown:
            raise ValueError("; ".join(_unknown_setting(k) for k in unknown))
        return cls(**{k: _saved_value(k, v) for k, v in values.items()})


def _unknown_setting(key: str) -> str:
    close = difflib.get_close_matches(key, field_kinds(), n=1)
    maybe = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{key!r} is no setting{maybe}"


_JSON_EXPECTED = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _saved_value(name: str, value: Any) -> Any:
    """The value of field ``name`` as saved in JSON, checked against the field's type."""
    kind, optional = field_kinds()[name]
    if value is None and optional:
        return None
    if kind is float and isinstance(value, str):
        try:
            return float(value)  # "inf", as to_dict writes a non-finite number
        except ValueError:
            pass
    elif kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):
        return value
    null = " or null" if optional else ""
    raise ValueError(
        f"{name!r} is {json.dumps(value)}, expected {_JSON_EXPECTED[kind]}{null} (flag {flag(name)})"
    )


@functools.cache
def field_kinds() -> dict[str, tuple[type, bool]]:
    """``{name: (type, may be None)}`` of every field, read from the annotations."""
    kinds = {}
    for name, hint in typing.get_type_hints(Config).items():
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        kinds[name] = (args[0] if args else hint, bool(typing.get_args(hint)))
    return kinds


def flag(name: str) -> str:
    """The command-line flag of a field: ``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


_EXPECTED = {int: "an integer", float: "a number", str: "text"}


def parse_value(name: str, text: str) -> Any:
    """The value of field ``name`` from its command-line text (``'batch'`` -> ``None`` for m)."""
    kind, optional = field_kinds()[name]
    words = Config.__dataclass_fields__[name].metadata["none"]
    if optional and text.strip().lower() in words:
        return None
    try:
        return kind(text)
    except ValueError:
        alternative = f" or '{words[0]}'" if optional else ""
        raise UsageError(f"expected {_EXPECTED[kind]}{alternative}, got {text!r}") from None


def as_flag(name: str, value: Any) -> str:
    """``value`` of field ``name`` written as its flag: ``--epochs 3``, ``--no-nesterov``."""
    if isinstance(value, bool):
        return flag(name) if value else "--no-" + flag(name)[2:]
    if value is None:
        value = Config.__dataclass_fields__[name].metadata["none"][0]
    return f"{flag(name)} {value!r}" if isinstance(value, float) else f"{flag(name)} {value}"


def field_errors(config: Config, name: Callable[[str], str] = flag) -> list[str]:
    """What is wrong with each field's value alone, each message naming the field by
    ``name(field)`` (its flag, by default)."""
    errors = []
    for f in dataclasses.fields(Config):
        value, choices, check = getattr(config, f.name), f.metadata["choices"], f.metadata["check"]
        if value is None:
            continue
        if choices is not None and value not in choices:
            errors.append(f"{name(f.name)}: {unknown_choice(value, choices, f.metadata['hints'])}")
        elif check is not None and not _passes(check, value):
            alternative = f" (or {f.metadata['none'][0]})" if field_kinds()[f.name][1] else ""
            errors.append(f"{name(f.name)} must be {check.expected}{alternative}, got {value!r}")
    return errors


def unknown_choice(value: Any, choices: Any, hints: dict[str, str] | None = None) -> str:
    """``"unknown 'samm' (did you mean 'sam'?); valid choices: sam, gsam, ..."``: what the
    value may have meant (a hint for it, else the closest choice), then the choices."""
    hint = (hints or {}).get(value) if isinstance(value, str) else None
    lower = {c.lower(): c for c in choices}
    close = difflib.get_close_matches(value.lower(), lower, n=1) if isinstance(value, str) else []
    if hint:
        meant = f" ({hint})"
    elif close:
        meant = f" (did you mean {lower[close[0]]!r}?)"
    else:
        meant = ""
    return f"unknown {value!r}{meant}; valid choices: {', '.join(choices)}"


def _passes(check: Check, value: Any) -> bool:
    try:
        return bool(check.ok(value))
    except TypeError:  # a value of the wrong type (from Python or a hand-edited config.json)
        return False


# --------------------------------------------------------------------------
# The paper's recipes.
# --------------------------------------------------------------------------

# The paper's settings (Tables 6 and 7, section 3.3, appendix C.1) and its
# training code: WRN-28-10 for 200 epochs at batch 256, lr 0.1 (cosine),
# Nesterov momentum 0.9, weight decay 5e-4 as L2 in the loss, the averaged
# gradient clipped at norm 5, basic augmentation, clean labels, one
# perturbation per device. The other recipes change only what differs.
_WRN_CIFAR10 = Config(
    dataset="cifar10",
    model="wrn28_10",
    epochs=200,
    batch_size=256,
    lr=0.1,
    nesterov=True,
    weight_decay=5e-4,
    l2_in_loss=True,
    clip_norm=5.0,
    rho=0.05,
    m=None,
    label_noise=0.0,
    augment="basic",
)
_LONG = {"epochs": 1800, "lr": 0.05, "weight_decay": 1e-3}

RECIPES: dict[str, Config] = {
    "digits-noise": Config(),
    "wrn28_10-cifar10": _WRN_CIFAR10,
    "wrn28_10-cifar100": _WRN_CIFAR10.replace(dataset="cifar100", rho=0.1),
    "wrn28_10-cifar10-1800": _WRN_CIFAR10.replace(**_LONG),
    "wrn28_10-cifar100-1800": _WRN_CIFAR10.replace(dataset="cifar100", rho=0.1, **_LONG),
    "resnet32-cifar10-noise": _WRN_CIFAR10.replace(model="resnet32", rho=0.1, label_noise=0.4),
    # SAM-ON (Mueller et al. 2023, mueller-mp/SAM-ON): ASAM on the BatchNorm
    # params only, elementwise with eta 0, rho 10 (their WRN-28-10 CIFAR-100 run).
    "wrn28_10-cifar100-samon": _WRN_CIFAR10.replace(
        dataset="cifar100", rho=10.0, adaptive=True, eta=0.0, perturb="norm"
    ),
    "wrn28_10-fashion_mnist": _WRN_CIFAR10.replace(dataset="fashion_mnist"),
}
DEFAULT_RECIPE = "digits-noise"
# The base recipe of each dataset: what --dataset alone starts from.
DATASET_RECIPES = {
    "digits": "digits-noise",
    "cifar10": "wrn28_10-cifar10",
    "cifar100": "wrn28_10-cifar100",
    "fashion_mnist": "wrn28_10-fashion_mnist",
}


def recipe(name: str) -> Config:
    if name not in RECIPES:
        raise UsageError(
            f"--config: {unknown_choice(name, tuple(RECIPES))}, or the path of a saved "
            "config.json (or of a run directory holding one)."
        )
    return RECIPES[name]


def read_config(path: str | Path, fix: str) -> Config:
    """The settings saved in ``path`` (a run's ``config.json``), every value checked.

    A file that is not JSON, a value of the wrong type, a key that is no
    setting or a value the program refuses raises :class:`ConfigFileError`
    naming the file, the key and what was expected, then ``fix`` (what to do).
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigFileError(f"{path} cannot be read ({err.strerror}). {fix}") from None
    try:
        values = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigFileError(
            f"{path} is not valid JSON ({err.msg}: line {err.lineno}, column {err.colno}); "
            f"it should hold one key per setting, as sam-optax writes it. {fix}"
        ) from None
    try:
        config = Config.from_dict(values)
    except ValueError as err:
        raise ConfigFileError(f"{path}: {err}. {fix}") from None
    errors = field_errors(config, name=repr)
    if errors:
        raise ConfigFileError(f"{path}: {'; '.join(errors)}. {fix}")
    return config


def base_config(config_name: str | None, dataset: str | None = None) -> tuple[str, Config]:
    """``(name, Config)`` a run starts from: ``--config`` (a recipe, or a saved
    ``config.json`` or run directory), else ``--dataset``'s recipe, else the default."""
    if config_name is not None:
        if config_name in RECIPES:
            return config_name, RECIPES[config_name]
        path = Path(config_name)
        if path.is_dir() and not (path / "config.json").is_file():
            raise UsageError(
                f"--config {config_name}: a directory without config.json (not a run directory "
                "of `sam-optax train`); name a run directory, its config.json, or a recipe."
            )
        if path.exists():
            fix = "Repair it, or pass --config a recipe or another config.json."
            return config_name, read_config(path / "config.json" if path.is_dir() else path, fix)
        if config_name.endswith(".json") or path.name != config_name:
            raise UsageError(f"--config {config_name}: no such file.")
        recipe(config_name)  # raises: unknown recipe
    if dataset is not None:
        if dataset not in DATASET_RECIPES:
            raise UsageError(f"--dataset: {unknown_choice(dataset, DATASETS)}.")
        return DATASET_RECIPES[dataset], RECIPES[DATASET_RECIPES[dataset]]
    return DEFAULT_RECIPE, RECIPES[DEFAULT_RECIPE]


def resolve(config_name: str | None, overrides: dict[str, Any]) -> tuple[str, Config]:
    """``(base name, resolved Config)`` from ``--config`` and the flags given.

    Each value is checked alone here (a message naming its flag, before
    anything else reads it). A method that selects examples (ESAM) takes the
    whole device batch as its group unless ``--m`` is given (the recipe's m
    does not apply to it).
    """
    name, base = base_config(config_name, overrides.get("dataset"))
    config = base.replace(**overrides)
    for message in field_errors(config):
        raise UsageError(message + ".")
    if not METHODS[config.method].groups and "m" not in overrides:
        config = config.replace(m=None)
    return name, config


def resumed(
    saved: Config, config_name: str | None, overrides: dict[str, Any], where: str | Path
) -> Config:
    """The settings of a resumed run: its own (``saved``), whatever the recipes say now.

    A flag given must agree with them (so does every value of ``--config
    NAME``, when given); one that contradicts them is refused, named, with
    the run's value.
    """
    wanted = (
        base_config(config_name)[1].replace(**overrides)
        if config_name
        else saved.replace(**overrides)
    )
    names = [f.name for f in dataclasses.fields(Config)] if config_name else list(overrides)
    conflicts = [n for n in names if getattr(wanted, n) != getattr(saved, n)]
    if not conflicts:
        return saved

    def contradiction(name: str) -> str:
        asked = as_flag(name, getattr(wanted, name))
        if name not in overrides:
            asked = f"--config {config_name}'s {asked}"
        return f"{asked} (the run has {as_flag(name, getattr(saved, name))})"

    raise UsageError(
        f"--resume: {'; '.join(map(contradiction, conflicts))}, in {where}. A resumed run keeps "
        "its own settings: leave those flags out, or start a new run in another --out "
        "(or in this one, replacing it, with --overwrite instead of --resume)."
    )


# --------------------------------------------------------------------------
# Validation and the mesh.
# --------------------------------------------------------------------------


def validate(config: Config, n_devices: int = 1) -> None:
    """Refuses bad values before any work starts (the message names the flag)."""
    for message in field_errors(config):
        raise UsageError(message + ".")
    method = METHODS[config.method]
    own = (config.adaptive, config.norm != 2, config.sync_perturbation, config.sync_group)
    if config.rho > 0 and not method.perturbation_options and any(own):
        raise UsageError(
            f"--method {config.method} takes neither --adaptive, --norm, --sync-perturbation "
            "nor --sync-group."
        )
    if config.rho > 0 and not method.groups and config.m is not None:
        why = (
            "selects examples within each device's batch"
            if method.per_example
            else "perturbs along the last step's gradient"
        )
        raise UsageError(
            f"--method {config.method} {why}: it takes one perturbation per device batch, "
            f"--m batch (got --m {config.m})."
        )
    shape = mesh_shape(config, n_devices)
    replicas = n_devices // shape["model"]
    per_device, rest = divmod(config.batch_size, replicas)
    if rest:
        raise UsageError(
            f"--batch-size {config.batch_size} does not split over {replicas} devices."
        )
    if config.m is not None and per_device % config.m:
        raise UsageError(
            f"--batch-size {config.batch_size} is not divisible by devices x m = "
            f"{replicas} x {config.m}: each device gets {per_device} examples."
        )
    if config.sync_group is not None and config.sync_perturbation:
        raise UsageError("--sync-group excludes --sync-perturbation.")
    if config.sync_perturbation and config.m is not None and config.m < per_device:
        raise UsageError(
            "--sync-perturbation shares one perturbation over the whole batch; "
            f"it cannot be combined with --m {config.m} < the per-device batch {per_device}."
        )


def parse_mesh(spec: str | None) -> dict[str, int]:
    """``'data=4,model=2'`` -> ``{'data': 4, 'model': 2}`` (``None`` -> ``{}``)."""
    if spec is None:
        return {}
    axes: dict[str, int] = {}
    for part in spec.split(","):
        name, _, size = part.partition("=")
        name = name.strip()
        if name not in MESH_AXES or not size.strip().isdigit() or int(size) < 1 or name in axes:
            raise UsageError(
                f"--mesh must look like 'data=4,model=2' (axes {', '.join(MESH_AXES)}, "
                f"each once, sizes >= 1), got {spec!r}."
            )
        axes[name] = int(size)
    return axes


def mesh_shape(config: Config, n_devices: int) -> dict[str, int]:
    """The mesh axes of a run on ``n_devices``: ``data`` (split into ``data`` x
    ``sync`` with ``sync_group``) and ``model``; every device is used."""
    axes = parse_mesh(config.mesh)
    model = axes.get("model", 1)
    here = "the 1 device here" if n_devices == 1 else f"the {n_devices} devices here"
    if "data" not in axes and n_devices % model:
        raise UsageError(
            f"--mesh {config.mesh!r}: {here} cannot be split into model groups of {model} "
            f"(model must divide {n_devices}), or leave --mesh out."
        )
    data = axes.get("data", n_devices // model)
    if data * model != n_devices:
        examples = [f"data={n_devices}"] + (
            [f"data={n_devices // 2},model=2"] if n_devices % 2 == 0 else []
        )
        count = "1 device is here" if n_devices == 1 else f"{n_devices} devices are here"
        raise UsageError(
            f"--mesh {config.mesh!r} makes a mesh of data x model = {data} x {model} = "
            f"{data * model} devices, but {count}: the mesh must use every device "
            f"(data x model = {n_devices}), e.g. {' or '.join('--mesh ' + e for e in examples)}, "
            "or leave --mesh out."
        )
    if config.sync_group is None:
        return {"data": data, "model": model}
    if data % config.sync_group:
        raise UsageError(
            f"--sync-group {config.sync_group} does not divide the {data} data replicas."
        )
    return {"data": data // config.sync_group, "sync": config.sync_group, "model": model}


def uses(config: Config, name: str) -> bool:
    """Whether a run of ``config`` uses field ``name``: not another method's
    hyperparameters, nor the perturbation's options in an SGD run (``rho = 0``)."""
    for method, entry in METHODS.items():
        if name in entry.hyperparameters:
            return config.optimizer == method
    used = Config.__dataclass_fields__[name].metadata["used"]
    return used is None or bool(used(config))


def describe(
    config: Config,
    title: str,
    *,
    reference: Config | None = None,
    runs: list[Config] | None = None,
    skip: tuple[str, ...] = (),
) -> str:
    """The settings a run uses, one line each, for its start.

    With ``reference`` (what the run started from) the values a flag changed
    are marked ``*``. ``runs`` (a grid's runs: default ``[config]``) decide
    which fields are shown: those one of them uses (:func:`uses`); ``skip``
    are left out too. A last line counts the fields not shown.
    """
    runs = runs or [config]
    lines, hidden = [title], 0
    for f in dataclasses.fields(Config):
        if f.name in skip:
            continue
        if not any(uses(r, f.name) for r in runs):
            hidden += 1
            continue
        value = getattr(config, f.name)
        mark = "*" if reference is not None and getattr(reference, f.name) != value else " "
        lines.append(f"  {mark} {f.name:<18} {value!r}")
    if hidden:
        lines.append(
            f"  ({hidden} settings that {'these runs do' if len(runs) > 1 else 'this run does'} "
            "not use are not shown)"
        )
    return "\n".join(lines)
