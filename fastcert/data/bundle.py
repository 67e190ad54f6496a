"""The input domain of a loaded data set: :class:`DataBundle` (loaders, normalisation, and the
L∞ box of a pixel radius in normalised units) and :class:`UnclippedBundle` (the same box, not
clipped to the data range)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader

if TYPE_CHECKING:
    from fastcert.data.on_device import DeviceBatches


def _outward(scale: torch.Tensor) -> torch.Tensor:
    """How far :meth:`DataBundle.eps_box` moves a bound outward: 2^-21 · scale, i.e. 8 units in
    the last place of float32 at ``scale`` (the computed bound is off by at most ~4)."""
    return scale * 2.0**-21


@dataclass
class DataBundle:
    """Loaders plus everything needed to reason about the input domain."""

    train: DataLoader | DeviceBatches
    test: DataLoader | DeviceBatches
    input_shape: tuple[int, int, int]  # C, H, W
    num_classes: int
    mean: torch.Tensor  # (C,), normalisation applied by the loaders
    std: torch.Tensor  # (C,)
    name: str
    #: the validation split held out of the training set (``data.val_size``), None without one
    val: DataLoader | DeviceBatches | None = None
    _on_device: dict = field(default_factory=dict, repr=False)

    def _stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """mean and std shaped (C, 1, 1) on ``x``'s device and dtype (broadcast over C, H, W),
        copied there once per device."""
        dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
        key = (x.device, dtype)
        if key not in self._on_device:
            self._on_device[key] = (self.mean.to(device=x.device, dtype=dtype).view(-1, 1, 1),
                                    self.std.to(device=x.device, dtype=dtype).view(-1, 1, 1))
        return self._on_device[key]

    def x_min(self, like: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised value of pixel 0 per channel, shaped (C, 1, 1)."""
        mean, std = self._stats(like if like is not None else self.mean)
        return (0.0 - mean) / std

    def x_max(self, like: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised value of pixel 1 per channel, shaped (C, 1, 1)."""
        mean, std = self._stats(like if like is not None else self.mean)
        return (1.0 - mean) / std

    def eps_box(self, x: torch.Tensor,
                eps: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """L∞ ball of pixel radius ``eps`` around the normalised batch ``x``, in normalised units,
        rounded outward so that it always contains the exact box.

        Exactly, ``lower = max(x - eps/std, (0-mean)/std)`` and ``upper = min(x + eps/std,
        (1-mean)/std)`` per channel: ε is scaled per channel by the std so that it stays in pixel
        units, and the box never leaves the valid image range. In float32 each of these values
        is off by up to ~4 units in the last place of ``|x| + eps/std`` (the rounding of ε, of
        the statistics, of eps/std and of the sum), and about half the coordinates fall *inside*
        the exact box (up to 2e-7 with CIFAR-10's statistics). Each bound is therefore moved
        outward by :func:`_outward` = 2^-21 · (|x| + eps/std) (8 such units; the range limits by
        2^-21 · |limit|, except 0 and 1 of an identity normalisation, which are exact): the box
        contains the exact one (computed with the data set's float64 statistics), widened by
        at most ~2e-6 normalised (~5e-7 in pixel units). ``x`` is (..., C, H, W); ``eps`` is a
        float or a tensor of one radius per example (shape (B,)) or anything broadcastable to
        ``x``.
        """
        mean, std = self._stats(x)
        if isinstance(eps, torch.Tensor):
            eps_t = eps.to(device=x.device, dtype=mean.dtype)
            torch._assert_async((eps_t >= 0).all(), "eps must be >= 0")  # no host read
        elif eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        else:
            eps_t = torch.tensor(eps, dtype=mean.dtype)  # a CPU scalar: no copy to the device
        if eps_t.dim() == 1 and x.dim() == 4 and eps_t.shape[0] == x.shape[0]:
            eps_t = eps_t.view(-1, 1, 1, 1)
        delta = eps_t / std
        slack = _outward(x.abs() + delta)
        lo_lim, hi_lim = self._limits(mean, std)
        return (torch.maximum(x - delta - slack, lo_lim),
                torch.minimum(x + delta + slack, hi_lim))

    def _limits(self, mean: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Where :meth:`eps_box` clips: the data range (0-mean)/std, (1-mean)/std per channel,
        each moved outward by 2^-21 · |limit| except 0 and 1 of an identity normalisation."""
        lo_lim, hi_lim = (0.0 - mean) / std, (1.0 - mean) / std
        identity = (mean == 0) & (std == 1)  # limits 0 and 1: exact, no slack
        return (torch.where(identity, lo_lim, lo_lim - _outward(lo_lim.abs())),
                torch.where(identity, hi_lim, hi_lim + _outward(hi_lim.abs())))

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Undo the loaders' normalisation: normalised -> pixel units [0, 1]."""
        mean, std = self._stats(x)
        return x * std + mean

    def from_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the loaders' normalisation: pixel units [0, 1] -> normalised."""
        mean, std = self._stats(x)
        return (x - mean) / std


@dataclass
class UnclippedBundle(DataBundle):
    """A :class:`DataBundle` whose L∞ box is not clipped to the data range: [x - ε, x + ε]
    (the perturbation set of Wang 2022's convergence analysis, Eq. 4.3), rounded outward as
    :meth:`DataBundle.eps_box` rounds it, so that it contains the exact box."""

    def _limits(self, mean: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """No limits: ±∞ (``torch.maximum(v, -inf)`` is ``v``)."""
        inf = torch.full_like(mean, float("inf"))
        return -inf, inf
