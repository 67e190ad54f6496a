"""Residual architectures: Wide-ResNet and ResNeXt (the released code of Shi et al. 2021) and
their blocks."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fastcert.models.base import (
    bn_flags,
    conv_bn_relu,
    conv_out,
    linear_bn_relu,
    model_builder,
    per_input,
    positive_int,
)


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
    layers += linear_bn_relu(features, fc_width, bn_fc)
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
    bn_conv, bn_fc = bn_flags(bn)
    num_blocks = [positive_int("num_blocks entry", b) for b in num_blocks]
    if not num_blocks:
        raise ValueError("num_blocks must name at least one stage")
    widen_factor = positive_int("widen_factor", per_input(widen_factor, input_shape, 8, 10))
    base_width = positive_int("base_width", base_width)
    fc_width = positive_int("fc_width", fc_width)
    c, h, w = input_shape
    layers: list[nn.Module] = conv_bn_relu(c, base_width, 3, 1, 1, bn_conv)
    c = base_width
    for s, (blocks, stride) in enumerate(zip(num_blocks, _stage_strides(num_blocks))):
        c_out = base_width * widen_factor * 2**s
        for b in range(blocks):
            st = stride if b == 0 else 1
            layers.append(BasicResidualBlock(c, c_out, st, bn_conv))
            c, h, w = c_out, conv_out(h, 3, st, 1), conv_out(w, 3, st, 1)
    model = _residual_head(layers, c * h * w, fc_width, num_classes, bn_fc)
    if per_input(kaiming_fan_out, input_shape, True, False):
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
    bn_conv, bn_fc = bn_flags(bn)
    num_blocks = [positive_int("num_blocks entry", b)
                  for b in per_input(num_blocks, input_shape, (1, 1, 1), (2, 2, 2))]
    if not num_blocks:
        raise ValueError("num_blocks must name at least one stage")
    cardinality = positive_int("cardinality", cardinality)
    width = positive_int("bottleneck_width", per_input(bottleneck_width, input_shape, 32, 8))
    stem_width = positive_int("stem_width", per_input(stem_width, input_shape, 64, 16))
    fc_width = positive_int("fc_width", fc_width)
    c, h, w = input_shape
    layers: list[nn.Module] = conv_bn_relu(c, stem_width, 3, 1, 1, bn_conv)
    c = stem_width
    for blocks, stride in zip(num_blocks, _stage_strides(num_blocks)):
        for b in range(blocks):
            st = stride if b == 0 else 1
            block = ResNeXtBlock(c, cardinality, width, st, bn_conv)
            layers.append(block)
            c, h, w = block.out_channels, conv_out(h, 3, st, 1), conv_out(w, 3, st, 1)
        width *= 2
    return _residual_head(layers, c * h * w, fc_width, num_classes, bn_fc)
