"""One network state seen three ways (:class:`BoundedNet`): the plain module, its margin
BoundedModule and its loss-fusion BoundedModule, with tied BatchNorm buffers; and the network
cut in two (:class:`SplitNet`)."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastcert.bounds.choices import (
    Bound,
    BoundChoice,
    ReluBounds,
    compute_bounds,
    margin_spec,
    relu_bounds_of,
)
from fastcert.bounds.lirpa import auto_lirpa

if TYPE_CHECKING:
    from auto_LiRPA import BoundedModule, BoundedTensor
    from auto_LiRPA.operators import BoundExp


def _tie_buffers(bounded: BoundedModule, model: nn.Module, prefix: str = "") -> None:
    buffers = dict(model.named_buffers())
    for node in bounded.modules():
        if isinstance(node, auto_lirpa().BoundBuffers):
            name = node.ori_name
            if name.startswith(prefix):
                name = name[len(prefix):]
            if name in buffers:
                node._buffers["buffer"] = buffers[name]


def _output_layer_trains(model: nn.Module) -> bool:
    """Whether the last ``nn.Linear`` of ``model`` holds its weight and bias as parameters
    (not e.g. the buffers of :class:`fastcert.models.FixedLinear`)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return bool(linears) and all(isinstance(getattr(linears[-1], k), nn.Parameter)
                                 for k in ("weight", "bias"))


class _BatchStats:
    """A BatchNorm layer's forward with given batch statistics, in place of the layer's own:
    the training-mode formula (biased variance) as one affine map per channel,

        (x - mean)/sqrt(var + eps)·γ + β = x·s + t,   s = γ/sqrt(var + eps),  t = β - mean·s,

    computed by one fused pass (eval-mode ``F.batch_norm`` with statistics 0 and 1 and the
    affine pair (s, t), whose gradients flow on into mean, var, γ and β), the running
    statistics left alone. ``detached``: the statistics, γ and β as constants (an attack's
    pass, differentiated in its input only). Both modes compute the same values."""

    def __init__(self, bn: nn.Module, mean: torch.Tensor, var: torch.Tensor, eps: float,
                 detached: bool):
        self.bn, self.mean, self.var, self.eps, self.detached = bn, mean, var, eps, detached

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.rsqrt(self.var + self.eps)
        if self.bn.affine:
            weight, bias = self.bn.weight, self.bn.bias
            if self.detached:
                weight, bias = weight.detach(), bias.detach()
            scale = scale * weight
            shift = bias - self.mean * scale
        else:
            shift = -self.mean * scale
        return F.batch_norm(x, torch.zeros_like(scale), torch.ones_like(scale), scale, shift,
                            training=False, momentum=0.0, eps=0.0)


@dataclass
class SplitNet:
    """A network cut in two (:meth:`BoundedNet.split`): ``features`` and ``head`` are
    BoundedModules over ``model[:index]`` and ``model[index:]``; ``head_module`` is the plain
    head (the same layers), for attacks in the latent space."""

    features: BoundedModule
    head: BoundedModule
    head_module: nn.Sequential
    num_classes: int

    def latent_box(self, x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor):
        """The clean latent features of ``x`` and the IBP box [l, u] of the features over
        the input box (with their graph). In training mode the clean pass sets the feature
        extractor's BatchNorm statistics."""
        latent = self.features(BoundedNet.perturbed(x, lower, upper))
        lo, up = compute_bounds(self.features, Bound.IBP)
        return latent, lo, up

    def head_margin_bounds(self, latent: torch.Tensor, y: torch.Tensor, lo: torch.Tensor,
                           up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Clean logits (the head on ``latent``; in training mode this sets the head's
        BatchNorm statistics) and IBP lower bounds (B, K-1) of the margins over the latent
        box [lo, up]. IBP of the head on IBP's latent box is IBP of the whole network."""
        logits = self.head(BoundedNet.perturbed(latent, lo, up))
        lb, _ = compute_bounds(self.head, Bound.IBP, C=margin_spec(y, self.num_classes),
                               bound_upper=False)
        return logits, lb

    def relu_bounds(self) -> list[ReluBounds]:
        return relu_bounds_of(self.features) + relu_bounds_of(self.head)


class BoundedNet(nn.Module):
    """A classifier and its auto_LiRPA views, sharing parameters and BatchNorm buffers.

    Build it *after* moving the model to its device: ``BoundedNet(model.to(dev), example)``.
    """

    def __init__(self, model: nn.Module, example: torch.Tensor, num_classes: int,
                 bound_opts: dict | None = None):
        super().__init__()
        if example.shape[0] < 2:  # BatchNorm1d refuses a batch of 1 while tracing
            example = example.expand(2, *example.shape[1:])
        self.model = model
        self.num_classes = num_classes
        self._example = example.detach().clone()
        defaults = {"relu": "adaptive"}
        if any(isinstance(m, nn.Conv2d) and m.groups > 1 for m in model.modules()):
            # auto_LiRPA 0.3's default "patches" mode gets grouped convolutions wrong in full
            # CROWN (shape mismatch); the matrix mode is correct (ResNeXt, Xie et al. 2017).
            defaults["conv_mode"] = "matrix"
        self._bound_opts = {**defaults, **(bound_opts or {})}
        was_training = model.training
        model.eval()
        #: The ``BoundedModule`` over the classification margins (auto_LiRPA).
        self.bounded = auto_lirpa().BoundedModule(model, self._example, bound_opts=self._bound_opts,
                                     device=example.device)
        _tie_buffers(self.bounded, model)
        self._fused: BoundedModule | None = None
        self._splits: dict[int, SplitNet] = {}  # plain dict: not submodules (see split())
        self.train(was_training)

    # ---- views -------------------------------------------------------------------------
    @property
    def fused(self) -> BoundedModule:
        """Loss-fusion BoundedModule over CE(f(x), y) (Xu et al. 2020), built on first use."""
        if self._fused is None:
            labels = torch.zeros(self._example.shape[0], dtype=torch.long,
                                 device=self._example.device)
            was_training = self.model.training
            self.model.eval()
            wrapper = auto_lirpa().CrossEntropyWrapper(self.model).eval()
            opts = {**self._bound_opts, "loss_fusion": True}
            if not _output_layer_trains(self.model):
                # auto_LiRPA's IBP shortcut for the fused CE reads the output layer's weight and
                # bias as parameters (``.param``); a fixed layer (buffers) takes the general path
                opts["no_ibp_loss_fusion"] = True
            self._fused = auto_lirpa().BoundedModule(wrapper, (self._example, labels),
                                                     bound_opts=opts,
                                        device=self._example.device)
            _tie_buffers(self._fused, self.model, prefix="model.")
            self._fused.train(was_training)
            self.model.train(was_training)
        return self._fused

    def train(self, mode: bool = True):
        super().train(mode)
        self.bounded.train(mode)
        if self._fused is not None:
            self._fused.train(mode)
        for view in self._splits.values():
            view.features.train(mode)
            view.head.train(mode)
        return self

    def split(self, index: int) -> SplitNet:
        """The network cut before top-level layer ``index`` of its ``nn.Sequential``: a
        feature extractor ``model[:index]`` and a classifier head ``model[index:]``, each as a
        BoundedModule sharing parameters and BatchNorm buffers with ``model`` (the TAPS view
        of Mao et al. 2023). Built on first use and kept."""
        if index not in self._splits:
            if not isinstance(self.model, nn.Sequential):
                raise TypeError(f"splitting needs an nn.Sequential model, got "
                                f"{type(self.model).__name__}")
            if not 0 < index < len(self.model):
                raise ValueError(f"split index {index} outside 1..{len(self.model) - 1}")
            was_training = self.training
            features, head = self.model[:index].eval(), self.model[index:].eval()
            with torch.no_grad():
                latent = features(self._example)
            device = self._example.device
            fb = auto_lirpa().BoundedModule(features, self._example, bound_opts=self._bound_opts,
                               device=device)
            hb = auto_lirpa().BoundedModule(head, latent, bound_opts=self._bound_opts,
                                            device=device)
            _tie_buffers(fb, features)
            _tie_buffers(hb, head)
            self._splits[index] = SplitNet(fb, hb, head, self.num_classes)
            self.train(was_training)
        return self._splits[index]

    @contextlib.contextmanager
    def batch_norm_stats(self, view: BoundedModule | None = None,
                         detach: bool = False) -> Iterator[None]:
        """Within it, the plain model's BatchNorm layers normalise with the batch statistics
        of ``view``'s last forward pass in training mode (default: the margins view) and
        leave their running statistics alone.

        This is the convention of CTBench (Mao et al. 2024, README: "batch statistics will
        always be set based on clean input"): one clean forward pass sets the statistics, and
        adversarial points (PGD-AT's, MTL-IBP's, TAPS's latent pivots) are normalised with
        them instead of their own. The statistics keep their graph (gradients flow through
        them, as in auto_LiRPA's IBP) unless ``detach`` (then γ and β are constants too: an
        attack differentiates in its input only). Within the block each such layer's forward
        is :class:`_BatchStats`. Layers not traced by ``view`` and layers in eval mode are left
        as they are.
        """
        view = self.bounded if view is None else view
        stats = {}
        for node in view.modules():
            if (isinstance(node, auto_lirpa().BoundBatchNormalization) and node.training
                    and getattr(node, "current_mean", None) is not None):
                mean, var = node.current_mean, node.current_var
                if detach:
                    mean, var = mean.detach(), var.detach()
                stats[id(node.inputs[3].buffer)] = (mean, var, node.eps, detach)
        replaced = []  # (layer, its own instance forward: a data-parallel run's, an outer block's)
        try:
            for bn in self.model.modules():
                if (isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.training
                        and id(bn.running_mean) in stats):
                    replaced.append((bn, bn.__dict__.get("forward")))
                    bn.forward = _BatchStats(bn, *stats[id(bn.running_mean)])
            yield
        finally:
            for bn, previous in replaced:
                if previous is None:
                    del bn.forward
                else:
                    bn.forward = previous

    # ---- inputs ------------------------------------------------------------------------
    @staticmethod
    def perturbed(x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor) -> BoundedTensor:
        """x inside the L∞ box [lower, upper] (already clipped to the data range).

        For L∞ with explicit x_L/x_U auto_LiRPA bounds from the box alone and never reads
        ``eps``; it is the box's half-width as a tensor (no host-device synchronisation).
        """
        eps = (upper - lower).amax() / 2
        lirpa = auto_lirpa()
        return lirpa.BoundedTensor(x, lirpa.PerturbationLpNorm(norm=float("inf"), eps=eps,
                                                               x_L=lower, x_U=upper))

    # ---- margins -----------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Clean logits through the BoundedModule (the same graph the bounds use)."""
        return self.bounded(x)

    def margin_bounds(self, x: torch.Tensor, y: torch.Tensor, lower: torch.Tensor,
                      upper: torch.Tensor, bound: BoundChoice = Bound.IBP,
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Clean logits (B, K) and lower bounds (B, K-1) of the margins y - j over the box.

        One clean forward pass runs first (in training mode it sets the BatchNorm statistics
        from clean data, as Shi et al. 2021 Sec. 3.3.2 specify); the bounds reuse it.
        """
        C = margin_spec(y, self.num_classes)
        logits = self.bounded(self.perturbed(x, lower, upper))
        lb, _ = compute_bounds(self.bounded, bound, C=C, bound_upper=False)
        return logits, lb

    # ---- loss fusion -------------------------------------------------------------------
    def fused_ce(self, x: torch.Tensor, y: torch.Tensor, lower: torch.Tensor | None = None,
                 upper: torch.Tensor | None = None, bound: BoundChoice = Bound.IBP):
        """Natural CE and an upper bound of the worst-case CE via loss fusion.

        The wrapped graph computes s = Σ_j exp(f_j - f_y), so CE = log s; an upper bound on s
        over the box gives log s̄ >= max CE. Returns (natural CE per example, robust CE per
        example or None, clean logits).
        """
        fused = self.fused
        xin = x if lower is None else self.perturbed(x, lower, upper)
        s = fused(xin, y)
        # In loss-fusion mode auto_LiRPA's Exp subtracts a per-example shift (max_input) for
        # numerical stability: the graph returns Σ_j exp(f_j - f_y - shift).
        natural = (torch.log(s) + self._exp_node.max_input).squeeze(-1)
        logits = self._fused_logits()
        if lower is None:
            return natural, None, logits
        _, ub = compute_bounds(fused, bound, bound_lower=False)
        robust = (torch.log(ub) + self._exp_node.max_input).squeeze(-1)
        return natural, robust, logits

    @property
    def _exp_node(self) -> BoundExp:
        return next(n for n in self.fused.modules() if isinstance(n, auto_lirpa().BoundExp))

    def _fused_logits(self) -> torch.Tensor:
        # The graph is f(x) -> GatherElements(f, y) -> Sub -> Exp -> ReduceSum; the gather's
        # first input holds the clean logits of the forward pass just run.
        gather = next(n for n in self.fused.modules()
                      if isinstance(n, auto_lirpa().BoundGatherElements))
        return gather.inputs[0].forward_value.detach()

    # ---- diagnostics -------------------------------------------------------------------
    def relu_bounds(self, fused: bool = False) -> list[ReluBounds]:
        """Bounds of every ReLU's input from the last bound computation, in forward order.

        These are the intervals the robust loss already computed (IBP, or the IBP
        intermediate bounds of CROWN-IBP): the warmup regularisers reuse them, no second pass.
        """
        return relu_bounds_of(self.fused if fused else self.bounded)

    # ---- other relaxations ---------------------------------------------------------------
    def relaxed(self, relu: str) -> BoundedModule:
        """The margin BoundedModule with ReLU relaxation ``relu`` (auto_LiRPA 0.3's
        ``bound_opts['relu']``): ``adaptive`` (CROWN's default lower slope, 0 or 1; the view
        :attr:`bounded`) or ``same-slope`` (lower and upper line of slope x̄/(x̄-x̲), the band of
        Fast-Lin, Weng et al. 2018, and of the dual of Wong & Kolter 2018). Built on first use,
        sharing parameters and BatchNorm buffers with the other views, in the network's
        train/eval mode."""
        if relu == self._bound_opts.get("relu", "adaptive"):
            return self.bounded
        views = self.__dict__.setdefault("_relaxed", {})  # not a submodule: no state_dict entry
        if relu not in views:
            was_training = self.model.training
            self.model.eval()
            views[relu] = auto_lirpa().BoundedModule(self.model, self._example,
                                        bound_opts={**self._bound_opts, "relu": relu},
                                        device=self._example.device)
            _tie_buffers(views[relu], self.model)
            self.model.train(was_training)
        views[relu].train(self.model.training)  # auto_LiRPA 0.3's train() returns None
        return views[relu]


RELAXATIONS = ("adaptive", "same-slope")
