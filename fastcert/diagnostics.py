"""Diagnostics shared by the certify command and the plots: run records, model sizes, and the
bound explosion of Fig. 1 of Shi et al. 2021.

Bound explosion (Shi et al. 2021, Sec. 3.2.1, Fig. 1). For the interval bounds
[h̲_i, h̄_i] of the pre-activation h_i of ReLU layer i, IBP propagates the widths
Δ_i = h̄_i - h̲_i as Δ_i = |W_i| δ_{i-1} (Eq. 4), δ_{i-1} the width after the ReLU, and at
initialisation E(Δ_i)/E(Δ_{i-1}) = (n_i/2) E|W_i| (Definition 1, Eq. 6; n_i the fan-in). The
paper estimates E(Δ_i) by the mean over a batch, Ê(Δ_i), and plots log Ê(Δ_i) per layer of an
untrained CNN whose classification layer is omitted. :func:`bound_explosion` does the same with
auto_LiRPA's IBP (through :class:`fastcert.bounds.BoundedNet`), once per initialiser of
:func:`fastcert.config.options` of the ``init`` group; Δ_0 is the width of the input box.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fastcert.bounds import BoundedNet
from fastcert.config import build_option, options
from fastcert.train import read_metrics

# --------------------------------------------------------------------------- run records


@dataclass
class RunRecord:
    """What a training run left on disk (see :func:`fastcert.pipeline.run`)."""

    path: Path
    metrics: list[dict] = field(default_factory=list)  # metrics.jsonl, one dict per epoch
    results: dict | None = None                         # results.json, None if absent

    @property
    def label(self) -> str:
        """``method-model-data-sSEED`` from results.json, else the directory name."""
        r = self.results or {}
        if all(k in r for k in ("method", "model", "data", "seed")):
            return f"{r['method']}-{r['model']}-{r['data']}-s{r['seed']}"
        return self.path.name


def read_run(run_dir: str | Path) -> RunRecord:
    """Load ``metrics.jsonl`` and ``results.json`` of a run directory."""
    run_dir = Path(run_dir)
    results_path = run_dir / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else None
    return RunRecord(run_dir, read_metrics(run_dir / "metrics.jsonl"), results)


def find_runs(path: str | Path) -> list[Path]:
    """``path`` itself when it holds a run (metrics.jsonl or results.json), else the run
    directories below it (a Hydra multirun folder ``multirun/DATE/TIME/{0,1,...}``), sorted."""
    path = Path(path)
    if (path / "metrics.jsonl").is_file() or (path / "results.json").is_file():
        return [path]
    found = {p.parent for name in ("metrics.jsonl", "results.json") for p in path.rglob(name)}
    return sorted(found)


def series(metrics: list[dict], key: str) -> tuple[list[int], list]:
    """(epochs, values) of ``key`` over the records that have it (not None)."""
    rows = [(r["epoch"], r[key]) for r in metrics if r.get(key) is not None]
    return [e for e, _ in rows], [v for _, v in rows]


# --------------------------------------------------------------------------- model sizes


def relu_sizes(model: nn.Module, input_shape) -> list[int]:
    """Number of neurons n_i entering each ``nn.ReLU`` module of ``model`` (per example), in
    the order the ReLUs run, from one forward pass of a dummy batch of 2 in eval mode."""
    sizes: list[int] = []
    hooks = [m.register_forward_hook(lambda _m, inp, _out: sizes.append(inp[0][0].numel()))
             for m in model.modules() if isinstance(m, nn.ReLU)]
    was_training = model.training
    try:
        model.eval()
        device = next(model.parameters()).device
        with torch.no_grad():
            model(torch.zeros(2, *input_shape, device=device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return sizes


def crown_cost(relu_neurons: list[int], input_dim: int, num_classes: int, batch: int) -> int:
    """Size estimate (float32 entries) of full CROWN on a batch:

        cost = B · (Σ_i n_i + K) · D,   D = max(d_in, max_i n_i).

    CROWN (Zhang et al. 2018) bounds every ReLU input (Σ_i n_i neurons) and the K outputs by
    backward linear propagation; each bounded neuron carries a linear coefficient row over
    a layer of at most D units, per example. On this repository's CPU measurements the peak
    resident memory was about 2.7 bytes per unit of cost (cnn_small on 8×8 digits: B=128 →
    1.1 GB, B=512 → 2.8 GB) and the run time about 40 s per 10⁹, so 4·cost bytes is a
    conservative memory estimate. IBP and CROWN-IBP cost O(B·(Σ_i n_i + K)) and
    O(B·K·D) and are never skipped.
    """
    d = max([int(input_dim)] + [int(n) for n in relu_neurons])
    return int(batch) * (sum(int(n) for n in relu_neurons) + int(num_classes)) * d


# --------------------------------------------------------------------------- bound explosion


def _drop_classifier(model: nn.Module) -> nn.Module:
    """The model without its last ``nn.Linear`` (the classification layer), as in Fig. 1 of
    Shi et al. 2021. Works for the ``nn.Sequential`` models of :mod:`fastcert.models`."""
    if not isinstance(model, nn.Sequential) or not isinstance(model[-1], nn.Linear):
        raise ValueError("bound_explosion needs a feed-forward nn.Sequential model ending in "
                         "its classification Linear layer (e.g. cnn7, dm_large, mlp)")
    return nn.Sequential(*list(model.children())[:-1])


@torch.no_grad()
def bound_explosion(model: str = "cnn7", inits=None, input_shape=(3, 32, 32), width=1.0,
                    bn: str = "none", eps: float = 8 / 255, batch: int = 8, seed: int = 0,
                    inputs: torch.Tensor | None = None, **model_kwargs) -> dict:
    """Ê(Δ_i) per layer of an untrained ``model`` under each initialiser (Fig. 1 of Shi et al.
    2021; see the module docstring).

    The network is ``conf/model/<model>.yaml`` with ``bn``, ``width`` and ``model_kwargs``
    for inputs of ``input_shape`` and 10 classes, the classification layer removed, initialised
    by each ``conf/init/<init>.yaml`` (``seed``; ``default`` is PyTorch's own init drawn after
    ``torch.manual_seed(seed)`` inside ``fork_rng``, so the global RNG is untouched). Inputs
    are ``inputs`` (pixels in [0, 1]) or ``batch`` images drawn uniformly from
    [0, 1]^input_shape with ``seed``; the box is
    [max(x - ε, 0), min(x + ε, 1)] (pixel units, no normalisation), so Δ_0 ≈ 2ε. IBP bounds
    come from auto_LiRPA (``compute_bounds(method="IBP")``), Δ_i = upper - lower of each
    ReLU's input from :meth:`BoundedNet.relu_bounds`, and Ê is the mean over the batch and the
    layer's neurons. Pass ``width=None`` for models without a width multiplier.

    Returns a dict::

        {"layers": ["input", "layer 1", ...],   # Δ_0, then one entry per ReLU layer
         "nodes": [None, <auto_LiRPA names of the ReLU inputs>...],
         "fan_in": [None, n_1, ...],        # fan-in of the affine layer feeding each ReLU
         "mean_width": {init: [Ê(Δ_0), Ê(Δ_1), ...]},
         "log_mean_width": {init: [ln Ê(Δ_0), ...]},
         "gain": {init: [Ê(Δ_i)/Ê(Δ_{i-1}) for i >= 1]},   # empirical difference gains
         "settings": {...}}
    """
    inits = options("init") if inits is None else list(inits)
    kwargs = dict(model_kwargs, bn=bn)
    if width is not None:
        kwargs["width"] = width
    if inputs is None:
        g = torch.Generator().manual_seed(int(seed))
        inputs = torch.rand(batch, *input_shape, generator=g)
    x = inputs.float()
    lower, upper = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    out: dict = {"layers": None, "nodes": None, "fan_in": None, "mean_width": {},
                 "log_mean_width": {}, "gain": {},
                 "settings": {"model": model, "input_shape": list(x.shape[1:]), "width": width,
                              "bn": bn, "eps": eps, "batch": int(x.shape[0]), "seed": seed,
                              **model_kwargs}}
    for name in inits:
        with torch.random.fork_rng(devices=[]):  # PyTorch's default init, seeded; global RNG kept
            torch.manual_seed(int(seed))
            full = build_option("model", model, kwargs, input_shape=tuple(x.shape[1:]),
                                num_classes=10)
        build_option("init", name)(full, seed=int(seed))
        body = _drop_classifier(full).eval()
        net = BoundedNet(body, x[:2], num_classes=10)
        net.eval()
        net.bounded.compute_bounds(x=(BoundedNet.perturbed(x, lower, upper),), method="IBP")
        relus = net.relu_bounds()
        widths = [float((upper - lower).mean())]
        widths += [float((r.upper - r.lower).mean()) for r in relus]
        out["mean_width"][name] = widths
        out["log_mean_width"][name] = [math.log(w) if w > 0 else float("-inf") for w in widths]
        out["gain"][name] = [b / a if a > 0 else float("nan") for a, b in zip(widths, widths[1:])]
        if out["layers"] is None:
            out["layers"] = ["input"] + [f"layer {i + 1}" for i in range(len(relus))]
            out["nodes"] = [None] + [r.name for r in relus]
            affine = [m for m in body.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
            fans = [int(m.weight[0].numel()) for m in affine]
            # one affine layer per ReLU in a feed-forward body; unknown otherwise (residuals)
            out["fan_in"] = [None] + (fans if len(fans) == len(relus) else [None] * len(relus))
    return out


__all__ = ["RunRecord", "read_run", "read_metrics", "find_runs", "series", "relu_sizes",
           "crown_cost", "bound_explosion"]
