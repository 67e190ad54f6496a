"""What every architecture shares: the ``bn`` modes, the :func:`model_builder` decorator that
checks a builder's common arguments, the released code's per-input-size defaults, and the
layer blocks and checks the builders are made of."""
from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from torch import nn

BN_MODES = ("full", "conv", "none")


def model_builder(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Check a builder's common arguments (``input_shape`` (C, H, W), ``num_classes``, ``bn``,
    whose default is the builder's own) and record them on the model it returns
    (``input_shape``, ``num_classes``, ``bn``, ``arch``: the builder's name)."""

    default_bn = inspect.signature(builder).parameters["bn"].default

    @functools.wraps(builder)
    def build(input_shape: Sequence[int], num_classes: int, bn: str = default_bn,
              **kwargs: Any) -> nn.Module:
        if bn not in BN_MODES:
            raise ValueError(f"unknown bn mode {bn!r}; expected one of {BN_MODES}")
        shape = check_shape(input_shape)
        if isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        model = builder(shape, int(num_classes), bn, **kwargs)
        model.input_shape = shape
        model.num_classes = int(num_classes)
        model.bn = bn
        model.arch = builder.__name__
        return model

    return build


def affine_layers(model: nn.Module) -> list[nn.Module]:
    """The ``Conv2d`` / ``Linear`` layers of ``model`` in forward order.

    All models of :mod:`fastcert.models` register their layers in the order their ``forward``
    runs them (inside a residual block: the main branch, then the shortcut), so module order is
    forward order. Used by the warmup regularizers (Sec. 3.3.3 of Shi et al. 2021) and the
    ReLU-state diagnostics.
    """
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def is_imagenet64(input_shape: Sequence[int]) -> bool:
    """Whether Shi et al.'s TinyImageNet variant applies: inputs of 64×64 pixels or more."""
    return min(int(input_shape[1]), int(input_shape[2])) >= 64


def per_input(value: Any, input_shape: Sequence[int], small: Any, imagenet64: Any) -> Any:
    """``value``, or when it is None the released code's value for this input size."""
    if value is not None:
        return value
    return imagenet64 if is_imagenet64(input_shape) else small


def check_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    try:
        shape = tuple(int(s) for s in input_shape)
    except (TypeError, ValueError):
        raise ValueError(f"input_shape must be (C, H, W), got {input_shape!r}") from None
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"input_shape must be three positive ints (C, H, W), got {input_shape!r}")
    return shape  # type: ignore[return-value]


def bn_flags(bn: str) -> tuple[bool, bool]:
    """(BN after convolutions?, BN after hidden linear layers?) for a ``bn`` mode."""
    if bn not in BN_MODES:
        raise ValueError(f"unknown bn mode {bn!r}; expected one of {BN_MODES}")
    return bn in ("full", "conv"), bn == "full"


def scaled(channels: int, width: float) -> int:
    if not width > 0:
        raise ValueError(f"width multiplier must be > 0, got {width!r}")
    return max(1, int(round(channels * width)))


def conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    out = (size + 2 * padding - kernel) // stride + 1
    if out < 1:
        raise ValueError(
            f"input of spatial size {size} is too small for a {kernel}x{kernel} convolution "
            f"with stride {stride} and padding {padding}"
        )
    return out


def conv_bn_relu(c_in: int, c_out: int, k: int, s: int, p: int, bn: bool) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, k, stride=s, padding=p)]
    if bn:
        layers.append(nn.BatchNorm2d(c_out))
    layers.append(nn.ReLU())
    return layers


def linear_bn_relu(f_in: int, f_out: int, bn: bool) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Linear(f_in, f_out)]
    if bn:
        layers.append(nn.BatchNorm1d(f_out))
    layers.append(nn.ReLU())
    return layers


def feedforward(
    input_shape: tuple[int, int, int],
    num_classes: int,
    bn: str,
    convs: Iterable[tuple[int, int, int, int]],
    fcs: Iterable[int],
) -> nn.Sequential:
    """Conv(+BN)+ReLU blocks, Flatten, hidden Linear(+BN)+ReLU blocks, output Linear.

    ``convs`` holds ``(out_channels, kernel, stride, padding)``; ``fcs`` the hidden FC widths.
    The FC fan-in is computed from ``input_shape``.
    """
    bn_conv, bn_fc = bn_flags(bn)
    c, h, w = input_shape
    layers: list[nn.Module] = []
    for c_out, k, s, p in convs:
        layers += conv_bn_relu(c, c_out, k, s, p, bn_conv)
        c, h, w = c_out, conv_out(h, k, s, p), conv_out(w, k, s, p)
    layers.append(nn.Flatten())
    features = c * h * w
    for f in fcs:
        layers += linear_bn_relu(features, f, bn_fc)
        features = f
    layers.append(nn.Linear(features, num_classes))
    return nn.Sequential(*layers)


def positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)
