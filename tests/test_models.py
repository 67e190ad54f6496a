"""Tests of fastcert.models: every registered architecture builds, has the BN layout its ``bn``
mode promises (Sec. 3.3.2 / Table 4 of Shi et al. 2021), and traces into auto_LiRPA 0.3 with
sound bounds."""
from __future__ import annotations

import hydra.utils
import pytest
import torch
from torch import nn

from fastcert import compat

compat.apply()
from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm  # noqa: E402

from fastcert.config import ConfigError, build_option, option_node, parameters  # noqa: E402
from fastcert.models import (  # noqa: E402
    BN_MODES,
    BasicResidualBlock,
    ResNeXtBlock,
    affine_layers,
)

from conftest import MODEL_NAMES, tiny_kwargs  # noqa: E402
from conftest import build_model as create_model  # noqa: E402


SHAPES = [(1, 8, 8), (3, 32, 32)]
ALLOWED = (
    nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, nn.Flatten,
    nn.Sequential, nn.Identity, BasicResidualBlock, ResNeXtBlock,
)


def _tiny(name: str, shape, bn: str, num_classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    model = create_model(name, shape, num_classes, bn=bn, **tiny_kwargs(name))
    if bn != "none":  # give BN non-trivial running statistics
        model.train()
        with torch.no_grad():
            model(torch.rand(8, *shape))
    return model.eval()


def _execution_order(model: nn.Module, shape) -> list[nn.Module]:
    """Leaf modules in the order forward() runs them (via forward hooks)."""
    order: list[nn.Module] = []
    hooks = [
        m.register_forward_hook(lambda mod, inp, out: order.append(mod))
        for m in model.modules()
        if not list(m.children())
    ]
    try:
        with torch.no_grad():
            model(torch.rand(2, *shape))
    finally:
        for h in hooks:
            h.remove()
    return order


# --------------------------------------------------------------------------- per-model checks


@pytest.mark.parametrize("bn", ["full", "none"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_builds_and_ibp_bounds_are_sound(name, shape, bn):
    model = _tiny(name, shape, bn)
    assert all(isinstance(m, ALLOWED) for m in model.modules()), {
        type(m).__name__ for m in model.modules() if not isinstance(m, ALLOWED)
    }
    assert not any(getattr(m, "inplace", False) for m in model.modules())
    torch.manual_seed(1)
    x = torch.rand(2, *shape)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 10)

    bounded = BoundedModule(model, torch.zeros(2, *shape))
    eps = 0.02
    lower, upper = bounded.compute_bounds(
        x=(BoundedTensor(x, PerturbationLpNorm(eps=eps)),), method="IBP"
    )
    assert lower.shape == upper.shape == (2, 10)
    assert torch.isfinite(lower).all() and torch.isfinite(upper).all()
    tol = 1e-4 * (1 + y.abs())
    assert (lower <= y + tol).all() and (y <= upper + tol).all()
    # Soundness under sampled perturbations (corners of the L-inf ball and interior points).
    with torch.no_grad():
        for i in range(16):
            noise = torch.sign(torch.randn_like(x)) if i % 2 else 2 * torch.rand_like(x) - 1
            y_pert = model(x + eps * noise)
            assert (lower <= y_pert + tol).all() and (y_pert <= upper + tol).all()


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_crown_bounds_sound_on_digits(name):
    """CROWN (full backward bounds) on 1x8x8 inputs. auto_LiRPA 0.3's default "patches" conv
    mode fails on grouped convolutions (ResNeXt, cardinality > 1: shape mismatch in
    ``clamp_mutiply_forward``); its "matrix" mode works, so grouped models use that."""
    shape = (1, 8, 8)
    model = _tiny(name, shape, "full")
    torch.manual_seed(2)
    x = torch.rand(2, *shape)
    eps = 0.05
    grouped = any(isinstance(m, nn.Conv2d) and m.groups > 1 for m in model.modules())
    opts = {"conv_mode": "matrix"} if grouped else {}
    bounded = BoundedModule(model, torch.zeros(2, *shape), bound_opts=opts)
    bx = BoundedTensor(x, PerturbationLpNorm(eps=eps))
    ibp_l, ibp_u = bounded.compute_bounds(x=(bx,), method="IBP")
    lower, upper = bounded.compute_bounds(x=(bx,), method="CROWN")
    with torch.no_grad():
        ys = torch.stack(
            [model(x + eps * torch.sign(torch.randn_like(x))) for _ in range(16)] + [model(x)]
        )
    tol = 1e-4 * (1 + ys.abs())
    assert (lower <= ys + tol).all() and (ys <= upper + tol).all()
    # CROWN is much tighter than IBP on an untrained net (Zhang et al. 2020, Sec. 3).
    assert (upper - lower).mean() < (ibp_u - ibp_l).mean()


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("bn", BN_MODES)
def test_bn_layout(name, bn):
    """full: BN after every conv and every hidden linear (Shi et al. 2021, Sec. 3.3.2); conv:
    after convs only (Table 4 "BN-Conv"); none: no BN. Never after the output layer."""
    shape = (1, 8, 8)
    model = _tiny(name, shape, bn)
    order = _execution_order(model, shape)
    affine = [m for m in order if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert isinstance(affine[-1], nn.Linear) and affine[-1].out_features == 10
    bns = [m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
    for layer in affine[:-1]:
        following = order[order.index(layer) + 1]
        is_conv = isinstance(layer, nn.Conv2d)
        expect_bn = bn == "full" or (bn == "conv" and is_conv)
        bn_type = nn.BatchNorm2d if is_conv else nn.BatchNorm1d
        assert isinstance(following, bn_type) == expect_bn, (layer, following)
    assert order[-1] is affine[-1]  # output layer is last: nothing (no BN) after it
    n_conv = sum(isinstance(m, nn.Conv2d) for m in affine)
    if bn == "full":
        assert len(bns) == len(affine) - 1  # one BN per hidden affine layer
    elif bn == "conv":
        assert len(bns) == n_conv
        assert not any(isinstance(m, nn.BatchNorm1d) for m in bns)
    else:
        assert not bns


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_affine_layers_in_forward_order(name):
    shape = (3, 32, 32)
    model = _tiny(name, shape, "full")
    order = _execution_order(model, shape)
    executed = [m for m in order if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert affine_layers(model) == executed
    assert len(set(map(id, executed))) == len(executed)


# ------------------------------------------------------------------ architectures as published


def _fc_fan_in(model: nn.Module) -> int:
    return next(m for m in model.modules() if isinstance(m, nn.Linear)).in_features


def test_cnn7_matches_shi2021():
    model = create_model("cnn7", (3, 32, 32), 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 64, 128, 128, 128]
    assert [c.stride[0] for c in convs] == [1, 1, 2, 1, 1]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(32768, 512), (512, 10)]
    # the fan-ins of thesis Table 3.1: 27, 576, 1152, 32768
    assert {m.weight[0].numel() for m in affine_layers(model)} >= {27, 576, 1152, 32768}
    tiny = create_model("cnn7", (3, 32, 32), 10, width=0.125)
    channels = [c.out_channels for c in tiny.modules() if isinstance(c, nn.Conv2d)]
    assert channels == [8, 8, 16, 16, 16]
    assert _fc_fan_in(tiny) == 16 * 16 * 16
    assert [m.out_features for m in tiny.modules() if isinstance(m, nn.Linear)] == [64, 10]


@pytest.mark.parametrize(
    "shape,fan_in",
    [((1, 28, 28), 128 * 14 * 14), ((3, 32, 32), 128 * 16 * 16), ((3, 64, 64), 128 * 32 * 32),
     ((1, 8, 8), 128 * 4 * 4)],
)
def test_fc_fan_in_follows_input_shape(shape, fan_in):
    model = create_model("cnn7", shape, 200 if shape[1] == 64 else 10, width=1.0)
    assert _fc_fan_in(model) == fan_in
    with torch.no_grad():
        assert model.eval()(torch.rand(2, *shape)).shape == (2, 200 if shape[1] == 64 else 10)


@pytest.mark.parametrize("name", ["wide_resnet", "resnext"])
def test_residual_defaults_have_cnn7_fc_fan_in(name):
    model = create_model(name, (3, 32, 32), 10)
    assert _fc_fan_in(model) == 32768
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [m.out_features for m in linears] == [512, 10]


def test_resnext_uses_grouped_convs():
    model = create_model("resnext", (3, 32, 32), 10, cardinality=4, bottleneck_width=2,
                         stem_width=4, fc_width=8)
    grouped = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert len(grouped) == 3 and all(m.groups == 4 for m in grouped)


def test_dm_models_match_gowal2018():
    small = create_model("dm_small", (1, 28, 28), 10, bn="none")
    assert [(c.out_channels, c.kernel_size[0], c.stride[0]) for c in affine_layers(small)[:2]] == [
        (16, 4, 2), (32, 4, 1)]
    assert [m.out_features for m in affine_layers(small)[2:]] == [100, 10]
    medium = create_model("dm_medium", (3, 32, 32), 10, bn="none")
    assert [(c.out_channels, c.kernel_size[0], c.stride[0]) for c in affine_layers(medium)[:4]] == [
        (32, 3, 1), (32, 4, 2), (64, 3, 1), (64, 4, 2)]
    assert [m.out_features for m in affine_layers(medium)[4:]] == [512, 512, 10]
    large = create_model("dm_large", (3, 32, 32), 10, bn="none")
    assert [(c.out_channels, c.kernel_size[0], c.stride[0]) for c in affine_layers(large)[:5]] == [
        (64, 3, 1), (64, 3, 1), (128, 3, 2), (128, 3, 1), (128, 3, 1)]
    assert [m.out_features for m in affine_layers(large)[5:]] == [512, 10]


def test_mlp_widths():
    model = create_model("mlp", (1, 8, 8), 10, bn="none", widths=[32, 16, 8])
    assert [(m.in_features, m.out_features) for m in affine_layers(model)] == [
        (64, 32), (32, 16), (16, 8), (8, 10)]


# ----------------------------------------------------------------------- configs


def test_unknown_name_lists_options():
    with pytest.raises(ConfigError) as info:
        build_option("model", "resnet9000")
    for name in MODEL_NAMES:
        assert name in str(info.value)


def test_unknown_option_and_bad_values():
    with pytest.raises(ConfigError, match="model.widen_factor is not a key of model"):
        create_model("cnn7", (3, 32, 32), 10, widen_factor=2)
    with pytest.raises(ValueError, match="bn"):
        create_model("cnn7", (3, 32, 32), 10, bn="fc")
    with pytest.raises(ValueError, match="input_shape"):
        create_model("cnn7", (32, 32), 10)
    with pytest.raises(ValueError, match="too small"):
        create_model("dm_small", (1, 2, 2), 10)


def test_model_attributes():
    model = create_model("cnn_small", [1, 8, 8], 10, bn="conv")
    assert model.input_shape == (1, 8, 8) and model.num_classes == 10
    assert model.bn == "conv" and model.arch == "cnn_small"


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_conf_model_file_sets_every_option_of_its_builder(name):
    """conf/model/<name>.yaml names its builder and sets each of its options to the builder's
    default (the file documents the defaults; nothing hides in code)."""
    node = option_node("model", name)
    assert node["name"] == name and node["bn"] in BN_MODES
    builder = hydra.utils.get_object(node["_target_"])
    params = {k: d for k, (_, d) in parameters(builder).items()
              if k not in ("input_shape", "num_classes")}
    kwargs = {k: v for k, v in node.items() if k not in ("name", "_target_")}
    assert set(kwargs) == set(params), name
    for key, value in kwargs.items():
        default = params[key]
        assert (list(default) if isinstance(default, tuple) else default) == value, (name, key)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_conf_options_build_the_model(name):
    """As the pipeline builds it: the config node, shapes given as lists."""
    model = build_option("model", name, tiny_kwargs(name), input_shape=[1, 8, 8], num_classes=10)
    assert model.bn == "full" and model.input_shape == (1, 8, 8)
    with torch.no_grad():
        assert model.eval()(torch.rand(2, 1, 8, 8)).shape == (2, 10)
