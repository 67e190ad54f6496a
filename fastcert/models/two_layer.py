"""The two-layer network of the IBP-convergence analysis (Wang 2022)."""
from __future__ import annotations

import torch
from torch import nn

from fastcert.models.base import bn_flags, model_builder, positive_int


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
    m = positive_int("m", m)
    _, bn_fc = bn_flags(bn)
    hidden = nn.Linear(input_shape[0] * input_shape[1] * input_shape[2], m, bias=False)
    with torch.no_grad():
        nn.init.normal_(hidden.weight)  # w_r ~ N(0, I)
    signs = torch.randint(0, 2, (num_classes, m)).float() * 2 - 1  # a_r ~ unif{±1}
    signs[0] = 0  # the reference logit
    layers: list[nn.Module] = [nn.Flatten(), hidden]
    if bn_fc:
        layers.append(nn.BatchNorm1d(m))
    head = FixedLinear(signs / m ** 0.5, torch.zeros(num_classes))
    return nn.Sequential(*layers, nn.ReLU(), head)
