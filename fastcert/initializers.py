"""Weight initialisations and their IBP *difference gain* (Shi et al. 2021, Sec. 3.2.1 / 3.3.1).

For an affine layer with fan-in ``n`` (``k*k*c_in/groups`` for a convolution, i.e.
``weight[0].numel()``), IBP propagates interval widths as ``Delta_i = |W_i| delta_{i-1}``
(Eq. 4 of Shi et al. 2021) and, at initialisation, ``E(Delta_i)/E(Delta_{i-1}) = (n/2) E|W_i|``
(Definition 1, Eq. 5-6): the *difference gain*. The IBP initialisation N(0, sigma^2) with
``sigma = sqrt(2*pi)/n`` (Sec. 3.3.1) makes it exactly 1.

The baselines follow the **fan-in-only** variances that reproduce the printed numbers of the
thesis' Table 3.1 (= Table 5 of Shi et al. 2021: at n = 27 the rows read 1.30, 2.07, 3.18, 2.93,
the closed forms below), not PyTorch's ``xavier_*`` (which average fan-in and fan-out):

===================  ==================  ==========================  ======================
``init=``            class               distribution                gain (closed form)
===================  ==================  ==========================  ======================
``xavier_uniform``   XavierUniform       U(-1/sqrt(n), 1/sqrt(n))     sqrt(n)/4
                                         (= PyTorch's default layer init for Linear/Conv)
``xavier_normal``    XavierNormal        N(0, 1/n)                    sqrt(n/(2*pi))
``kaiming_uniform``  KaimingUniform      U(-sqrt(6/n), sqrt(6/n))     sqrt(6n)/4
``kaiming_normal``   KaimingNormal       N(0, 2/n)                    sqrt(n/pi)
``orthogonal``       Orthogonal          ``torch.nn.init.orthogonal_`` on (fan_out, fan_in),
                                         gain 1: see :meth:`Orthogonal.gain`
``ibp``              IBPInit             N(0, 2*pi/n^2)               1
``default``          DefaultInit         PyTorch's own init, left untouched
===================  ==================  ==========================  ======================

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
    "difference_gain",
    "residual_block_gain",
    "residual_readers",
    "DEFAULT_MAX_FAN_OUT",
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
    (:meth:`fill` samples it so :func:`difference_gain` can measure PyTorch's default)."""

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
    gain back to 1 (e.g. main branch ½·1 + shortcut ½ = 1). :func:`residual_block_gain`
    measures it (``python -m experiments.init_gain``).
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


# ------------------------------------------------------------------------------ difference gain

DEFAULT_MAX_FAN_OUT = 64
"""Default ``fan_out`` of :func:`difference_gain` is ``min(fan_in, DEFAULT_MAX_FAN_OUT)``.

Why ``fan_out <= fan_in``: for ``orthogonal`` the rows are orthonormal (each row uniform on
the unit sphere of R^n) only when fan_out <= fan_in; with more rows than columns PyTorch makes
the *columns* orthonormal, entries shrink to ~1/sqrt(fan_out) and the gain drops (at n=27 with
64 rows: ~1.35 instead of the printed 2.09). Square or wide matrices reproduce Table 3.1.

Why 64 and not 512 (CNN-7's FC width): for every listed init the expected gain does not depend
on fan_out as long as fan_out <= fan_in (i.i.d. entries; for orthogonal each row's marginal is
uniform on the sphere whatever the number of rows), only the variance does. At n = 32768 a
512-row draw costs, on 2 CPU cores (measured), ~1 s for ``torch.nn.init.orthogonal_`` (0.7 s with
Cholesky-QR) and ~0.17 s for an i.i.d. init, i.e. ~3 min for that table column at 100 trials.
64 rows keep the whole 100-trial table at ~30 s, with a per-trial relative noise of
~1/sqrt(64*n). Pass ``fan_out=512`` (``--fan-out 512``) for the exact CNN-7 FC shape.
"""

_INTERVAL_PAIRS = 4


@torch.no_grad()
def difference_gain(
    init: Init,
    fan_in: int,
    fan_out: int | None = None,
    trials: int = 100,
    seed: int | None = 0,
) -> float:
    """Empirical difference gain E(Delta_i)/E(Delta_{i-1}) (Definition 1, Eq. 4-6 of Shi et al.
    2021; thesis Table 3.1) of initialiser ``init`` for a layer with fan-in ``fan_in``.

    Each trial draws a fresh (fan_out x fan_in) weight W with ``init`` and pre-activation
    interval bounds of the previous layer: random centres c ~ N(0, 1), taken in antithetic
    pairs (c, -c) so that their distribution is exactly symmetric about 0 (the assumption of
    Appendix D.1 of Shi et al. 2021), and random positive widths Delta_{i-1} ~ U(0.1, 2) shared
    by each pair. Then delta = ReLU(h_up) - ReLU(h_low) and Delta_i = |W| delta (Eq. 4); the
    trial's gain is mean(Delta_i) / mean(Delta_{i-1}). Returns the mean over ``trials``
    (``seed=None``: not reproducible);
    expected value (n/2) E|W| (Eq. 6), see :meth:`Init.gain`.

    ``fan_out`` defaults to ``min(fan_in, DEFAULT_MAX_FAN_OUT)``; see
    :data:`DEFAULT_MAX_FAN_OUT` for why.
    """
    fill = init.fill
    n = int(fan_in)
    if n < 1:
        raise ValueError(f"fan_in must be positive, got {fan_in!r}")
    r = min(n, DEFAULT_MAX_FAN_OUT) if fan_out is None else int(fan_out)
    if r < 1:
        raise ValueError(f"fan_out must be positive, got {fan_out!r}")
    if trials < 1:
        raise ValueError(f"trials must be positive, got {trials!r}")
    generator = torch.Generator()
    if seed is None:
        generator.seed()  # non-deterministic
    else:
        generator.manual_seed(int(seed))
    weight = torch.empty(r, n)
    if isinstance(init, Orthogonal) and max(r, n) >= 4 * min(r, n):
        fill = _orthogonal_cholesky_qr  # same draws, same result, ~6x faster at 64x32768
    total = 0.0
    for _ in range(trials):
        fill(weight, generator)
        centre = torch.randn(n, _INTERVAL_PAIRS, generator=generator, dtype=torch.float64)
        width = torch.empty(n, _INTERVAL_PAIRS, dtype=torch.float64).uniform_(
            0.1, 2.0, generator=generator
        )
        centre = torch.cat([centre, -centre], dim=1)
        width = torch.cat([width, width], dim=1)
        lower, upper = centre - width / 2, centre + width / 2  # h_{i-1} bounds
        delta = torch.relu(upper) - torch.relu(lower)  # post-ReLU width, delta_{i-1}
        delta_i = weight.abs() @ delta.float()  # Eq. 4: Delta_i = |W| delta
        total += (delta_i.double().mean() / (upper - lower).mean()).item()
    return total / trials


class _ResidualProbe(nn.Module):
    """A residual addition followed by one fully connected basic block: ``h = a + b`` (the
    previous block's sum, pre-activation), ``x = ReLU(h)``, then ``W2 ReLU(W1 x) + S x``."""

    def __init__(self, fan_in: int, width: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(fan_in, width, bias=False)
        self.w2 = nn.Linear(width, width, bias=False)
        self.shortcut = nn.Linear(fan_in, width, bias=False)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        x = torch.relu(a + b)
        return self.w2(torch.relu(self.w1(x))) + self.shortcut(x)


@torch.no_grad()
def residual_block_gain(
    init: Init,
    fan_in: int,
    fan_out: int | None = None,
    trials: int = 100,
    seed: int | None = 0,
    calibrated: bool = True,
) -> float:
    """Empirical difference gain E(Δ_out)/E(Δ_in) of a residual block at initialisation (App.
    A.3 of Shi et al. 2021): the block reads ReLU(h) of a previous block's sum h (interval
    widths Δ_in, drawn as in :func:`difference_gain`), and outputs ``W2 ReLU(W1 x) + S x`` (a
    fully connected :class:`fastcert.models.BasicResidualBlock` without BN: W1 and the
    shortcut S have fan-in ``fan_in``, W2 fan-in ``fan_out``, all ``fan_out`` rows, default
    ``min(fan_in, DEFAULT_MAX_FAN_OUT)``). IBP: Δ_out = |W2| δ_1 + |S| δ_0 (Eq. 4 per branch;
    interval sums add widths), δ the post-ReLU widths.

    Each layer is drawn with ``init.fill``; with ``calibrated`` the layers
    :func:`residual_readers` finds (W1 and S: they read ReLU(add)) are scaled by
    ``init.residual_scale`` as :class:`IBPInit` does. Expected value for the IBP init: 2
    uncalibrated (two unit-gain branches), 1 calibrated (½ + ½).
    """
    n = int(fan_in)
    if n < 1 or trials < 1:
        raise ValueError(f"fan_in and trials must be positive, got {fan_in!r}, {trials!r}")
    r = min(n, DEFAULT_MAX_FAN_OUT) if fan_out is None else int(fan_out)
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(int(seed))
    probe = _ResidualProbe(n, r)
    scaled = residual_readers(probe) if calibrated else []
    scale = getattr(init, "residual_scale", 1.0)
    total = 0.0
    for _ in range(trials):
        for layer in (probe.w1, probe.w2, probe.shortcut):
            init.fill(layer.weight, generator)
            if layer in scaled:
                layer.weight.mul_(scale)
        centre = torch.randn(n, _INTERVAL_PAIRS, generator=generator)
        width = torch.empty(n, _INTERVAL_PAIRS).uniform_(0.1, 2.0, generator=generator)
        centre, width = torch.cat([centre, -centre], 1), torch.cat([width, width], 1)
        lower, upper = (centre - width / 2).t(), (centre + width / 2).t()   # h bounds (B, n)
        x_lo, x_up = torch.relu(lower), torch.relu(upper)
        w1, w2, s = probe.w1.weight, probe.w2.weight, probe.shortcut.weight
        mid, rad = (x_up + x_lo) / 2 @ w1.t(), (x_up - x_lo) / 2 @ w1.abs().t()  # W1 x bounds
        delta_1 = torch.relu(mid + rad) - torch.relu(mid - rad)
        delta_out = delta_1 @ w2.abs().t() + (x_up - x_lo) @ s.abs().t()
        total += (delta_out.mean() / (upper - lower).mean()).item()
    return total / trials


def _orthogonal_cholesky_qr(weight: torch.Tensor, generator: torch.Generator | None) -> None:
    """Same as ``torch.nn.init.orthogonal_(weight, gain=1, generator=generator)`` for a 2-D,
    far-from-square ``weight``: the same Gaussian draw A, the same Q of A's (tall) QR with
    sign(diag R) > 0, but computed by Cholesky-QR in float64 (R^T = chol(A A^T) for wide A),
    which is much faster than LAPACK's Householder QR for a 64 x 32768 matrix on CPU. Only used
    when the aspect ratio is >= 4, where A is well-conditioned (Cholesky-QR squares the
    condition number). Equality with torch's result is checked in tests/test_init.py."""
    rows, cols = weight.shape
    a = torch.empty(rows, cols, dtype=weight.dtype).normal_(0, 1, generator=generator)
    a = a.double()
    if rows > cols:
        a = a.t()  # make it wide: (short, long)
    chol = torch.linalg.cholesky(a @ a.t())
    q = torch.linalg.solve_triangular(chol, a, upper=False)  # orthonormal rows
    if rows > cols:
        q = q.t()
    weight.copy_(q)
