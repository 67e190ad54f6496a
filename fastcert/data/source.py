"""What every data set shares: :class:`DataSource` (loader settings, the held-out validation
split, the seeded subsets of smoke runs, the choice between DataLoaders and the on-device path)
and :class:`DatasetSplits`, what a source's ``splits(seed)`` returns."""
from __future__ import annotations

import copy
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Subset

from fastcert.config import ConfigError
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
    #: the training examples through the test-time transform (no augmentation), in the order
    #: of ``train``; None where ``train`` has no random transform (it is used as it is)
    train_eval: Dataset | None = None


def transforms(mean: Sequence[float], std: Sequence[float], train_aug: list):
    from torchvision import transforms as T

    tail = [T.ToTensor()]
    if any(m != 0.0 for m in mean) or any(s != 1.0 for s in std):
        tail.append(T.Normalize(mean, std))
    return T.Compose(list(train_aug) + tail), T.Compose(tail)


def with_transform(ds: Dataset, transform) -> Dataset:
    """A shallow copy of a torchvision data set reading its images through ``transform`` (the
    training set through the test-time transform: its held-out validation examples)."""
    from torchvision.datasets.vision import StandardTransform

    plain = copy.copy(ds)
    plain.transform = transform
    plain.transforms = StandardTransform(transform, getattr(ds, "target_transform", None))
    return plain


def validation_indices(n_train: int, val_size: int | float, val_seed: int
                       ) -> tuple[list[int], list[int]]:
    """(validation, training) indices of a training set of ``n_train`` examples, each list in
    dataset order: the first n_val of a permutation drawn with ``val_seed`` are held out,
    n_val = ``val_size`` (an int) or round(``val_size`` · n_train) (a fraction)."""
    n_val = val_size if isinstance(val_size, int) else round(val_size * n_train)
    if not 0 < n_val < n_train:
        raise ConfigError(f"data.val_size={val_size} holds out {n_val} of the {n_train} "
                          f"training examples: keep at least one for training and one for "
                          f"validation (e.g. data.val_size=0.1)")
    order = torch.randperm(n_train, generator=torch.Generator().manual_seed(int(val_seed)))
    return order[:n_val].sort().values.tolist(), order[n_val:].sort().values.tolist()


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

    ``val_size`` holds examples of the training set out of training as a validation split
    (``DataBundle.val``): 0 none, an int that many, a float in (0, 1) that fraction of the
    training set. They are drawn with ``val_seed`` (not the run's seed: every seed and every
    trial of a search sees the same split) from the whole training set before ``limit_train``
    draws its subset from the rest, and go through the test-time transform (no augmentation).

    ``on_device`` (auto | true | false): hold the splits on the run's device and draw batches
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
    val_size: int | float = 0
    val_seed: int = 0

    def __post_init__(self):
        for key in ("batch_size", "test_batch_size", "limit_train", "limit_test"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"data.{key}={value}: must be a positive integer (or null)")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers={self.num_workers}: must be >= 0")
        if self.eps_max <= 0:
            raise ValueError(f"data.eps_max={self.eps_max}: must be > 0")
        if isinstance(self.val_size, bool) or not (
                (isinstance(self.val_size, int) and self.val_size >= 0)
                or (isinstance(self.val_size, float) and 0 < self.val_size < 1)):
            raise ValueError(f"data.val_size={self.val_size}: use 0 (no validation split), a "
                             f"number of examples (e.g. 5000) or a fraction in (0, 1) (e.g. 0.1)")
        self.root = os.path.expanduser(str(self.root))

    @property
    def name(self) -> str:
        return type(self).__name__.lower()

    def splits(self, seed: int) -> DatasetSplits:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def load(self, seed: int = 0, device: torch.device | str | None = None,
             shard: Shard | None = None) -> DataBundle:
        """Train/test (and validation) loaders and the metadata of the data set. ``device``:
        where the run trains (the on-device path's device); ``shard``: this rank's part of
        every training batch and its block of test and validation batches (a data-parallel
        run, :class:`Shard`)."""
        splits = self.splits(int(seed))
        train_ds, val_ds = self.held_out(splits)
        train_ds = _limit(train_ds, self.limit_train, seed, "limit_train")
        test_ds = _limit(splits.test, self.limit_test, seed + 1, "limit_test")
        device = torch.device(device or "cpu")
        generator = torch.Generator().manual_seed(int(seed))
        test_batch = self.test_batch_size or self.batch_size
        n = len(train_ds) + len(test_ds) + (0 if val_ds is None else len(val_ds))
        if self.uses_device(n, splits.input_shape, device):
            train = DeviceBatches.of(train_ds, device, self.batch_size, shuffle=True,
                                     generator=generator, shard=shard, workers=self.num_workers)
            test, val = (None if ds is None else
                         DeviceBatches.of(ds, device, test_batch, shuffle=False, shard=shard,
                                          workers=self.num_workers) for ds in (test_ds, val_ds))
        else:
            train = self._train_loader(train_ds, generator, shard)
            test, val = (None if ds is None else self._eval_loader(ds, test_batch, shard)
                         for ds in (test_ds, val_ds))
        return DataBundle(
            train=train,
            test=test,
            input_shape=tuple(splits.input_shape),  # type: ignore[arg-type]
            num_classes=int(splits.num_classes),
            mean=torch.tensor(splits.mean, dtype=torch.float32),
            std=torch.tensor(splits.std, dtype=torch.float32),
            name=self.name,
            val=val,
        )

    def held_out(self, splits: DatasetSplits) -> tuple[Dataset, Dataset | None]:
        """(training examples, validation examples or None): ``val_size`` examples of the
        training set held out (:func:`validation_indices`), through the test-time transform."""
        if self.val_size == 0:
            return splits.train, None
        val_idx, train_idx = validation_indices(len(splits.train), self.val_size,
                                                self.val_seed)
        plain = splits.train if splits.train_eval is None else splits.train_eval
        return Subset(splits.train, train_idx), Subset(plain, val_idx)

    def _loader_options(self) -> dict:
        # not persistent: workers are re-seeded every epoch from the loader's generator, which
        # the training loop reseeds from (seed, epoch), so a resumed run augments identically
        return dict(num_workers=self.num_workers, pin_memory=torch.cuda.is_available(),
                    persistent_workers=False)

    def _train_loader(self, ds: Dataset, generator: torch.Generator,
                      shard: Shard | None) -> DataLoader:
        """The shuffled training DataLoader (with a shard: this rank's share of the same
        global batches as one process)."""
        if shard is None:
            return DataLoader(ds, batch_size=self.batch_size, shuffle=True, generator=generator,
                              **self._loader_options())
        batches = ShardedBatches(BatchSampler(RandomSampler(ds, generator=generator),
                                              self.batch_size, drop_last=False), shard)
        train = DataLoader(ds, batch_sampler=batches, generator=generator,
                           **self._loader_options())
        train.global_sizes = batches.global_sizes
        return train

    def _eval_loader(self, ds: Dataset, batch_size: int, shard: Shard | None) -> DataLoader:
        """An evaluation DataLoader in dataset order (with a shard: this rank's block of
        whole batches, ``first_batch`` its first batch's index)."""
        if shard is None:
            return DataLoader(ds, batch_size=batch_size, shuffle=False, **self._loader_options())
        first, start, stop = shard.block(len(ds), batch_size)
        loader = DataLoader(ds, batch_size=batch_size, sampler=range(start, stop),
                            **self._loader_options())
        loader.first_batch = first
        return loader

    def uses_device(self, n_examples: int, input_shape, device: torch.device) -> bool:
        """Whether the splits go to the device (``on_device``; ``auto``: on CUDA when
        ``n_examples`` float32 images take at most :data:`DEVICE_SHARE` of its memory)."""
        if self.on_device != "auto":
            return bool(self.on_device)
        if device.type != "cuda":
            return False
        size = n_examples * math.prod(input_shape) * 4
        return size <= DEVICE_SHARE * torch.cuda.get_device_properties(device).total_memory
