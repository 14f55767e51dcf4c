"""Run configurations: the defaults, the paper's recipes, validation.

A :class:`Config` is plain data. ``--config NAME`` picks a recipe from
:data:`RECIPES`; command-line flags override its fields. The default recipe,
``digits-noise``, is the laptop-size version of the paper's label-noise
experiment (section 3.3): digits with 40% of the training labels flipped.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from sam_optax.program.augment import AUGMENTATIONS
from sam_optax.program.errors import UsageError
from sam_optax.program.input_pipeline import DATASETS
from sam_optax.program.models import MODELS


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
    rho: float = 0.2
    norm: float = 2.0
    adaptive: bool = False
    m: int | None = 8
    sync_perturbation: bool = False
    label_noise: float = 0.4
    label_smoothing: float = 0.0
    augment: str = "none"
    seed: int = 0

    @property
    def optimizer(self) -> str:
        return "sam" if self.rho > 0 else "sgd"

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# The paper's settings (Table 6 and 7, section 3.3, appendix C.1): WRN-28-10
# for 200 epochs at batch 256, lr 0.1, weight decay 5e-4, basic augmentation,
# one perturbation per device; the other recipes change only what differs.
_WRN_CIFAR10 = Config(
    dataset="cifar10",
    model="wrn28_10",
    epochs=200,
    batch_size=256,
    lr=0.1,
    weight_decay=5e-4,
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


def recipe(name: str) -> Config:
    if name not in RECIPES:
        raise UsageError(f"unknown config {name!r}; valid choices: {', '.join(RECIPES)}.")
    return RECIPES[name]


def validate(config: Config, n_devices: int = 1) -> None:
    """Refuses bad values before any work starts (the message names the flag)."""
    if config.dataset not in DATASETS:
        raise UsageError(
            f"--dataset: unknown {config.dataset!r}; valid choices: {', '.join(DATASETS)}."
        )
    if config.model not in MODELS:
        raise UsageError(f"--model: unknown {config.model!r}; valid choices: {', '.join(MODELS)}.")
    if config.augment not in AUGMENTATIONS:
        raise UsageError(
            f"--augment: unknown {config.augment!r}; valid choices: {', '.join(AUGMENTATIONS)}."
        )
    checks = [
        (config.rho >= 0 and math.isfinite(config.rho), f"--rho must be >= 0, got {config.rho}"),
        (config.norm > 1, f"--norm must be > 1 (or inf), got {config.norm}"),
        (
            0.0 <= config.label_noise < 1.0,
            f"--label-noise must be in [0, 1), got {config.label_noise}",
        ),
        (
            0.0 <= config.label_smoothing < 1.0,
            f"--label-smoothing must be in [0, 1), got {config.label_smoothing}",
        ),
        (0.0 <= config.dropout < 1.0, f"--dropout must be in [0, 1), got {config.dropout}"),
        (config.epochs >= 1, f"--epochs must be >= 1, got {config.epochs}"),
        (config.batch_size >= 1, f"--batch-size must be >= 1, got {config.batch_size}"),
        (config.lr > 0, f"--lr must be > 0, got {config.lr}"),
        (config.weight_decay >= 0, f"--weight-decay must be >= 0, got {config.weight_decay}"),
        (config.m is None or config.m >= 1, f"--m must be >= 1, got {config.m}"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message + ".")
    per_device, rest = divmod(config.batch_size, n_devices)
    if rest:
        raise UsageError(
            f"--batch-size {config.batch_size} does not split over {n_devices} devices."
        )
    if config.m is not None and per_device % config.m:
        raise UsageError(
            f"--batch-size {config.batch_size} is not divisible by devices x m = "
            f"{n_devices} x {config.m}: each device gets {per_device} examples."
        )
    if config.sync_perturbation and config.m is not None and config.m < per_device:
        raise UsageError(
            "--sync-perturbation shares one perturbation over the whole batch; "
            f"it cannot be combined with --m {config.m} < the per-device batch {per_device}."
        )
