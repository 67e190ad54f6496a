"""Propagation tightness (Mao et al., ICLR 2024, "Understanding certified training with
interval bound propagation"; code: eth-sri/ibp-propagation-tightness, ``PI_functions.py``).

τ = size of the optimal box / size of the layer-wise (IBP) box of the output. For a ReLU
network at input x both are taken for its *locally linear* network, the one with x's
activation pattern D_i = diag(1[h_i(x) > 0]) (BatchNorm in eval mode is affine and folds
into the weights). With r the half-width of the (clipped) input box and the output taken as
the margins C·f (C the specification matrix of :func:`fastcert.bounds.margin_spec`)::

    optimal radius     |J_x| r               J_x = C W_L D_{L-1} W_{L-1} … D_1 W_1, the
                                             Jacobian of the margins at x;
    layer-wise radius  |C W_L| D_{L-1} |W_{L-1}| … D_1 |W_1| r   (IBP's propagation, with
                                             the final layer elided into C as IBP does);
    τ_j = (|J_x| r)_j / (layer-wise r)_j  ∈ (0, 1]   per margin j (|AB| ≤ |A||B| entrywise).

Residual blocks propagate the radius through both branches and add (as IBP does). τ → 1
means IBP is nearly exact; on CIFAR-10 CNN-7 at 2/255 and 8/255 the authors measure τ ≈
0.001 / 0.007 after PGD training, 0.18 / 0.95 after SABR and 0.80 / 0.98 after IBP (the table
of Y. Mao's 2024 talk "Training Certifiably Robust Neural Networks"). Both radii are floored at
1e-8 before the division, as in the authors' code (a fully dead network has τ = 1).

Everything runs on the plain ``nn.Module`` in eval mode and restores its mode; the gradients
are taken with respect to the input only, so no parameter gradient, BatchNorm statistic or
random number generator is touched.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.func import functional_call

from fastcert.bounds import margin_spec
from fastcert.models import affine_layers

_FLOOR = 1e-8
#: Held-out examples on which a run measures the propagation tightness after each epoch.
PROBE_EXAMPLES = 64


class _Pattern:
    """Forward hooks on every ReLU: record 1[input > 0] (``record``), or replace the output
    by input·mask (``apply``: the locally linear network's D)."""

    def __init__(self, model: nn.Module):
        self.masks: dict[int, list[torch.Tensor]] = {}
        self.calls: dict[int, int] = {}
        self.mode = "record"
        self.handles = [m.register_forward_hook(self) for m in model.modules()
                        if isinstance(m, nn.ReLU)]

    def __call__(self, module, inputs, output):
        key = id(module)
        if self.mode == "record":
            self.masks.setdefault(key, []).append(inputs[0] > 0)
            return None
        i = self.calls.get(key, 0)
        self.calls[key] = i + 1
        return inputs[0] * self.masks[key][i]

    def remove(self):
        for h in self.handles:
            h.remove()


def _abs_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers of the radius network: |W| for convolutions and linear layers,
    |γ| for BatchNorm, zero biases and zero running means (eval-mode BatchNorm then maps a
    radius r to |γ|/sqrt(var + eps)·r)."""
    state = {}
    for prefix, module in model.named_modules():
        own = dict(module.named_parameters(recurse=False))
        own.update(dict(module.named_buffers(recurse=False)))
        if not own:
            continue
        if not isinstance(module, (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm)):
            raise TypeError(f"tightness: no radius rule for {type(module).__name__} "
                            f"({prefix}); supported: Conv2d, Linear, BatchNorm")
        for name, t in own.items():
            key = f"{prefix}.{name}" if prefix else name
            if name in ("weight",):
                state[key] = t.detach().abs()
            elif name in ("bias", "running_mean"):
                state[key] = torch.zeros_like(t)
            else:
                state[key] = t.detach()
    return state


def propagation_tightness(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                          lower: torch.Tensor, upper: torch.Tensor,
                          num_classes: int) -> torch.Tensor:
    """τ (B, K-1): per example and margin y - j, optimal over layer-wise output radius of the
    locally linear network at ``x`` over the box [lower, upper] (see the module docstring)."""
    was_training = model.training
    model.eval()
    output = affine_layers(model)[-1]
    if not isinstance(output, nn.Linear) or output.out_features != num_classes:
        raise TypeError("tightness: the model's last affine layer must be the output Linear")
    spec = margin_spec(y, num_classes)
    radius = (upper - lower) / 2
    pattern = _Pattern(model)
    captured = {}
    handle = output.register_forward_hook(lambda m, i, o: captured.update(h=i[0]))
    try:
        with torch.enable_grad():
            xg = x.detach().clone().requires_grad_(True)
            margins = torch.einsum("bjk,bk->bj", spec, model(xg))
            optimal = []
            for j in range(num_classes - 1):
                (grad,) = torch.autograd.grad(margins[:, j].sum(), xg,
                                              retain_graph=j < num_classes - 2)
                optimal.append((grad.abs() * radius).flatten(1).sum(1))
        optimal = torch.stack(optimal, 1)
        pattern.mode = "apply"
        with torch.no_grad():
            functional_call(model, _abs_state(model), (radius.detach(),))
            elided = torch.einsum("bjk,ki->bji", spec, output.weight.detach()).abs()
            layerwise = torch.einsum("bji,bi->bj", elided, captured["h"])
    finally:
        handle.remove()
        pattern.remove()
        model.train(was_training)
    return optimal.detach().clamp_min(_FLOOR) / layerwise.clamp_min(_FLOOR)


def mean_tightness(model: nn.Module, loader, box_fn, eps: float, num_classes: int,
                   device: torch.device | str = "cpu") -> float:
    """Mean τ over every example and margin of ``loader`` at radius ``eps`` (pixel units;
    ``box_fn(x, eps)`` gives the clipped box, e.g. ``DataBundle.eps_box``)."""
    total, count = 0.0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        tau = propagation_tightness(model, x, y, *box_fn(x, eps), num_classes)
        total += tau.sum().item()
        count += tau.numel()
    return total / max(count, 1)


@dataclass
class TightnessProbe:
    """τ on a fixed batch at a fixed radius, for the per-epoch hook of the training loop
    (``TrainSetup.epoch_metrics``): ``probe(net) -> {"tightness": mean τ}``."""

    x: torch.Tensor
    y: torch.Tensor
    lower: torch.Tensor
    upper: torch.Tensor

    @classmethod
    def on_held_out(cls, data, eps: float, device: torch.device,
                    n: int = PROBE_EXAMPLES) -> TightnessProbe:
        """The probe of a run (Mao et al. 2024's τ after each epoch): the first ``n`` examples
        of ``data``'s (a :class:`fastcert.data.DataBundle`) validation split, or of its test
        set where it has none, at radius ``eps``."""
        test_set = (data.test if data.val is None else data.val).dataset
        n = min(n, len(test_set))
        x = torch.stack([test_set[i][0] for i in range(n)]).to(device)
        y = torch.tensor([int(test_set[i][1]) for i in range(n)], device=device)
        return cls(x, y, *data.eps_box(x, eps))

    def __call__(self, net) -> dict[str, float]:
        tau = propagation_tightness(net.model, self.x, self.y, self.lower, self.upper,
                                    net.num_classes)
        return {"tightness": tau.mean().item()}


# ---------------------------------------------------------------- deep linear networks


def dln_box_radii(weights, radius: torch.Tensor | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Output half-widths of the optimal and of the layer-wise (IBP) box of a deep linear
    network f(x) = W_L … W_1 x over an input box of half-width ``radius`` (default: ones), as
    in Sec. 3 of Mao et al. 2024 (ICLR; "Understanding certified training with interval bound
    propagation"):

        optimal     |W_L W_{L-1} … W_1| r
        layer-wise  |W_L| |W_{L-1}| … |W_1| r

    ``weights`` lists W_1 … W_L (each (n_k, n_{k-1}), applied first to last). Both are
    computed right to left, one matrix-vector product per layer for the layer-wise radius."""
    weights = list(weights)
    if not weights:
        raise ValueError("dln_box_radii: no weight matrices")
    r = weights[0].new_ones(weights[0].shape[1]) if radius is None else radius
    product = weights[0]
    layerwise = weights[0].abs() @ r
    for w in weights[1:]:
        product = w @ product
        layerwise = w.abs() @ layerwise
    return product.abs() @ r, layerwise


def dln_tightness(weights, radius: torch.Tensor | None = None) -> torch.Tensor:
    """τ per output of a deep linear network: |W_L…W_1| r / (|W_L|…|W_1| r) (Mao et al. 2024,
    Def. of propagation tightness specialised to DLNs), with the radii floored at 1e-8 as
    :func:`propagation_tightness` does. τ = 1 for every output iff the network is
    propagation invariant (IBP's box is the optimal one)."""
    optimal, layerwise = dln_box_radii(weights, radius)
    return optimal.clamp_min(_FLOOR) / layerwise.clamp_min(_FLOOR)


def two_layer_invariant(w1: torch.Tensor, w2: torch.Tensor) -> bool:
    """The sign condition of Mao et al. 2024 (Theorem on two-layer DLNs; the talk's slide
    "Propagation Invariance"): f = W2 W1 is propagation invariant iff for every output i and
    input j the products W2_ik·W1_kj are ≥ 0 for all k or ≤ 0 for all k."""
    terms = w2.unsqueeze(2) * w1.unsqueeze(0)  # (i, k, j): W2_ik · W1_kj
    return bool(((terms >= 0).all(1) | (terms <= 0).all(1)).all())
