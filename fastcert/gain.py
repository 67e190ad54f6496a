"""The IBP *difference gain* of an initialisation, measured (Shi et al. 2021, Definition 1,
Eq. 4-6; Table 3.1 of the thesis; App. A.3 for a residual block): what
:meth:`fastcert.initializers.Init.gain` gives in closed form, by sampling weights and interval
bounds."""
from __future__ import annotations

import torch
from torch import nn

from fastcert.initializers import Init, Orthogonal, residual_readers

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


def _trial_generator(seed: int | None) -> torch.Generator:
    """The generator of a measurement's draws: seeded with ``seed``, or non-deterministic for
    None."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(int(seed))
    return generator


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
    generator = _trial_generator(seed)
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
    ``init.residual_scale`` as :class:`~fastcert.initializers.IBPInit` does. Expected value for
    the IBP init: 2 uncalibrated (two unit-gain branches), 1 calibrated (½ + ½).
    """
    n = int(fan_in)
    if n < 1 or trials < 1:
        raise ValueError(f"fan_in and trials must be positive, got {fan_in!r}, {trials!r}")
    r = min(n, DEFAULT_MAX_FAN_OUT) if fan_out is None else int(fan_out)
    generator = _trial_generator(seed)
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
