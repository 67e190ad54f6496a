"""What every data set shares: :class:`DataSource` (loader settings, the seeded subsets of smoke
runs, the choice between DataLoaders and the on-device path) and :class:`DatasetSplits`, what a
source's ``splits(seed)`` returns."""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Subset

from fastcert.data.bundle import DataBundle
from fastcert.data.on_device import DeviceBatches
from fastcert.data.shard import Shard, ShardedBatches

#: ``on_device: auto`` moves the splits to a CUDA device when they take at most this share of
#: its memory (the rest is for the model, its bounds and cuDNN's workspaces).
DEVICE_SHARE = 0.25


@dataclass
class DatasetSplits:
    """What a registered builder returns: the two datasets and their metadata."""

    train: Dataset
    test: Dataset
    input_shape: tuple[int, int, int]
    num_classes: int
    mean: Sequence[float]
    std: Sequence[float]


def transforms(mean: Sequence[float], std: Sequence[float], train_aug: list):
    from torchvision import transforms as T

    tail = [T.ToTensor()]
    if any(m != 0.0 for m in mean) or any(s != 1.0 for s in std):
        tail.append(T.Normalize(mean, std))
    return T.Compose(list(train_aug) + tail), T.Compose(tail)


def _limit(ds: Dataset, n: int | None, seed: int, what: str) -> Dataset:
    """A fixed subset of ``n`` examples, drawn with ``seed`` (kept in dataset order)."""
    if n is None:
        return ds
    total = len(ds)  # type: ignore[arg-type]
    if n >= total:
        return ds
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(total, generator=g)[:n].sort().values.tolist()
    return Subset(ds, idx)


@dataclass
class DataSource:
    """A data set and how it is loaded; subclasses define :meth:`splits`.

    ``eps`` is the setting's radius in pixel units (the run's ``eps`` defaults to it) and
    ``eps_max`` the data range (a larger radius is refused). ``limit_train``/``limit_test``
    keep a fixed random subset of that many examples (drawn with the seed, kept in dataset
    order) for smoke runs. The training loader shuffles with its own generator seeded from the
    seed, so the order of examples is reproducible and independent of the global RNG.
    Augmentation draws from torch's RNG: with ``num_workers > 0`` the workers' RNGs are seeded
    from that same generator; with ``num_workers=0`` they come from the global RNG, which the
    training loop reseeds every epoch. The test loader does not shuffle.

    ``on_device`` (auto | true | false): hold both splits on the run's device and draw batches
    there (:class:`DeviceBatches`; :mod:`fastcert.data` says when ``auto`` chooses it).
    """

    root: str = "./data"
    batch_size: int = 128
    test_batch_size: int | None = None
    num_workers: int = 0
    download: bool = False
    augment: bool = True
    limit_train: int | None = None
    limit_test: int | None = None
    eps: float = 0.0
    eps_max: float = 1.0
    on_device: Literal["auto"] | bool = "auto"

    def __post_init__(self):
        for key in ("batch_size", "test_batch_size", "limit_train", "limit_test"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"data.{key}={value}: must be a positive integer (or null)")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers={self.num_workers}: must be >= 0")
        if self.eps_max <= 0:
            raise ValueError(f"data.eps_max={self.eps_max}: must be > 0")
        self.root = os.path.expanduser(str(self.root))

    @property
    def name(self) -> str:
        return type(self).__name__.lower()

    def splits(self, seed: int) -> DatasetSplits:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def load(self, seed: int = 0, device: torch.device | str | None = None,
             shard: Shard | None = None) -> DataBundle:
        """Train/test loaders and the metadata of the data set. ``device``: where the run
        trains (the on-device path's device); ``shard``: this rank's part of every training
        batch and its block of test batches (a data-parallel run, :class:`Shard`)."""
        splits = self.splits(int(seed))
        train_ds = _limit(splits.train, self.limit_train, seed, "limit_train")
        test_ds = _limit(splits.test, self.limit_test, seed + 1, "limit_test")
        device = torch.device(device or "cpu")
        generator = torch.Generator().manual_seed(int(seed))
        test_batch = self.test_batch_size or self.batch_size
        if self.uses_device(len(train_ds) + len(test_ds), splits.input_shape, device):
            train = DeviceBatches.of(train_ds, device, self.batch_size, shuffle=True,
                                     generator=generator, shard=shard, workers=self.num_workers)
            test = DeviceBatches.of(test_ds, device, test_batch, shuffle=False, shard=shard,
                                    workers=self.num_workers)
        else:
            common = dict(
                num_workers=self.num_workers,
                pin_memory=torch.cuda.is_available(),
                # not persistent: workers are re-seeded every epoch from the loader's
                # generator, which the training loop reseeds from (seed, epoch), so a resumed
                # run augments identically
                persistent_workers=False,
            )
            if shard is None:
                train = DataLoader(train_ds, batch_size=self.batch_size, shuffle=True,
                                   generator=generator, **common)
                test = DataLoader(test_ds, batch_size=test_batch, shuffle=False, **common)
            else:  # the same global batches as one process, this rank's share of each
                batches = ShardedBatches(BatchSampler(RandomSampler(train_ds, generator=generator),
                                                       self.batch_size, drop_last=False), shard)
                train = DataLoader(train_ds, batch_sampler=batches, generator=generator, **common)
                train.global_sizes = batches.global_sizes
                first, start, stop = shard.block(len(test_ds), test_batch)
                test = DataLoader(test_ds, batch_size=test_batch, sampler=range(start, stop),
                                  **common)
                test.first_batch = first
        return DataBundle(
            train=train,
            test=test,
            input_shape=tuple(splits.input_shape),  # type: ignore[arg-type]
            num_classes=int(splits.num_classes),
            mean=torch.tensor(splits.mean, dtype=torch.float32),
            std=torch.tensor(splits.std, dtype=torch.float32),
            name=self.name,
        )

    def uses_device(self, n_examples: int, input_shape, device: torch.device) -> bool:
        """Whether the splits go to the device (``on_device``; ``auto``: on CUDA when
        ``n_examples`` float32 images take at most :data:`DEVICE_SHARE` of its memory)."""
        if self.on_device != "auto":
            return bool(self.on_device)
        if device.type != "cuda":
            return False
        size = n_examples * math.prod(input_shape) * 4
        return size <= DEVICE_SHARE * torch.cuda.get_device_properties(device).total_memory
