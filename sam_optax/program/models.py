"""The program's Flax Linen networks.

Every model is called as ``model.apply(variables, x, train=bool)`` and takes
images ``(N, H, W, C)`` already normalized. Models with BatchNorm carry a
``batch_stats`` collection (momentum 0.9, the paper's JAX code).

* ``mlp``: two hidden layers of 256 (ReLU), optional dropout.
* ``cnn``: two 3x3 conv + BatchNorm + ReLU + 2x2 pooling (32, 64 channels),
  dense 256, optional dropout.
* ``resnet20`` / ``resnet32``: He et al.'s CIFAR ResNets (6n + 2 layers, 16, 32
  and 64 channels, projection shortcuts), ResNet-32 being the paper's
  label-noise model.
* ``wrn28_10`` (and ``wrn28_2``, ``wrn16_8``): Zagoruyko & Komodakis'
  pre-activation WideResNets, WRN-28-10 being the paper's CIFAR model.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp

from sam_optax.program.errors import UsageError

_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
_BatchNorm = partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5)


class MLP(nn.Module):
    num_classes: int
    hidden: tuple[int, ...] = (256, 256)
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = x.reshape(x.shape[0], -1)
        for width in self.hidden:
            x = nn.relu(nn.Dense(width)(x))
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(self.num_classes)(x)


class CNN(nn.Module):
    num_classes: int
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = True):
        for channels in (32, 64):
            x = nn.Conv(channels, (3, 3), use_bias=False, kernel_init=_conv_init)(x)
            x = nn.relu(_BatchNorm(use_running_average=not train)(x))
            x = nn.max_pool(x, (2, 2), (2, 2))
        x = nn.relu(nn.Dense(256)(x.reshape(x.shape[0], -1)))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(self.num_classes)(x)


class _BasicBlock(nn.Module):
    channels: int
    stride: int

    @nn.compact
    def __call__(self, x, train: bool):
        bn = partial(_BatchNorm, use_running_average=not train)
        y = nn.Conv(self.channels, (3, 3), self.stride, use_bias=False, kernel_init=_conv_init)(x)
        y = nn.relu(bn()(y))
        y = nn.Conv(self.channels, (3, 3), use_bias=False, kernel_init=_conv_init)(y)
        y = bn(scale_init=nn.initializers.zeros)(y)
        if x.shape != y.shape:
            x = nn.Conv(self.channels, (1, 1), self.stride, use_bias=False, kernel_init=_conv_init)(
                x
            )
            x = bn()(x)
        return nn.relu(x + y)


class CifarResNet(nn.Module):
    """He et al. (2015) CIFAR ResNet with 6n + 2 layers."""

    num_classes: int
    depth: int = 32

    @nn.compact
    def __call__(self, x, train: bool = True):
        if (self.depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2, got {self.depth}.")
        n = (self.depth - 2) // 6
        x = nn.Conv(16, (3, 3), use_bias=False, kernel_init=_conv_init)(x)
        x = nn.relu(_BatchNorm(use_running_average=not train)(x))
        for stage, channels in enumerate((16, 32, 64)):
            for block in range(n):
                x = _BasicBlock(channels, 2 if stage > 0 and block == 0 else 1)(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes)(x)


class _WideBlock(nn.Module):
    channels: int
    stride: int
    dropout: float

    @nn.compact
    def __call__(self, x, train: bool):
        bn = partial(_BatchNorm, use_running_average=not train)
        pre = nn.relu(bn()(x))
        y = nn.Conv(self.channels, (3, 3), self.stride, use_bias=False, kernel_init=_conv_init)(pre)
        y = nn.relu(bn()(y))
        y = nn.Dropout(self.dropout, deterministic=not train)(y)
        y = nn.Conv(self.channels, (3, 3), use_bias=False, kernel_init=_conv_init)(y)
        if x.shape != y.shape:
            x = nn.Conv(self.channels, (1, 1), self.stride, use_bias=False, kernel_init=_conv_init)(
                pre
            )
        return x + y


class WideResNet(nn.Module):
    """Zagoruyko & Komodakis (2016) WRN-depth-k, pre-activation blocks."""

    num_classes: int
    depth: int = 28
    width: int = 10
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = True):
        if (self.depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n + 4, got {self.depth}.")
        n = (self.depth - 4) // 6
        x = nn.Conv(16, (3, 3), use_bias=False, kernel_init=_conv_init)(x)
        for stage, channels in enumerate((16, 32, 64)):
            for block in range(n):
                stride = 2 if stage > 0 and block == 0 else 1
                x = _WideBlock(channels * self.width, stride, self.dropout)(x, train)
        x = nn.relu(_BatchNorm(use_running_average=not train)(x))
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes)(x)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "cnn": CNN,
    "resnet20": partial(CifarResNet, depth=20),
    "resnet32": partial(CifarResNet, depth=32),
    "wrn16_8": partial(WideResNet, depth=16, width=8),
    "wrn28_2": partial(WideResNet, depth=28, width=2),
    "wrn28_10": partial(WideResNet, depth=28, width=10),
}

_TAKES_DROPOUT = ("mlp", "cnn", "wrn16_8", "wrn28_2", "wrn28_10")


def create_model(name: str, num_classes: int, dropout: float = 0.0) -> nn.Module:
    if name not in MODELS:
        raise UsageError(f"unknown model {name!r}; valid choices: {', '.join(MODELS)}.")
    kwargs = {"dropout": dropout} if name in _TAKES_DROPOUT else {}
    if dropout and name not in _TAKES_DROPOUT:
        raise UsageError(
            f"model {name!r} has no dropout; valid with dropout: {', '.join(_TAKES_DROPOUT)}."
        )
    return MODELS[name](num_classes=num_classes, **kwargs)


def init_variables(model: nn.Module, image_shape: tuple[int, ...], key: jax.Array) -> dict:
    """Initial variables (``params`` and, with BatchNorm, ``batch_stats``)."""
    x = jnp.zeros((1, *image_shape), jnp.float32)
    return dict(jax.jit(partial(model.init, train=False))(key, x))


def count_params(params) -> int:
    return sum(int(p.size) for p in jax.tree.leaves(params))
