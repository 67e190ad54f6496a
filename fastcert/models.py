"""Registry of classifier architectures for certified training (timm-style).

Every model is built only from ``Conv2d``, ``Linear``, ``BatchNorm1d/2d``, ``ReLU`` (never
in-place), ``Flatten`` and residual additions, so that auto_LiRPA 0.3's ``BoundedModule`` can
trace it and compute sound IBP / CROWN bounds. No pooling is used: down-sampling is done with
strided convolutions, as in the "no pooling" models of Xu et al. (2020) and Shi et al. (2021).

BatchNorm placement is controlled by ``bn`` (Sec. 3.3.2 and Table 4 of Shi et al. 2021):

* ``"full"``  BN after every convolution *and* every hidden fully-connected layer ("full BN",
  the setting of all main results of Shi et al. 2021);
* ``"conv"``  BN after convolutions only (the "BN-Conv ✓, BN-FC ×" row of Table 4, i.e. the
  models of prior work that missed BN on the hidden FC layer);
* ``"none"``  no BN at all.

The output (classification) layer is never followed by BN. With ``bn="full"`` there is exactly
one BN per hidden affine layer (1x1 shortcut convolutions included).

Each model is a builder function ``builder(input_shape, num_classes, bn, *, **options)``
decorated with :func:`model_builder`; ``conf/model/<name>.yaml`` names it
(``_target_: fastcert.models.<builder>``) and sets ``bn`` and its keyword-only options. The data
supplies ``input_shape`` and ``num_classes`` at run time.

**The paper's variant per input size.** Shi et al. 2021's released code
(shizhouxing/Fast-Certified-Robust-Training) uses other networks on TinyImageNet than on
MNIST/CIFAR-10 (``cnn_7layer_bn_imagenet``, ``wide_resnet_bn_imagenet64``,
``ResNeXt_bn_imagenet64``). The options of :func:`cnn7`, :func:`wide_resnet` and
:func:`resnext` in which the two differ default to ``None`` = "the released code's value for this
input": the TinyImageNet network for inputs of 64×64 pixels or more
(:func:`is_imagenet64`), the MNIST/CIFAR-10 one otherwise. So ``model=resnext
data=tinyimagenet`` builds ``ResNeXt_bn_imagenet64`` and ``model=resnext data=cifar10`` builds
``ResNeXt_2_32``, while an explicit value (``model.num_blocks=[1,1,1]``) always wins. The
parameter counts of every (model, data) pair are pinned by tests/test_models.py and listed in
the README.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

__all__ = [
    "BN_MODES",
    "model_builder",
    "affine_layers",
    "is_imagenet64",
    "BasicResidualBlock",
    "ResNeXtBlock",
]

BN_MODES = ("full", "conv", "none")


def model_builder(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Check a builder's common arguments (``input_shape`` (C, H, W), ``num_classes``, ``bn``,
    whose default is the builder's own) and record them on the model it returns (``input_shape``, ``num_classes``, ``bn``,
    ``arch``: the builder's name)."""

    default_bn = inspect.signature(builder).parameters["bn"].default

    @functools.wraps(builder)
    def build(input_shape: Sequence[int], num_classes: int, bn: str = default_bn,
              **kwargs: Any) -> nn.Module:
        if bn not in BN_MODES:
            raise ValueError(f"unknown bn mode {bn!r}; expected one of {BN_MODES}")
        shape = _check_shape(input_shape)
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

    All models of this module register their layers in the order their ``forward`` runs them
    (inside a residual block: the main branch, then the shortcut), so module order is forward
    order. Used by the warmup regularizers (Sec. 3.3.3 of Shi et al. 2021) and the ReLU-state
    diagnostics.
    """
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def is_imagenet64(input_shape: Sequence[int]) -> bool:
    """Whether Shi et al.'s TinyImageNet variant applies: inputs of 64×64 pixels or more."""
    return min(int(input_shape[1]), int(input_shape[2])) >= 64


def _per_input(value: Any, input_shape: Sequence[int], small: Any, imagenet64: Any) -> Any:
    """``value``, or when it is None the released code's value for this input size."""
    if value is not None:
        return value
    return imagenet64 if is_imagenet64(input_shape) else small


# ----------------------------------------------------------------------------------- helpers


def _check_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    try:
        shape = tuple(int(s) for s in input_shape)
    except (TypeError, ValueError):
        raise ValueError(f"input_shape must be (C, H, W), got {input_shape!r}") from None
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"input_shape must be three positive ints (C, H, W), got {input_shape!r}")
    return shape  # type: ignore[return-value]


def _bn_flags(bn: str) -> tuple[bool, bool]:
    """(BN after convolutions?, BN after hidden linear layers?) for a ``bn`` mode."""
    if bn not in BN_MODES:
        raise ValueError(f"unknown bn mode {bn!r}; expected one of {BN_MODES}")
    return bn in ("full", "conv"), bn == "full"


def _scaled(channels: int, width: float) -> int:
    if not width > 0:
        raise ValueError(f"width multiplier must be > 0, got {width!r}")
    return max(1, int(round(channels * width)))


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    out = (size + 2 * padding - kernel) // stride + 1
    if out < 1:
        raise ValueError(
            f"input of spatial size {size} is too small for a {kernel}x{kernel} convolution "
            f"with stride {stride} and padding {padding}"
        )
    return out


def _conv_bn_relu(c_in: int, c_out: int, k: int, s: int, p: int, bn: bool) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, k, stride=s, padding=p)]
    if bn:
        layers.append(nn.BatchNorm2d(c_out))
    layers.append(nn.ReLU())
    return layers


def _linear_bn_relu(f_in: int, f_out: int, bn: bool) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Linear(f_in, f_out)]
    if bn:
        layers.append(nn.BatchNorm1d(f_out))
    layers.append(nn.ReLU())
    return layers


def _feedforward(
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
    bn_conv, bn_fc = _bn_flags(bn)
    c, h, w = input_shape
    layers: list[nn.Module] = []
    for c_out, k, s, p in convs:
        layers += _conv_bn_relu(c, c_out, k, s, p, bn_conv)
        c, h, w = c_out, _conv_out(h, k, s, p), _conv_out(w, k, s, p)
    layers.append(nn.Flatten())
    features = c * h * w
    for f in fcs:
        layers += _linear_bn_relu(features, f, bn_fc)
        features = f
    layers.append(nn.Linear(features, num_classes))
    return nn.Sequential(*layers)


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


# ------------------------------------------------------------------------- feedforward models


@model_builder
def mlp(
    input_shape: tuple[int, int, int],
    num_classes: int,
    bn: str = "full",
    *,
    widths: Sequence[int] = (256, 256),
) -> nn.Module:
    """Fully-connected ReLU network: Flatten, hidden Linear(+BN)+ReLU layers of ``widths``,
    output Linear. With ``bn="full"`` each hidden layer is followed by BN (Sec. 3.3.2 of Shi et
    al. 2021); ``"conv"`` has no convolution, hence no BN."""
    widths = tuple(_positive_int("widths entry", w) for w in widths)
    return _feedforward(input_shape, num_classes, bn, convs=(), fcs=widths)


@model_builder
def cnn7(
    input_shape: tuple[int, int, int],
    num_classes: int,
    bn: str = "full",
    *,
    width: float = 1.0,
    strides: Sequence[int] | None = None,
) -> nn.Module:
    """CNN-7 of Shi et al. 2021 (Sec. 4.1, "following Xu et al. (2020)"): five 3x3 convolutions
    with 64, 64, 128, 128, 128 channels (padding 1, strides ``strides``), Flatten, FC 512, FC
    ``num_classes``; with ``bn="full"`` BN after every convolution and after the FC 512 (the
    BatchNorm1d of the released ``cnn_7layer_bn2``).

    ``strides=None`` takes the released code's: (1, 1, 2, 1, 1) (``cnn_7layer_bn2``, MNIST and
    CIFAR-10: FC fan-in 128*16*16 = 32768 on CIFAR, the n_i = 32768 of Table 5) and, for 64×64
    inputs, (1, 1, 2, 1, 2) (``cnn_7layer_bn_imagenet``: the fifth convolution has stride 2, so
    the FC fan-in is again 128*16*16 = 32768 on TinyImageNet). ``width`` scales every channel
    count and the FC width (width=0.125 gives 8, 8, 16, 16, 16 channels and FC 64)."""
    strides = [_positive_int("strides entry", v) for v in
               _per_input(strides, input_shape, (1, 1, 2, 1, 1), (1, 1, 2, 1, 2))]
    if len(strides) != 5:
        raise ValueError(f"strides must give one stride per convolution (5), got {strides}")
    c1, c2, fc = _scaled(64, width), _scaled(128, width), _scaled(512, width)
    channels = [c1, c1, c2, c2, c2]
    convs = [(c, 3, st, 1) for c, st in zip(channels, strides)]
    return _feedforward(input_shape, num_classes, bn, convs, [fc])


@model_builder
def dm_small(
    input_shape: tuple[int, int, int],
    num_classes: int,
    bn: str = "full",
    *,
    width: float = 1.0,
) -> nn.Module:
    """DM-small of Gowal et al. 2018 (Table 1 there; "DM-small" in Zhang et al. 2020, Sec. 4):
    conv 16 4x4 stride 2, conv 32 4x4 stride 1, FC 100, FC ``num_classes``. The papers give
    kernels and strides only; we use padding 1 for both convolutions. ``width`` scales channels
    and the FC width."""
    convs = [(_scaled(16, width), 4, 2, 1), (_scaled(32, width), 4, 1, 1)]
    return _feedforward(input_shape, num_classes, bn, convs, [_scaled(100, width)])


@model_builder
def dm_medium(
    input_shape: tuple[int, int, int],
    num_classes: int,
    bn: str = "full",
    *,
    width: float = 1.0,
) -> nn.Module:
    """DM-medium of Gowal et al. 2018 / Zhang et al. 2020: conv 32 3x3 s1, conv 32 4x4 s2,
    conv 64 3x3 s1, conv 64 4x4 s2, FC 512, FC 512, FC ``num_classes`` (padding 1 everywhere,
    our choice). ``width`` scales channels and FC widths."""
    c1, c2, fc = _scaled(32, width), _scaled(64, width), _scaled(512, width)
    convs = [(c1, 3, 1, 1), (c1, 4, 2, 1), (c2, 3, 1, 1), (c2, 4, 2, 1)]
    return _feedforward(input_shape, num_classes, bn, convs, [fc, fc])


@model_builder
def dm_large(
    input_shape: tuple[int, int, int],
    num_classes: int,
    bn: str = "full",
    *,
    width: float = 1.0,
) -> nn.Module:
    """DM-large of Gowal et al. 2018 / Zhang et al. 2020: conv 64 3x3 s1, conv 64 3x3 s1,
    conv 128 3x3 s2, conv 128 3x3 s1, conv 128 3x3 s1 (padding 1), FC 512, FC ``num_classes``.
    (Same layer shapes as CNN-7 on MNIST/CIFAR-10, on every input size; ``IBP_large`` of the
    CROWN-IBP code with ``bn="none"``.) ``width`` scales channels and the FC width."""
    return cnn7(input_shape, num_classes, bn, width=width, strides=(1, 1, 2, 1, 1))


@model_builder
def cnn_small(
    input_shape: tuple[int, int, int],
    num_classes: int,
    bn: str = "full",
    *,
    width: float = 1.0,
) -> nn.Module:
    """Small fast CNN for 8x8 digits and tests (fastcert's own, no paper source): conv 16 3x3
    s1 p1, conv 32 4x4 s2 p1, FC 64, FC ``num_classes``. ``width`` scales channels and FC."""
    convs = [(_scaled(16, width), 3, 1, 1), (_scaled(32, width), 4, 2, 1)]
    return _feedforward(input_shape, num_classes, bn, convs, [_scaled(64, width)])


# ------------------------------------------------------------ CROWN-IBP's small MNIST models
# model_defs.py of the CROWN-IBP code (huanzhang12/CROWN-IBP): the models of its MNIST and
# Fashion-MNIST configs (config/{mnist,fashion-mnist}_crown{,_large}.json), without BN
# (``bn: none`` in their config files) and with PyTorch's default init, as there.


@model_builder
def cnn_2layer(
    input_shape: tuple[int, int, int],
    num_classes: int,
    bn: str = "none",
    *,
    width: float = 1.0,
    linear_size: int = 128,
) -> nn.Module:
    """``model_cnn_2layer`` of the CROWN-IBP code: conv 4·width 4x4 stride 2 padding 1, conv
    8·width 4x4 stride 2 padding 1, FC ``linear_size``, FC ``num_classes`` (on 28x28 the FC
    fan-in is 8·width·7·7). ``width`` multiplies the channel counts (a float: 0.25 gives one
    channel per layer)."""
    convs = [(_scaled(4, width), 4, 2, 1), (_scaled(8, width), 4, 2, 1)]
    return _feedforward(input_shape, num_classes, bn, convs,
                        [_positive_int("linear_size", linear_size)])


@model_builder
def cnn_4layer(
    input_shape: tuple[int, int, int],
    num_classes: int,
    bn: str = "none",
    *,
    width: float = 1.0,
    linear_size: int = 256,
) -> nn.Module:
    """``model_cnn_4layer`` of the CROWN-IBP code: conv 4·width 3x3 s1 p1, conv 4·width 4x4 s2
    p1, conv 8·width 3x3 s1 p1, conv 8·width 4x4 s2 p1, FC ``linear_size``, FC
    ``linear_size``, FC ``num_classes`` (width 8, linear 512 is DM-medium)."""
    c1, c2 = _scaled(4, width), _scaled(8, width)
    convs = [(c1, 3, 1, 1), (c1, 4, 2, 1), (c2, 3, 1, 1), (c2, 4, 2, 1)]
    fc = _positive_int("linear_size", linear_size)
    return _feedforward(input_shape, num_classes, bn, convs, [fc, fc])


@model_builder
def cnn_3layer_fixed(
    input_shape: tuple[int, int, int],
    num_classes: int,
    bn: str = "none",
    *,
    kernel_size: int = 3,
    width: float = 1.0,
    linear_size: int | None = None,
) -> nn.Module:
    """``model_cnn_3layer_fixed`` of the CROWN-IBP code: conv 4·width ``kernel_size`` s1 p1,
    conv 8·width ``kernel_size`` s1 p1, conv 8·width 4x4 stride 4 (no padding), FC
    ``linear_size`` (None: 64·width, as there), FC ``num_classes``. On 28x28 the FC fan-in is
    8·width·7·7 for kernel 3 and 8·width·6·6 for kernel 5."""
    k = _positive_int("kernel_size", kernel_size)
    c1, c2 = _scaled(4, width), _scaled(8, width)
    fc = _positive_int("linear_size", linear_size if linear_size is not None
                       else _scaled(64, width))
    convs = [(c1, k, 1, 1), (c2, k, 1, 1), (c2, 4, 4, 0)]
    return _feedforward(input_shape, num_classes, bn, convs, [fc])


# ---------------------------------------------------------------------------- residual models


def _shortcut(c_in: int, c_out: int, stride: int, bn: bool) -> nn.Module:
    """Residual shortcut: a strided 1x1 convolution (+BN) when the shape changes, else identity."""
    if stride != 1 or c_in != c_out:
        return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride),
                             nn.BatchNorm2d(c_out) if bn else nn.Identity())
    return nn.Identity()


class BasicResidualBlock(nn.Module):
    """Post-activation residual block of two 3x3 convolutions (Wide-ResNet, Zagoruyko &
    Komodakis 2016, as used with full BN by Shi et al. 2021, Sec. 4.1):

    ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`` where ``shortcut`` is a strided 1x1
    convolution (+BN) when the shape changes, else the identity. ReLUs are not in-place (auto_LiRPA
    traces the residual addition). Layers are registered in forward order.
    """

    def __init__(self, c_in: int, c_out: int, stride: int, bn: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)
        self.bn1 = nn.BatchNorm2d(c_out) if bn else nn.Identity()
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1)
        self.bn2 = nn.BatchNorm2d(c_out) if bn else nn.Identity()
        self.shortcut = _shortcut(c_in, c_out, stride, bn)
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


class ResNeXtBlock(nn.Module):
    """ResNeXt bottleneck block (Xie et al. 2017), as in the ResNeXt of Xu et al. 2020 / Shi et
    al. 2021: 1x1 conv to ``cardinality * bottleneck_width`` channels, grouped 3x3 conv
    (``cardinality`` groups, carries the stride), 1x1 conv to ``expansion`` times that, each
    followed by BN; plus a 1x1 (+BN) shortcut when the shape changes; ReLU after the addition.
    """

    def __init__(
        self,
        c_in: int,
        cardinality: int,
        bottleneck_width: int,
        stride: int,
        bn: bool,
        expansion: int = 2,
    ) -> None:
        super().__init__()
        group_width = cardinality * bottleneck_width
        self.out_channels = c_out = expansion * group_width
        self.conv1 = nn.Conv2d(c_in, group_width, 1)
        self.bn1 = nn.BatchNorm2d(group_width) if bn else nn.Identity()
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(
            group_width, group_width, 3, stride=stride, padding=1, groups=cardinality
        )
        self.bn2 = nn.BatchNorm2d(group_width) if bn else nn.Identity()
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(group_width, c_out, 1)
        self.bn3 = nn.BatchNorm2d(c_out) if bn else nn.Identity()
        self.shortcut = _shortcut(c_in, c_out, stride, bn)
        self.relu3 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + self.shortcut(x))


def _stage_strides(num_blocks: Sequence[int]) -> list[int]:
    """Stride of each stage: 1 for the first, 2 for the others (no pooling)."""
    return [1] + [2] * (len(num_blocks) - 1)


def _residual_head(
    layers: list[nn.Module], features: int, fc_width: int, num_classes: int, bn_fc: bool
) -> nn.Sequential:
    layers.append(nn.Flatten())
    layers += _linear_bn_relu(features, fc_width, bn_fc)
    layers.append(nn.Linear(fc_width, num_classes))
    return nn.Sequential(*layers)


@model_builder
def wide_resnet(
    input_shape: tuple[int, int, int],
    num_classes: int,
    bn: str = "full",
    *,
    num_blocks: Sequence[int] = (1, 1, 1),
    widen_factor: int | None = None,
    base_width: int = 16,
    fc_width: int = 512,
    kaiming_fan_out: bool | None = None,
) -> nn.Module:
    """The smaller Wide-ResNet of Shi et al. 2021 (Sec. 4.1 and footnote of Table 2;
    Zagoruyko & Komodakis 2016), without pooling: a 3x3 stem convolution to ``base_width``
    channels, then one stage per entry of ``num_blocks`` with ``base_width * widen_factor *
    2**s`` channels (stride 1 for the first stage, a stride-2 first convolution for the others)
    made of :class:`BasicResidualBlock`, then Flatten, FC ``fc_width`` (+BN) and FC
    ``num_classes``.

    ``None`` options take the released code's values for the input size:

    * ``widen_factor``: 8 (``wide_resnet_8``, MNIST/CIFAR-10: channels 16/128/256/512, FC
      fan-in 512*8*8 = 32768 on CIFAR) or, for 64×64 inputs, 10 (``wide_resnet_bn_imagenet64``:
      16/160/320/640, FC fan-in 640*16*16 = 163840);
    * ``kaiming_fan_out``: whether the constructor draws every convolution weight from
      Kaiming-normal (fan_out, ReLU gain: N(0, 2/(c_out·k²))), as the constructor of
      ``wide_resnet_bn.py`` does (true for MNIST/CIFAR-10); ``wide_resnet_bn_imagenet64.py``
      has no such loop (false for 64×64). It is what ``init=default`` (the vanilla IBP and
      CROWN-IBP baselines) trains from; ``init=ibp`` re-draws the weights anyway.

    Tiny test version: e.g. ``widen_factor=1, base_width=4, fc_width=16``.
    """
    bn_conv, bn_fc = _bn_flags(bn)
    num_blocks = [_positive_int("num_blocks entry", b) for b in num_blocks]
    if not num_blocks:
        raise ValueError("num_blocks must name at least one stage")
    widen_factor = _positive_int("widen_factor", _per_input(widen_factor, input_shape, 8, 10))
    base_width = _positive_int("base_width", base_width)
    fc_width = _positive_int("fc_width", fc_width)
    c, h, w = input_shape
    layers: list[nn.Module] = _conv_bn_relu(c, base_width, 3, 1, 1, bn_conv)
    c = base_width
    for s, (blocks, stride) in enumerate(zip(num_blocks, _stage_strides(num_blocks))):
        c_out = base_width * widen_factor * 2**s
        for b in range(blocks):
            st = stride if b == 0 else 1
            layers.append(BasicResidualBlock(c, c_out, st, bn_conv))
            c, h, w = c_out, _conv_out(h, 3, st, 1), _conv_out(w, 3, st, 1)
    model = _residual_head(layers, c * h * w, fc_width, num_classes, bn_fc)
    if _per_input(kaiming_fan_out, input_shape, True, False):
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return model


@model_builder
def resnext(
    input_shape: tuple[int, int, int],
    num_classes: int,
    bn: str = "full",
    *,
    num_blocks: Sequence[int] | None = None,
    cardinality: int = 2,
    bottleneck_width: int | None = None,
    stem_width: int | None = None,
    fc_width: int = 512,
) -> nn.Module:
    """ResNeXt of Xu et al. 2020 / Shi et al. 2021 (Sec. 4.1; Xie et al. 2017), without pooling:
    3x3 stem convolution to ``stem_width`` channels, one stage of :class:`ResNeXtBlock` per
    entry of ``num_blocks`` (stride 1 for the first stage, 2 for the others; the bottleneck
    width doubles after each stage; expansion 2), then Flatten, FC ``fc_width`` (+BN) and FC
    ``num_classes``.

    ``None`` options take the released code's values for the input size: ``ResNeXt_2_32``
    (MNIST/CIFAR-10: blocks (1, 1, 1), bottleneck width 32, stem 64; 128/256/512 channels, FC
    fan-in 512*8*8 = 32768 on CIFAR) or, for 64×64 inputs, ``ResNeXt_bn_imagenet64`` (blocks
    (2, 2, 2), bottleneck width 8, stem 16; 32/64/128 channels, FC fan-in 128*16*16 = 32768).
    Tiny: ``num_blocks=[1,1,1], cardinality=2, bottleneck_width=2, stem_width=4, fc_width=16``.
    """
    bn_conv, bn_fc = _bn_flags(bn)
    num_blocks = [_positive_int("num_blocks entry", b)
                  for b in _per_input(num_blocks, input_shape, (1, 1, 1), (2, 2, 2))]
    if not num_blocks:
        raise ValueError("num_blocks must name at least one stage")
    cardinality = _positive_int("cardinality", cardinality)
    width = _positive_int("bottleneck_width", _per_input(bottleneck_width, input_shape, 32, 8))
    stem_width = _positive_int("stem_width", _per_input(stem_width, input_shape, 64, 16))
    fc_width = _positive_int("fc_width", fc_width)
    c, h, w = input_shape
    layers: list[nn.Module] = _conv_bn_relu(c, stem_width, 3, 1, 1, bn_conv)
    c = stem_width
    for blocks, stride in zip(num_blocks, _stage_strides(num_blocks)):
        for b in range(blocks):
            st = stride if b == 0 else 1
            block = ResNeXtBlock(c, cardinality, width, st, bn_conv)
            layers.append(block)
            c, h, w = block.out_channels, _conv_out(h, 3, st, 1), _conv_out(w, 3, st, 1)
        width *= 2
    return _residual_head(layers, c * h * w, fc_width, num_classes, bn_fc)


# ------------------------------------------------------------------ the IBP-convergence network


class FixedLinear(nn.Linear):
    """A ``Linear`` layer whose weight and bias are buffers: saved and bounded like any layer,
    never trained (auto_LiRPA 0.3 turns ``requires_grad`` back on for every parameter it
    sees, so a frozen parameter would train)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        nn.Module.__init__(self)
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)


@model_builder
def two_layer(
    input_shape: tuple[int, int, int],
    num_classes: int,
    bn: str = "none",
    *,
    m: int = 1000,
) -> nn.Module:
    """The two-layer network of the IBP convergence analysis (Eq. 4.1 of Wang 2022, Ch. 4;
    Wang et al. 2022, after Du et al. 2019): f(W, a, x) = (1/√m) Σ_r a_r σ(w_rᵀx), width ``m``,
    no biases in the hidden layer, w_r ~ N(0, I), a_r ~ unif{+1, -1} **fixed** (the output
    layer is a :class:`FixedLinear`: only W trains; select ``init=default`` so no initialiser
    overwrites it).

    As logits: output 0 is a constant 0 and output k ≥ 1 is (1/√m) Σ_r a_kr σ(w_rᵀx) with its
    own signs, so with two classes the logits are (0, f), the margin of class 1 is f and that
    of class 0 is -f: y·f with y = ±1, and cross entropy is the logistic loss log(1 + e^{-yf})
    (Eq. 4.2). Draws from torch's global RNG (the pipeline seeds it before building).
    ``bn="none"`` (the default) is Eq. 4.1; ``bn="full"`` puts BatchNorm after the hidden
    layer."""
    m = _positive_int("m", m)
    _, bn_fc = _bn_flags(bn)
    hidden = nn.Linear(input_shape[0] * input_shape[1] * input_shape[2], m, bias=False)
    with torch.no_grad():
        nn.init.normal_(hidden.weight)  # w_r ~ N(0, I)
    signs = torch.randint(0, 2, (num_classes, m)).float() * 2 - 1  # a_r ~ unif{±1}
    signs[0] = 0  # the reference logit
    layers: list[nn.Module] = [nn.Flatten(), hidden]
    if bn_fc:
        layers.append(nn.BatchNorm1d(m))
    return nn.Sequential(*layers, nn.ReLU(), FixedLinear(signs / m ** 0.5, torch.zeros(num_classes)))
