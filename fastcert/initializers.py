"""Weight initialisations and their IBP *difference gain* (Shi et al. 2021, Sec. 3.2.1 / 3.3.1).

For an affine layer with fan-in ``n`` (``k*k*c_in/groups`` for a convolution, i.e.
``weight[0].numel()``), IBP propagates interval widths as ``Delta_i = |W_i| delta_{i-1}``
(Eq. 4 of Shi et al. 2021) and, at initialisation, ``E(Delta_i)/E(Delta_{i-1}) = (n/2) E|W_i|``
(Definition 1, Eq. 5-6): the *difference gain*. The IBP initialisation N(0, sigma^2) with
``sigma = sqrt(2*pi)/n`` (Sec. 3.3.1) makes it exactly 1.

The baselines follow the **fan-in-only** variances that reproduce the printed numbers of the
thesis' Table 3.1 (= Table 5 of Shi et al. 2021: at n = 27 the rows read 1.30, 2.07, 3.18, 2.93,
the closed forms below), not PyTorch's ``xavier_*`` (which average fan-in and fan-out):

===================  ==============  =============================  =============================
``init=``            class           distribution                   gain (closed form)
===================  ==============  =============================  =============================
``xavier_uniform``   XavierUniform   U(-1/sqrt(n), 1/sqrt(n)) [1]_  sqrt(n)/4
``xavier_normal``    XavierNormal    N(0, 1/n)                      sqrt(n/(2*pi))
``kaiming_uniform``  KaimingUniform  U(-sqrt(6/n), sqrt(6/n))       sqrt(6n)/4
``kaiming_normal``   KaimingNormal   N(0, 2/n)                      sqrt(n/pi)
``orthogonal``       Orthogonal      orthogonal [2]_                see :meth:`Orthogonal.gain`
``ibp``              IBPInit         N(0, 2*pi/n^2)                 1
``default``          DefaultInit     PyTorch's own, untouched
===================  ==============  =============================  =============================

.. [1] PyTorch's default layer init for Linear/Conv.
.. [2] ``torch.nn.init.orthogonal_`` on the (fan_out, fan_in) matrix, gain 1.

The baselines (the Table 3.1 rows) fill every ``Conv2d``/``Linear`` weight and set biases to 0.
``ibp`` does what Shi et al.'s released code does (see :class:`IBPInit`): output layer and
biases keep PyTorch's init, and the layers reading a residual block's output are halved.
"""
from __future__ import annotations

import math
import operator

import torch
from torch import nn

from fastcert.models import affine_layers

__all__ = [
    "Init",
    "DefaultInit",
    "IBPInit",
    "XavierUniform",
    "XavierNormal",
    "KaimingUniform",
    "KaimingNormal",
    "Orthogonal",
    "residual_readers",
]


def _fan_in(weight: torch.Tensor) -> int:
    # weight[0] is one output unit: (c_in/groups, k, k) for a conv, (in_features,) for Linear.
    return weight[0].numel()


class Init:
    """An initialisation: ``init(model, seed)`` fills every ``Conv2d`` / ``Linear`` weight with
    :meth:`fill` and zeroes the biases. ``conf/init/<name>.yaml`` names the class
    (``_target_: fastcert.initializers.<Class>``). :meth:`gain` is the closed-form difference
    gain (n/2)·E|W| (Eq. 6 of Shi et al. 2021) for fan-in ``n``."""

    def fill(self, weight: torch.Tensor, generator: torch.Generator | None) -> None:
        raise NotImplementedError  # pragma: no cover - every subclass defines it

    def gain(self, fan_in: int, fan_out: int | None = None) -> float:
        raise NotImplementedError  # pragma: no cover

    @torch.no_grad()
    def __call__(self, model: nn.Module, seed: int | None = None) -> nn.Module:
        """Initialise ``model`` in place; ``seed`` makes it reproducible without touching the
        global RNG. Returns ``model``."""
        generator = _generator(seed)
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                _fill(module.weight, self.fill, generator)
                if module.bias is not None:
                    module.bias.zero_()
        return model

    def __repr__(self) -> str:
        return type(self).__name__


class DefaultInit(Init):
    """PyTorch's own init, left untouched: ``kaiming_uniform_(a=sqrt(5))`` = U(-1/√n, 1/√n)
    (:meth:`fill` samples it so :func:`fastcert.gain.difference_gain` can measure PyTorch's
    default)."""

    def fill(self, weight, generator):
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)

    def gain(self, fan_in, fan_out=None):
        return math.sqrt(fan_in) / 4

    def __call__(self, model, seed=None):
        return model


class IBPInit(Init):
    """IBP initialisation, Sec. 3.3.1 of Shi et al. 2021: N(0, σ²), σ = √(2π)/n, so that
    (n/2)·E|W| = (n/2)·√(2/π)·σ = 1; calibrated for residual blocks (App. A.3) as the released
    code (``manual_init.ibp_init`` of shizhouxing/Fast-Certified-Robust-Training) does it:

    1. every ``Conv2d``/``Linear`` weight is drawn from N(0, 2π/n²) **except the output
       layer's** (the code re-initialises every ``weight`` parameter but the last one
       registered, which is the classifier in all its models; it keeps PyTorch's default
       U(-1/√n, 1/√n));
    2. **biases are not touched** (PyTorch's default U(-1/√n, 1/√n); BN keeps γ=1, β=0);
    3. **residual calibration**: the weight of every ``Conv2d``/``Linear`` whose input is
       computed from a residual addition, i.e. that reads ``ReLU(main(x) + shortcut(x))`` (the
       next block's first convolution and its 1x1 shortcut convolution), is multiplied by
       :attr:`residual_scale` = 1/2 (the code's ``node.inputs[1].param.data /= 2`` for every
       BoundConv/BoundLinear whose input node's first input is a BoundAdd; see
       :func:`residual_readers`). Nothing inside the block producing the sum is scaled, and the
       first block (it reads the stem) and the FC layer after the last block (it reads Flatten)
       are not either.

    Why 1/2: a block sums two branches each of difference gain 1, so the widths of the sum are
    twice those of its input; the layers reading it, at half scale, bring a block's difference
    gain back to 1 (e.g. main branch ½·1 + shortcut ½ = 1).
    :func:`fastcert.gain.residual_block_gain` measures it (``python -m experiments.init_gain``).
    """

    residual_scale = 0.5

    def fill(self, weight, generator):
        weight.normal_(0.0, math.sqrt(2 * math.pi) / _fan_in(weight), generator=generator)

    def gain(self, fan_in, fan_out=None):
        return 1.0

    @torch.no_grad()
    def __call__(self, model, seed=None):
        generator = _generator(seed)
        for layer in affine_layers(model)[:-1]:  # registration order: the output layer is last
            _fill(layer.weight, self.fill, generator)
        for layer in residual_readers(model):
            layer.weight.mul_(self.residual_scale)
        return model


class XavierUniform(Init):
    """U(-1/√n, 1/√n): the "Xavier (uniform)" row of thesis Table 3.1 (= PyTorch's default
    Linear/Conv init), difference gain √n/4."""

    def fill(self, weight, generator):
        bound = 1.0 / math.sqrt(_fan_in(weight))
        weight.uniform_(-bound, bound, generator=generator)

    def gain(self, fan_in, fan_out=None):
        return math.sqrt(fan_in) / 4


class XavierNormal(Init):
    """N(0, 1/n): "Xavier (Gaussian)" of thesis Table 3.1, difference gain √(n/2π)."""

    def fill(self, weight, generator):
        weight.normal_(0.0, 1.0 / math.sqrt(_fan_in(weight)), generator=generator)

    def gain(self, fan_in, fan_out=None):
        return math.sqrt(fan_in / (2 * math.pi))


class KaimingUniform(Init):
    """U(-√(6/n), √(6/n)): "Kaiming (uniform)" of thesis Table 3.1 (He et al. 2015, ReLU
    gain, fan-in mode), difference gain √(6n)/4."""

    def fill(self, weight, generator):
        bound = math.sqrt(6.0 / _fan_in(weight))
        weight.uniform_(-bound, bound, generator=generator)

    def gain(self, fan_in, fan_out=None):
        return math.sqrt(6 * fan_in) / 4


class KaimingNormal(Init):
    """N(0, 2/n): "Kaiming (Gaussian)" of thesis Table 3.1, difference gain √(n/π)."""

    def fill(self, weight, generator):
        weight.normal_(0.0, math.sqrt(2.0 / _fan_in(weight)), generator=generator)

    def gain(self, fan_in, fan_out=None):
        return math.sqrt(fan_in / math.pi)


class Orthogonal(Init):
    """``torch.nn.init.orthogonal_`` (Saxe et al. 2013), gain 1, on the weight viewed as a
    (fan_out, fan_in) matrix: orthonormal rows if fan_out <= fan_in, else orthonormal columns.

    Closed-form gain (ours; the thesis omits it as "non-trivial"): each row of a Haar
    orthonormal frame (fan_out <= fan_in) is uniform on S^{n-1}, whose coordinates have
    E|x_1| = Γ(n/2) / (√π Γ((n+1)/2)); with fan_out > fan_in the columns are uniform on
    S^{fan_out-1} instead."""

    def fill(self, weight, generator):
        flat = weight.view(weight.shape[0], -1)
        nn.init.orthogonal_(flat, gain=1.0, generator=generator)

    def gain(self, fan_in, fan_out=None):
        n = int(fan_in)
        m = n if fan_out is None or fan_out <= n else int(fan_out)
        e_abs = math.exp(math.lgamma(m / 2) - math.lgamma((m + 1) / 2)) / math.sqrt(math.pi)
        return n / 2 * e_abs


_ADDITIONS = (operator.add, operator.iadd, torch.add)


def _is_addition(node) -> bool:
    return ((node.op == "call_function" and node.target in _ADDITIONS)
            or (node.op == "call_method" and node.target in ("add", "add_")))


def residual_readers(model: nn.Module) -> list[nn.Module]:
    """The ``Conv2d``/``Linear`` layers of ``model`` whose input is computed from a residual
    addition: the node feeding the layer has an addition as its first input (in fastcert's
    models, the layer reads ``ReLU(main(x) + shortcut(x))``, the output of a residual block).

    This is the rule of Shi et al.'s ``manual_init.ibp_init``, applied on ``torch.fx``'s graph
    of the model instead of auto_LiRPA's: a layer reading Flatten(ReLU(add)) is not a reader.
    Returned in graph order, each layer once."""
    import torch.fx

    graph = torch.fx.symbolic_trace(model).graph
    modules = dict(model.named_modules())
    readers: list[nn.Module] = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], (nn.Conv2d, nn.Linear)):
            continue
        source = node.args[0]
        first = source.args[0] if isinstance(source, torch.fx.Node) and source.args else None
        layer = modules[node.target]
        if isinstance(first, torch.fx.Node) and _is_addition(first) and layer not in readers:
            readers.append(layer)
    return readers


def _generator(seed: int | None) -> torch.Generator | None:
    if seed is None:
        return None
    return torch.Generator().manual_seed(int(seed))


def _fill(weight: torch.Tensor, fill, generator: torch.Generator | None) -> None:
    if generator is not None and weight.device.type != "cpu":
        # A seeded torch.Generator() lives on the CPU: sample there and copy over.
        tmp = torch.empty(weight.shape, dtype=weight.dtype)
        fill(tmp, generator)
        weight.copy_(tmp)
    else:
        fill(weight, generator)
