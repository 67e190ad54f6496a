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
docs/papers/shi2021.md.
"""
from fastcert.models.base import BN_MODES, affine_layers, is_imagenet64, model_builder
from fastcert.models.feedforward import (
    cnn7,
    cnn_2layer,
    cnn_3layer_fixed,
    cnn_4layer,
    cnn_small,
    dm_large,
    dm_medium,
    dm_small,
    mlp,
)
from fastcert.models.residual import BasicResidualBlock, ResNeXtBlock, resnext, wide_resnet
from fastcert.models.two_layer import FixedLinear, two_layer

__all__ = [
    "BN_MODES",
    "model_builder",
    "affine_layers",
    "is_imagenet64",
    "BasicResidualBlock",
    "ResNeXtBlock",
    "FixedLinear",
    "mlp",
    "cnn7",
    "dm_small",
    "dm_medium",
    "dm_large",
    "cnn_small",
    "cnn_2layer",
    "cnn_4layer",
    "cnn_3layer_fixed",
    "wide_resnet",
    "resnext",
    "two_layer",
]
