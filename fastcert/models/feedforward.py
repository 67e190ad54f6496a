"""Feed-forward architectures: the MLP, CNN-7 of Shi et al. 2021, the DM models of Gowal et al.
2018, fastcert's small CNN, and CROWN-IBP's small MNIST models."""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from fastcert.models.base import feedforward, model_builder, per_input, positive_int, scaled


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
    widths = tuple(positive_int("widths entry", w) for w in widths)
    return feedforward(input_shape, num_classes, bn, convs=(), fcs=widths)


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
    strides = [positive_int("strides entry", v) for v in
               per_input(strides, input_shape, (1, 1, 2, 1, 1), (1, 1, 2, 1, 2))]
    if len(strides) != 5:
        raise ValueError(f"strides must give one stride per convolution (5), got {strides}")
    c1, c2, fc = scaled(64, width), scaled(128, width), scaled(512, width)
    channels = [c1, c1, c2, c2, c2]
    convs = [(c, 3, st, 1) for c, st in zip(channels, strides)]
    return feedforward(input_shape, num_classes, bn, convs, [fc])


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
    convs = [(scaled(16, width), 4, 2, 1), (scaled(32, width), 4, 1, 1)]
    return feedforward(input_shape, num_classes, bn, convs, [scaled(100, width)])


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
    c1, c2, fc = scaled(32, width), scaled(64, width), scaled(512, width)
    convs = [(c1, 3, 1, 1), (c1, 4, 2, 1), (c2, 3, 1, 1), (c2, 4, 2, 1)]
    return feedforward(input_shape, num_classes, bn, convs, [fc, fc])


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
    convs = [(scaled(16, width), 3, 1, 1), (scaled(32, width), 4, 2, 1)]
    return feedforward(input_shape, num_classes, bn, convs, [scaled(64, width)])


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
    convs = [(scaled(4, width), 4, 2, 1), (scaled(8, width), 4, 2, 1)]
    return feedforward(input_shape, num_classes, bn, convs,
                        [positive_int("linear_size", linear_size)])


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
    c1, c2 = scaled(4, width), scaled(8, width)
    convs = [(c1, 3, 1, 1), (c1, 4, 2, 1), (c2, 3, 1, 1), (c2, 4, 2, 1)]
    fc = positive_int("linear_size", linear_size)
    return feedforward(input_shape, num_classes, bn, convs, [fc, fc])


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
    k = positive_int("kernel_size", kernel_size)
    c1, c2 = scaled(4, width), scaled(8, width)
    fc = positive_int("linear_size", linear_size if linear_size is not None
                       else scaled(64, width))
    convs = [(c1, k, 1, 1), (c2, k, 1, 1), (c2, 4, 4, 0)]
    return feedforward(input_shape, num_classes, bn, convs, [fc])
