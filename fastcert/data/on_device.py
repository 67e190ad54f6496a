"""The on-device path (``on_device``): a split held in one tensor on the run's device and batched
there (:class:`DeviceBatches`), its random crop + flip applied there (:class:`CropFlip`), with the
DataLoader's example order for the same seed (see :mod:`fastcert.data`)."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from fastcert.data.shard import Shard


@dataclass(frozen=True)
class CropFlip:
    """torchvision's ``RandomCrop(size, padding=pad, padding_mode="edge")`` followed by
    ``RandomHorizontalFlip(flip_p)``, per example of a batch, on the batch's device.

    Crop offsets (i, j) are uniform in [0, 2·pad] (``RandomCrop.get_params`` on the padded
    image); output pixel (h, w) is padded pixel (i + h, j + w), i.e. input pixel
    (clamp(i + h - pad), clamp(j + w - pad)) clamped to the image (edge padding), and a flipped
    example reads column W-1-w of its crop. Both move values only, so they commute with the
    per-channel normalisation and apply to normalised images exactly."""

    pad: int = 0
    flip_p: float = 0.0

    def draw(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Offsets (n, 2) in [0, 2·pad] and flips (n,) for ``n`` examples."""
        offsets = torch.randint(0, 2 * self.pad + 1, (n, 2), generator=generator,
                                device=generator.device)
        flips = torch.rand(n, generator=generator, device=generator.device) < self.flip_p
        return offsets, flips

    def __call__(self, x: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor):
        b, c, h, w = x.shape
        rows = torch.arange(h, device=x.device)
        cols = torch.arange(w, device=x.device)
        cols = torch.where(flips[:, None], w - 1 - cols, cols)                  # (B, W)
        rows = (offsets[:, :1] - self.pad + rows).clamp_(0, h - 1)              # (B, H)
        cols = (offsets[:, 1:] - self.pad + cols).clamp_(0, w - 1)
        index = (rows[:, :, None] * w + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
        return x.reshape(b, c, h * w).gather(2, index).view(b, c, h, w)


def _device_form(dataset: Dataset) -> tuple[Dataset, CropFlip | None]:
    """``dataset`` without its random transforms, and those transforms as a :class:`CropFlip`
    (None when it has none). Raises ``ValueError`` for a transform with no device form."""
    from torchvision import transforms as T

    chain, base = [], dataset
    while isinstance(base, Subset):
        chain.append(base.indices)
        base = base.dataset
    transform = getattr(base, "transform", None)
    if transform is None:
        return dataset, None
    steps = transform.transforms if isinstance(transform, T.Compose) else [transform]
    pad, flip_p, keep = 0, 0.0, []
    for t in steps:
        if isinstance(t, T.RandomCrop):
            padding = {t.padding} if isinstance(t.padding, int) else set(t.padding or [0])
            if t.padding_mode != "edge" or t.pad_if_needed or len(padding) != 1:
                raise ValueError(f"{t} has no on-device form (edge padding, the same on every "
                                 f"side, only)")
            pad = padding.pop()
        elif isinstance(t, T.RandomHorizontalFlip):
            flip_p = float(t.p)
        elif isinstance(t, (T.ToTensor, T.Normalize, T.PILToTensor, T.ConvertImageDtype)):
            keep.append(t)
        else:
            raise ValueError(f"{t} has no on-device form")
    plain = copy.copy(base)
    plain.transform = T.Compose(keep)
    for indices in reversed(chain):
        plain = Subset(plain, indices)
    return plain, (CropFlip(pad, flip_p) if pad or flip_p else None)


def _materialise(dataset: Dataset, workers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every example of ``dataset`` (through its transform) stacked: images (N, C, H, W) and
    labels (N,). The global RNG is not touched (the model is initialised from it next)."""
    xs, ys = [], []
    for x, y in DataLoader(dataset, batch_size=1024, shuffle=False, num_workers=workers,
                           generator=torch.Generator()):
        xs.append(x)
        ys.append(torch.as_tensor(y))
    return torch.cat(xs).float(), torch.cat(ys).long()


class DeviceBatches:
    """Batches of a split held in one tensor on ``x``'s device (the ``on_device`` path).

    Shuffled (training): each pass draws, from ``generator``, first a base seed and then the
    permutation of the examples — the draws a ``DataLoader(shuffle=True, generator=...)``
    makes, so the order of examples is the DataLoader's — and the augmentation (``augment``)
    from a generator on the device seeded with that base seed: the batches of a pass depend
    only on ``generator``'s state, which the training loop sets from (seed, epoch). With a
    :class:`Shard`, the augmentation is drawn for the whole global batch and each rank keeps
    its share, so the ranks together see exactly a one-process run's batches. Not shuffled
    (test): consecutive batches of the split (a shard holds its block of them; its first
    batch's index in the whole test set is ``first_batch``).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, *, shuffle: bool,
                 generator: torch.Generator | None = None, augment: CropFlip | None = None,
                 shard: Shard | None = None, dataset: Dataset | None = None,
                 first_batch: int = 0):
        if shuffle and generator is None:
            raise ValueError("a shuffled DeviceBatches needs a generator")
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.shuffle, self.generator, self.augment = shuffle, generator, augment
        self.shard = shard if shuffle else None
        self.dataset = dataset if dataset is not None else TensorDataset(x, y)
        self.first_batch = first_batch
        n = len(y)
        self.global_sizes = (self.shard.batch_sizes(n, batch_size) if self.shard is not None
                             else [min(batch_size, n - s) for s in range(0, n, batch_size)])

    @classmethod
    def of(cls, dataset: Dataset, device: torch.device, batch_size: int, *, shuffle: bool,
           generator: torch.Generator | None = None, shard: Shard | None = None,
           workers: int = 0) -> DeviceBatches:
        """``dataset`` moved to ``device`` once (through its deterministic transforms; its
        random crop/flip become the batches' :class:`CropFlip`). A test split with a shard
        keeps that rank's block."""
        plain, augment = _device_form(dataset)
        x, y = _materialise(plain, workers)
        first = 0
        if not shuffle and shard is not None:
            first, start, stop = shard.block(len(y), batch_size)
            x, y = x[start:stop], y[start:stop]
        return cls(x.to(device), y.to(device), batch_size, shuffle=shuffle, generator=generator,
                   augment=augment if shuffle else None, shard=shard, dataset=dataset,
                   first_batch=first)

    @property
    def device(self) -> torch.device:
        return self.x.device

    def __len__(self) -> int:
        return len(self.global_sizes)

    def __iter__(self):
        if not self.shuffle:
            return self._in_order()
        # as a DataLoader: the base seed is drawn when the iterator is made, the permutation at
        # the first batch (tqdm.auto makes one iterator more than it uses: same draws as a
        # DataLoader under it too)
        base = int(torch.empty((), dtype=torch.int64).random_(generator=self.generator).item())
        return self._shuffled(base)

    def _in_order(self):
        for start in range(0, len(self.y), self.batch_size):
            yield self.x[start:start + self.batch_size], self.y[start:start + self.batch_size]

    def _shuffled(self, base: int):
        order = torch.randperm(len(self.y), generator=self.generator).to(self.device)
        aug = (torch.Generator(device=self.device).manual_seed(base)
               if self.augment is not None else None)
        start = 0
        for size in self.global_sizes:
            index = order[start:start + size]
            start += size
            if aug is not None:
                offsets, flips = self.augment.draw(size, aug)
            if self.shard is not None:
                index = self.shard.share(index)
                if aug is not None:
                    offsets, flips = self.shard.share(offsets), self.shard.share(flips)
            x = self.x.index_select(0, index)
            if aug is not None:
                x = self.augment(x, offsets, flips)
            yield x, self.y.index_select(0, index)
