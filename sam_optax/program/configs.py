"""Run configurations: the paper's recipes, one base per dataset, resolution and validation.

A :class:`Config` is plain data: everything a run's result depends on, and
nothing else. Settings resolve in three layers:

1. the base recipe: ``--config NAME`` if given, else the recipe of
   ``--dataset`` (:data:`DATASET_RECIPES`: switching the dataset switches
   every default that depends on it), else :data:`DEFAULT_RECIPE`;
2. every flag given on the command line replaces its field;
3. :func:`validate` refuses what cannot run, naming the flag.

The default, ``digits-noise``, is the laptop-size version of the paper's
label-noise experiment (section 3.3). The CIFAR and Fashion-MNIST recipes
follow the paper's own training code (google-research/sam): weight decay as
an L2 term in the loss (so it enters the perturbation and is evaluated at
``w + e``), the averaged gradient clipped to global norm 5, Nesterov momentum.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from sam_optax.program.errors import UsageError

DATASETS = ("digits", "cifar10", "cifar100", "fashion_mnist")
METHODS = ("sam", "gsam", "looksam", "msam", "rst", "aesam", "fsam")
MODELS = ("mlp", "cnn", "resnet20", "resnet32", "wrn16_8", "wrn28_2", "wrn28_10")
AUGMENTATIONS = ("none", "basic", "cutout")


@dataclass(frozen=True)
class Config:
    """Everything one training run depends on (and nothing else)."""

    dataset: str = "digits"
    data_dir: str | None = None
    model: str = "mlp"
    dropout: float = 0.0
    epochs: int = 40
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    l2_in_loss: bool = False
    clip_norm: float | None = None
    rho: float = 0.2
    method: str = "sam"
    norm: float = 2.0
    adaptive: bool = False
    m: int | None = 8
    sync_perturbation: bool = False
    gsam_alpha: float = 0.1
    looksam_every: int = 5
    looksam_alpha: float = 0.7
    msam_rho: float = 1.0
    rst_probability: float = 0.5
    aesam_threshold: float = 1.0
    fsam_sigma: float = 1.0
    fsam_decay: float = 0.6
    label_noise: float = 0.4
    label_smoothing: float = 0.0
    augment: str = "none"
    seed: int = 0
    mesh: str | None = None
    sync_group: int | None = None

    @property
    def optimizer(self) -> str:
        """``'sgd'`` when ``rho == 0``, else the SAM-family method."""
        return self.method if self.rho > 0 else "sgd"

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Config:
        """A Config from ``config.json`` (fields added since take their defaults)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


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
        raise UsageError(f"--config: unknown {name!r}; valid choices: {', '.join(RECIPES)}.")
    return RECIPES[name]


def base_recipe_name(config_name: str | None, dataset: str | None) -> str:
    """The recipe a run starts from: ``--config``, else ``--dataset``'s, else the default."""
    if config_name is not None:
        recipe(config_name)
        return config_name
    if dataset is not None:
        if dataset not in DATASET_RECIPES:
            raise UsageError(
                f"--dataset: unknown {dataset!r}; valid choices: {', '.join(DATASETS)}."
            )
        return DATASET_RECIPES[dataset]
    return DEFAULT_RECIPE


def resolve(config_name: str | None, overrides: dict[str, Any]) -> tuple[str, Config]:
    """``(base recipe name, resolved Config)`` from ``--config`` and the flags given."""
    name = base_recipe_name(config_name, overrides.get("dataset"))
    return name, recipe(name).replace(**overrides)


def _checks(config: Config) -> list[tuple[bool, str]]:
    return [
        (config.dataset in DATASETS, f"--dataset: unknown {config.dataset!r}; valid choices: {', '.join(DATASETS)}"),
        (config.model in MODELS, f"--model: unknown {config.model!r}; valid choices: {', '.join(MODELS)}"),
        (config.augment in AUGMENTATIONS, f"--augment: unknown {config.augment!r}; valid choices: {', '.join(AUGMENTATIONS)}"),
        (config.rho >= 0 and math.isfinite(config.rho), f"--rho must be >= 0, got {config.rho}"),
        (config.norm > 1, f"--norm must be > 1 (or inf), got {config.norm}"),
        (0.0 <= config.label_noise < 1.0, f"--label-noise must be in [0, 1), got {config.label_noise}"),
        (0.0 <= config.label_smoothing < 1.0, f"--label-smoothing must be in [0, 1), got {config.label_smoothing}"),
        (0.0 <= config.dropout < 1.0, f"--dropout must be in [0, 1), got {config.dropout}"),
        (config.epochs >= 1, f"--epochs must be >= 1, got {config.epochs}"),
        (config.batch_size >= 1, f"--batch-size must be >= 1, got {config.batch_size}"),
        (config.lr > 0 and math.isfinite(config.lr), f"--lr must be > 0, got {config.lr}"),
        (0 <= config.momentum < 1, f"--momentum must be in [0, 1), got {config.momentum}"),
        (config.weight_decay >= 0, f"--weight-decay must be >= 0, got {config.weight_decay}"),
        (config.clip_norm is None or config.clip_norm > 0, f"--clip-norm must be > 0 (or none), got {config.clip_norm}"),
        (config.m is None or config.m >= 1, f"--m must be >= 1, got {config.m}"),
        (config.method in METHODS, f"--method: unknown {config.method!r}; valid choices: {', '.join(METHODS)}"),
        (config.gsam_alpha >= 0, f"--gsam-alpha must be >= 0, got {config.gsam_alpha}"),
        (config.looksam_every >= 1, f"--looksam-every must be >= 1, got {config.looksam_every}"),
        (config.msam_rho >= 0, f"--msam-rho must be >= 0, got {config.msam_rho}"),
        (0 <= config.rst_probability <= 1, f"--rst-probability must be in [0, 1], got {config.rst_probability}"),
        (0 <= config.fsam_decay < 1, f"--fsam-decay must be in [0, 1), got {config.fsam_decay}"),
    ]  # fmt: skip


def validate(config: Config, n_devices: int = 1) -> None:
    """Refuses bad values before any work starts (the message names the flag)."""
    for ok, message in _checks(config):
        if not ok:
            raise UsageError(message + ".")
    replicas = n_devices // parse_mesh(config.mesh).get("model", 1)
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
    if config.sync_group is not None and (config.sync_group < 1 or config.sync_perturbation):
        raise UsageError(
            f"--sync-group must be >= 1 and excludes --sync-perturbation, got {config.sync_group}."
        )
    if config.sync_perturbation and config.m is not None and config.m < per_device:
        raise UsageError(
            "--sync-perturbation shares one perturbation over the whole batch; "
            f"it cannot be combined with --m {config.m} < the per-device batch {per_device}."
        )


MESH_AXES = ("data", "model")


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


def describe(name: str, config: Config) -> str:
    """The resolved settings, one line each, for the start of a run."""
    base = recipe(name)
    lines = [f"settings (recipe {name}; * = changed by a flag):"]
    for field, value in config.to_dict().items():
        mark = "*" if getattr(base, field) != value else " "
        lines.append(f"  {mark} {field:<18} {value!r}")
    return "\n".join(lines)
