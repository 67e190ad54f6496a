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

from fastcert.config import ConfigError, build_option, option_node, options, parameters  # noqa: E402
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
    [((1, 28, 28), 128 * 14 * 14), ((3, 32, 32), 128 * 16 * 16), ((3, 64, 64), 128 * 16 * 16),
     ((1, 8, 8), 128 * 4 * 4)],
)
def test_fc_fan_in_follows_input_shape(shape, fan_in):
    """The FC fan-in follows the input; on 64x64 the released ``cnn_7layer_bn_imagenet`` has a
    stride-2 fifth convolution, so it is 32768 there too (131072 with CIFAR's strides)."""
    model = create_model("cnn7", shape, 200 if shape[1] == 64 else 10, width=1.0)
    assert _fc_fan_in(model) == fan_in
    with torch.no_grad():
        assert model.eval()(torch.rand(2, *shape)).shape == (2, 200 if shape[1] == 64 else 10)


def test_tinyimagenet_variants_are_the_released_networks():
    """Shi et al.'s TinyImageNet networks (models/feedforward.py ``cnn_7layer_bn_imagenet``,
    ``wide_resnet_bn_imagenet64``, ``ResNeXt_bn_imagenet64``) are what the defaults build on
    64x64 inputs; explicit options still win."""
    with torch.device("meta"):
        cnn = create_model("cnn7", (3, 64, 64), 200)
        wrn = create_model("wide_resnet", (3, 64, 64), 200)
        rx = create_model("resnext", (3, 64, 64), 200)
        rx_cifar_style = create_model("resnext", (3, 64, 64), 200, num_blocks=[1, 1, 1],
                                      bottleneck_width=32, stem_width=64)
    convs = [m for m in cnn.modules() if isinstance(m, nn.Conv2d)]
    assert [c.stride[0] for c in convs] == [1, 1, 2, 1, 2]
    assert [(m.in_features, m.out_features) for m in cnn.modules()
            if isinstance(m, nn.Linear)] == [(32768, 512), (512, 200)]
    layers = list(cnn)
    fc = next(i for i, m in enumerate(layers) if isinstance(m, nn.Linear))
    assert isinstance(layers[fc + 1], nn.BatchNorm1d)  # BN after the FC 512, as released
    blocks = [m for m in wrn.modules() if isinstance(m, BasicResidualBlock)]
    assert [b.conv2.out_channels for b in blocks] == [160, 320, 640]
    assert _fc_fan_in(wrn) == 640 * 16 * 16
    blocks = [m for m in rx.modules() if isinstance(m, ResNeXtBlock)]
    assert [b.out_channels for b in blocks] == [32, 32, 64, 64, 128, 128]
    assert [isinstance(b.shortcut, nn.Identity) for b in blocks] == [False, True] * 3
    assert next(m for m in rx.modules() if isinstance(m, nn.Conv2d)).out_channels == 16
    assert _fc_fan_in(rx) == 128 * 16 * 16
    assert len([m for m in rx_cifar_style.modules() if isinstance(m, ResNeXtBlock)]) == 3


def test_wide_resnet_constructor_draws_kaiming_fan_out_convs_as_released():
    """``wide_resnet_bn.py`` (MNIST/CIFAR) draws every conv weight from Kaiming-normal with
    fan_out: std = sqrt(2 / (c_out k^2)); ``wide_resnet_bn_imagenet64.py`` keeps PyTorch's
    default U(-1/sqrt(fan_in), 1/sqrt(fan_in)). Linear layers keep the default in both."""
    torch.manual_seed(0)
    cifar = create_model("wide_resnet", (3, 32, 32), 10)
    conv = cifar[3].conv2  # 128 -> 128, 3x3: fan_out 1152
    assert conv.weight.std().item() == pytest.approx((2 / 1152) ** 0.5, rel=0.02)
    torch.manual_seed(0)
    imagenet = create_model("wide_resnet", (3, 64, 64), 200, widen_factor=8)
    conv = imagenet[3].conv2  # same shape, default init: std = 1/sqrt(3 * fan_in)
    assert conv.weight.std().item() == pytest.approx((1 / (3 * 1152)) ** 0.5, rel=0.02)
    dense = next(m for m in cifar.modules() if isinstance(m, nn.Linear))
    assert dense.weight.abs().max().item() <= dense.in_features ** -0.5


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
    assert model.bn == option_node("model", name)["bn"] and model.input_shape == (1, 8, 8)
    with torch.no_grad():
        assert model.eval()(torch.rand(2, 1, 8, 8)).shape == (2, 10)


# ------------------------------------------------------------------ parameter counts

#: (input shape, classes) of each data set (fastcert.data; tests/test_data.py checks the loaders)
DATA_SHAPES = {"digits": ((1, 8, 8), 10), "mnist": ((1, 28, 28), 10),
               "fashion_mnist": ((1, 28, 28), 10), "cifar10": ((3, 32, 32), 10),
               "tinyimagenet": ((3, 64, 64), 200)}

#: Trainable parameters (weights, biases, BN γ/β; no buffers) of each conf/model option at its
#: defaults on each data set. cnn7, wide_resnet and resnext on mnist/cifar10/tinyimagenet are the
#: counts of the networks of Shi et al.'s released code (cnn_7layer_bn2, wide_resnet_8,
#: ResNeXt_2_32; cnn_7layer_bn_imagenet, wide_resnet_bn_imagenet64, ResNeXt_bn_imagenet64),
#: counted on its own model files. cnn_2layer/cnn_4layer/cnn_3layer_fixed on (fashion_)mnist
#: are those of CROWN-IBP's model_defs.py. The rest are
#: fastcert's own definitions, counted by hand from the layer shapes in their docstrings (e.g.
#: dm_small on MNIST: 272 + 32 + 8224 + 64 + 540900 + 200 + 1010).
PARAM_COUNTS = {
    "cnn7":             {"digits": 1_462_858, "mnist": 13_259_338, "cifar10": 17_192_650,
                         "tinyimagenet": 17_290_120},
    "wide_resnet":      {"digits": 5_818_954, "mnist": 17_615_434, "cifar10": 21_547_882,
                         "tinyimagenet": 91_424_776},
    "resnext":          {"digits": 1_881_226, "mnist": 13_677_706, "cifar10": 17_611_018,
                         "tinyimagenet": 16_981_960},
    "dm_small":         {"digits": 38_702, "mnist": 550_702, "cifar10": 730_414,
                         "tinyimagenet": 3_104_804},
    "dm_medium":        {"digits": 502_634, "mnist": 1_977_194, "cifar10": 2_469_290,
                         "tinyimagenet": 8_858_216},
    "dm_large":         {"digits": 1_462_858, "mnist": 13_259_338, "cifar10": 17_192_650,
                         "tinyimagenet": 67_621_768},
    "cnn_small":        {"digits": 42_090, "mnist": 410_730, "cifar10": 533_898,
                         "tinyimagenet": 2_119_112},
    "mlp":              {"digits": 86_026, "mnist": 270_346, "cifar10": 856_074,
                         "tinyimagenet": 3_264_200},
    "cnn_2layer":       {"digits": 6_102, "mnist": 52_182, "cifar10": 67_670,
                         "tinyimagenet": 288_788},
    "cnn_4layer":       {"digits": 78_438, "mnist": 170_598, "cifar10": 201_390,
                         "tinyimagenet": 643_436},
    "cnn_3layer_fixed": {"digits": 4_130, "mnist": 27_170, "cifar10": 34_922,
                         "tinyimagenet": 145_576},
    # Wang 2022's two-layer net: only the first layer (input size x m = 1000, no bias) trains
    "two_layer":        {"digits": 64_000, "mnist": 784_000, "cifar10": 3_072_000,
                         "tinyimagenet": 12_288_000},
}
for _counts in PARAM_COUNTS.values():
    _counts["fashion_mnist"] = _counts["mnist"]


def _count(name: str, data: str, **options) -> int:
    shape, classes = DATA_SHAPES[data]
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = create_model(name, shape, classes, **options)
    return sum(p.numel() for p in model.parameters())


def test_every_model_and_data_pair_has_a_count():
    """Every model on every data set with its own input shape (the two-class tasks
    ``*_2v5`` are their source's images with 2 classes)."""
    assert set(PARAM_COUNTS) == set(MODEL_NAMES)
    derived = {d for d in options("data")
               if option_node("data", d)["_target_"] == "fastcert.data.TwoClasses"}
    assert derived == {"digits_2v5", "mnist_2v5"}
    assert set(DATA_SHAPES) == set(options("data")) - derived


@pytest.mark.parametrize("data", sorted(DATA_SHAPES))
@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_parameter_counts(name, data):
    assert _count(name, data) == PARAM_COUNTS[name][data]


@pytest.mark.parametrize("data,bn,count", [
    ("mnist", "conv", 13_258_314), ("cifar10", "conv", 17_191_626),   # cnn_7layer_bn (Table 4)
    ("mnist", "none", 13_257_290), ("cifar10", "none", 17_190_602),   # cnn_7layer
])
def test_cnn7_bn_variants_match_the_released_ablation_models(data, bn, count):
    assert _count("cnn7", data, bn=bn) == count


def test_dm_large_without_bn_is_crown_ibps_ibp_large():
    """CROWN-IBP's model_defs_gowal.py IBP_large (config mnist_dm-large_0.4): 13,257,290."""
    assert _count("dm_large", "mnist", bn="none") == 13_257_290


def test_headline_command_builds_the_papers_resnext(compose, tiny_root):
    """``python -m fastcert.run model=resnext data=tinyimagenet`` builds ResNeXt_bn_imagenet64
    (through the whole pipeline: data → model → BoundedNet). The generated data set has 3
    classes, so the classifier differs from the paper's 200-class one by 197 rows."""
    import warnings

    from fastcert.pipeline import build
    from fastcert.settings import validate

    cfg = compose(["model=resnext", "data=tinyimagenet", f"data.root={tiny_root}",
                   "device=cpu", "data.num_workers=0", "eval.verifiers=[ibp]"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "3 classes, not 200"
        built = build(validate(cfg))
    model = built.net.model
    blocks = [m for m in model.modules() if isinstance(m, ResNeXtBlock)]
    assert [b.out_channels for b in blocks] == [32, 32, 64, 64, 128, 128]
    classes = built.data.num_classes
    assert sum(p.numel() for p in model.parameters()) == 16_981_960 - (200 - classes) * 513


def test_docs_list_the_parameter_counts():
    """The table of docs/papers/shi2021.md (model × digits, MNIST/Fashion-MNIST, CIFAR-10,
    TinyImageNet) is PARAM_COUNTS."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "papers" / "shi2021.md").read_text()
    section = text[text.index("## Models and their parameter counts"):]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"\| `(\w+)` \|(.*)\|$", line)
        if m and m.group(1) in PARAM_COUNTS:
            rows[m.group(1)] = [int(re.search(r"[\d,]+", cell.replace("*", "")).group()
                                    .replace(",", "")) for cell in m.group(2).split("|")]
    assert rows == {name: [c["digits"], c["mnist"], c["cifar10"], c["tinyimagenet"]]
                    for name, c in PARAM_COUNTS.items()}
