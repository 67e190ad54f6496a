"""Datasets for certified training: one class per data set, ``conf/data/<name>.yaml`` naming it
(``_target_: fastcert.data.<Class>``) with its loader settings; ``.load(seed)`` gives a
:class:`DataBundle`.

Every loader yields *normalised* images ``x_n = (x - mean) / std`` where ``x`` is in pixel units
``[0, 1]``; the :class:`DataBundle` carries ``mean``/``std`` so that perturbation radii can stay in
pixel units (:meth:`DataBundle.eps_box` scales ε per channel by ``1/std`` and clamps the box to the
image range).

:class:`Digits`
    scikit-learn's copy of the UCI handwritten digits (1797 images, 1x8x8, 10 classes), shipped inside
    the scikit-learn wheel, so it works offline. Pixel values 0..16 are divided by 16. The split is a
    stratified 80/20 split (``sklearn.model_selection.train_test_split(test_size=0.2,
    stratify=y, random_state=split_seed)``): 1437 train / 360 test images. ``split_seed`` is a
    data field (default 0), not the run's seed: every seed of a sweep trains and tests on the
    same split, so "± std over seeds" measures training alone. No normalisation (mean 0, std 1);
    ``augment`` is ignored.
:class:`MNIST`
    ``torchvision.datasets.MNIST`` (``<root>/MNIST/raw/*-idx?-ubyte``), 1x28x28, mean 0 / std 1.
    No augmentation.
:class:`FashionMNIST`
    ``torchvision.datasets.FashionMNIST`` (Xiao et al. 2017: 60,000 / 10,000 28x28 grey images
    of clothes in MNIST's file format), mean 0 / std 1, no augmentation (as in the CROWN-IBP
    code). The four idx files are read where they lie, gzipped or not: torchvision's layout
    ``<root>/FashionMNIST/raw/`` or directly in ``<root>`` (e.g. Debian's
    ``dataset-fashion-mnist`` package: ``data.root=/usr/share/datasets/fashion-mnist``).
:class:`CIFAR10`
    ``torchvision.datasets.CIFAR10`` (``<root>/cifar-10-batches-py``), 3x32x32, normalised with
    ``mean``/``std`` (default: the CIFAR-10 training-set statistics, std (0.2471, 0.2435,
    0.2616)); training augmentation (``augment=True``): random crop 32 with ``crop_padding``
    (default 4) pixels of edge padding + horizontal flip. Shi et al. 2021's released code
    normalises with std (0.2023, 0.1994, 0.2010) and pads by 2: its presets set these fields.
:class:`TinyImageNet`
    ``torchvision.datasets.ImageFolder`` over ``<root>/tiny-imagenet-200/train`` and
    ``<root>/tiny-imagenet-200/val`` (the validation set reorganised into one folder per class by
    ``python -m fastcert.prep_tinyimagenet``), 3x64x64, 200 classes; training augmentation: random
    crop 64 with 4 pixels of edge padding + horizontal flip.

On the device (``on_device``): a split that fits is moved to the device once, as one tensor of
normalised images, and :class:`DeviceBatches` draws the batches there: the same example order as
the ``DataLoader`` for the same seed (its generator draws the workers' base seed, then the
permutation), and the random crop (edge padding) + horizontal flip applied on the device by
:class:`CropFlip`, drawn from a device generator seeded by that base seed, so an epoch's batches
depend only on (seed, epoch). ``on_device: auto`` uses it on CUDA when both splits take at most
a quarter of the GPU's memory (MNIST, CIFAR-10, digits; TinyImageNet's config says false).

Missing files raise :class:`DatasetNotFoundError` (a ``FileNotFoundError``) whose message names
the expected path and how to obtain the data. A new data set is a subclass of
:class:`DataSource` defining ``splits(seed)`` and a ``conf/data/<name>.yaml`` naming it.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Literal, Sequence
from urllib.error import URLError

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Subset, TensorDataset

__all__ = [
    "DataBundle",
    "DataSource",
    "DatasetNotFoundError",
    "DatasetSplits",
    "Digits",
    "MNIST",
    "FashionMNIST",
    "CIFAR10",
    "TinyImageNet",
    "CropFlip",
    "DeviceBatches",
    "Shard",
    "TwoClasses",
    "UnclippedBundle",
]


class DatasetNotFoundError(FileNotFoundError):
    """The files of a dataset are missing (or fail their checksum) under the configured root."""


@dataclass
class DatasetSplits:
    """What a registered builder returns: the two datasets and their metadata."""

    train: Dataset
    test: Dataset
    input_shape: tuple[int, int, int]
    num_classes: int
    mean: Sequence[float]
    std: Sequence[float]


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

    def eps_box(self, x: torch.Tensor, eps: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """L∞ ball of pixel radius ``eps`` around the normalised batch ``x``, in normalised units,
        rounded outward so that it always contains the exact box.

        Exactly, ``lower = max(x - eps/std, (0-mean)/std)`` and ``upper = min(x + eps/std,
        (1-mean)/std)`` per channel: ε is scaled per channel by the std so that it stays in pixel
        units, and the box never leaves the valid image range. In float32 each of these values
        is off by up to ~4 units in the last place of ``|x| + eps/std`` (the rounding of ε, of
        the statistics, of eps/std and of the sum), and about half the coordinates fall *inside* the exact box
        (up to 2e-7 with CIFAR-10's statistics). Each bound is therefore moved outward by
        :func:`_outward` = 2^-21 · (|x| + eps/std) (8 such units; the range limits by
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
        lo_lim, hi_lim = (0.0 - mean) / std, (1.0 - mean) / std
        identity = (mean == 0) & (std == 1)  # limits 0 and 1: exact, no slack
        delta = eps_t / std
        slack = _outward(x.abs() + delta)
        return (torch.maximum(x - delta - slack,
                              torch.where(identity, lo_lim, lo_lim - _outward(lo_lim.abs()))),
                torch.minimum(x + delta + slack,
                              torch.where(identity, hi_lim, hi_lim + _outward(hi_lim.abs()))))

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Undo the loaders' normalisation: normalised -> pixel units [0, 1]."""
        mean, std = self._stats(x)
        return x * std + mean

    def from_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the loaders' normalisation: pixel units [0, 1] -> normalised."""
        mean, std = self._stats(x)
        return (x - mean) / std


# --------------------------------------------------------------------------------------------
# helpers


def _transforms(mean: Sequence[float], std: Sequence[float], train_aug: list):
    from torchvision import transforms as T

    tail = [T.ToTensor()]
    if any(m != 0.0 for m in mean) or any(s != 1.0 for s in std):
        tail.append(T.Normalize(mean, std))
    return T.Compose(list(train_aug) + tail), T.Compose(tail)


def _not_found(name: str, path: str, how: str, detail: str = "") -> DatasetNotFoundError:
    msg = f"{name} not found: expected its files under '{path}'."
    if detail:
        msg += f" {detail}"
    msg += f" To get them: {how}"
    return DatasetNotFoundError(msg)


def _torchvision_howto(path: str) -> str:
    return (
        "run once with data.download=true on a machine with network access, "
        f"or copy torchvision's files for this dataset to '{path}' (and point data.root at their parent)."
    )


def _load_torchvision(cls, name: str, root: str, path: str, expected: Sequence[str], download: bool, **kw):
    """Construct a torchvision dataset, turning its 'Dataset not found' errors into ours."""
    try:
        return cls(root, download=download, **kw)
    except RuntimeError as e:
        text = str(e)
        if "not found" not in text.lower() and not download:
            raise
        missing = [f for f in expected if not os.path.isfile(os.path.join(path, f))]
        if download and "not found" not in text.lower():
            short = " ".join(text.split())[:400] or type(e).__name__
            detail = f"Downloading failed ({short})."
        elif missing:
            detail = f"Missing: {', '.join(missing)}."
        else:
            detail = (
                "The files are present but failed torchvision's MD5 check "
                "(corrupted, or not the official files)."
            )
        raise _not_found(name, path, _torchvision_howto(path), detail) from e
    except URLError as e:  # download=True without network (some torchvision paths raise it directly)
        raise _not_found(name, path, _torchvision_howto(path), f"Downloading failed ({e}).") from e


# --------------------------------------------------------------------------------------------
# data sets


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
    there (:class:`DeviceBatches`; the module docstring says when ``auto`` chooses it).
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
                batches = _ShardedBatches(BatchSampler(RandomSampler(train_ds, generator=generator),
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


@dataclass
class Digits(DataSource):
    """scikit-learn's UCI digits (see the module docstring); ``split_seed`` fixes the
    train/test split whatever the run's seed."""

    split_seed: int = 0

    def splits(self, seed: int) -> DatasetSplits:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        d = load_digits()
        x = torch.tensor(d.images, dtype=torch.float32).div_(16.0).unsqueeze(1)  # (1797, 1, 8, 8)
        y = torch.tensor(d.target, dtype=torch.long)
        idx_train, idx_test = train_test_split(
            list(range(len(y))), test_size=0.2, stratify=d.target,
            random_state=self.split_seed, shuffle=True)
        idx_train, idx_test = torch.tensor(idx_train), torch.tensor(idx_test)
        return DatasetSplits(
            train=TensorDataset(x[idx_train], y[idx_train]),
            test=TensorDataset(x[idx_test], y[idx_test]),
            input_shape=(1, 8, 8),
            num_classes=10,
            mean=(0.0,),
            std=(1.0,),
        )


_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


@dataclass
class MNIST(DataSource):
    """torchvision's MNIST (see the module docstring)."""

    def splits(self, seed: int) -> DatasetSplits:
        from torchvision.datasets import MNIST as TorchMNIST

        mean, std = (0.0,), (1.0,)
        tf, _ = _transforms(mean, std, [])
        path = os.path.join(self.root, "MNIST", "raw")
        kw = dict(name="MNIST", root=self.root, path=path, expected=_MNIST_FILES,
                  download=self.download, transform=tf)
        train = _load_torchvision(TorchMNIST, train=True, **kw)
        test = _load_torchvision(TorchMNIST, train=False, **{**kw, "download": False})
        return DatasetSplits(train, test, (1, 28, 28), 10, mean, std)


def _gunzipped(path: str, tmp: str) -> str:
    """``path``, or for a ``.gz`` file its decompressed copy in the folder ``tmp``."""
    if not path.endswith(".gz"):
        return path
    import gzip
    import shutil

    out = os.path.join(tmp, os.path.basename(path)[:-3])
    with gzip.open(path, "rb") as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return out


def _idx_files(folders: Sequence[str], names: Sequence[str]) -> dict[str, str] | None:
    """The first folder of ``folders`` holding every file of ``names``, each plain or ``.gz``:
    ``{name: path}``; None when no folder has them all."""
    for folder in folders:
        found = {}
        for name in names:
            for candidate in (name, name + ".gz"):
                if os.path.isfile(os.path.join(folder, candidate)):
                    found[name] = os.path.join(folder, candidate)
                    break
        if len(found) == len(names):
            return found
    return None


def _read_idx_split(files: dict[str, str], train: bool):
    """Images (N, 28, 28) uint8 and labels (N,) of one split, read by torchvision's idx readers
    (a gzipped file is decompressed into a temporary folder first)."""
    import tempfile

    from torchvision.datasets.mnist import read_image_file, read_label_file

    prefix = "train" if train else "t10k"
    with tempfile.TemporaryDirectory() as tmp:
        images = read_image_file(_gunzipped(files[f"{prefix}-images-idx3-ubyte"], tmp))
        labels = read_label_file(_gunzipped(files[f"{prefix}-labels-idx1-ubyte"], tmp))
    if len(images) != len(labels):
        raise ValueError(f"Fashion-MNIST {prefix}: {len(images)} images but {len(labels)} labels")
    return images, labels


def _fashion_dataset(files: dict[str, str] | None, root: str, train: bool, download: bool,
                     transform):
    """``torchvision.datasets.FashionMNIST`` over ``files`` (the four idx files, found where
    they lie) or, with none found, over torchvision's own layout under ``root`` (downloading
    there when ``download``)."""
    from torchvision.datasets import FashionMNIST as TorchFashionMNIST

    if files is None:
        return TorchFashionMNIST(root, train=train, download=download, transform=transform)

    class IdxFashionMNIST(TorchFashionMNIST):
        """torchvision's class, its data read from ``files`` instead of ``<root>/FashionMNIST/raw``."""

        def _check_exists(self) -> bool:
            return True

        def _load_data(self):
            return _read_idx_split(files, self.train)

    return IdxFashionMNIST(root, train=train, transform=transform)


_FASHION_HOWTO = ("install Debian's offline copy ('apt-get install dataset-fashion-mnist', then "
                  "data.root=/usr/share/datasets/fashion-mnist), or run once with "
                  "data.download=true on a machine with network access.")


@dataclass
class FashionMNIST(DataSource):
    """Fashion-MNIST through torchvision (see the module docstring)."""

    def splits(self, seed: int) -> DatasetSplits:
        mean, std = (0.0,), (1.0,)
        tf, _ = _transforms(mean, std, [])
        raw = os.path.join(self.root, "FashionMNIST", "raw")
        files = _idx_files([raw, self.root], _MNIST_FILES)
        if files is None and not self.download:
            raise _not_found("Fashion-MNIST", self.root, _FASHION_HOWTO,
                             f"Looked in '{raw}' and '{self.root}' for "
                             f"{', '.join(_MNIST_FILES)} (each may be gzipped: .gz).")
        try:
            train = _fashion_dataset(files, self.root, True, self.download, tf)
            test = _fashion_dataset(files, self.root, False, False, tf)
        except (RuntimeError, URLError) as e:
            raise _not_found("Fashion-MNIST", raw, _FASHION_HOWTO,
                             f"Downloading failed ({' '.join(str(e).split())[:400]}).") from e
        return DatasetSplits(train, test, (1, 28, 28), 10, mean, std)


CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)


@dataclass
class CIFAR10(DataSource):
    """torchvision's CIFAR-10 (see the module docstring): normalised with ``mean``/``std``,
    random crops padded by ``crop_padding`` (edge) pixels."""

    mean: tuple[float, float, float] = CIFAR10_MEAN
    std: tuple[float, float, float] = CIFAR10_STD
    crop_padding: int = 4

    def __post_init__(self):
        super().__post_init__()
        if min(self.std) <= 0:
            raise ValueError(f"data.std={list(self.std)}: every channel's std must be > 0")
        if self.crop_padding < 0:
            raise ValueError(f"data.crop_padding={self.crop_padding}: must be >= 0")

    def splits(self, seed: int) -> DatasetSplits:
        from torchvision import transforms as T
        from torchvision.datasets import CIFAR10 as TorchCIFAR10

        aug = ([T.RandomCrop(32, padding=self.crop_padding, padding_mode="edge"),
                T.RandomHorizontalFlip()] if self.augment else [])
        mean, std = tuple(self.mean), tuple(self.std)
        tf_train, tf_test = _transforms(mean, std, aug)
        path = os.path.join(self.root, TorchCIFAR10.base_folder)
        expected = ([f for f, _ in TorchCIFAR10.train_list + TorchCIFAR10.test_list]
                    + [TorchCIFAR10.meta["filename"]])
        kw = dict(name="CIFAR-10", root=self.root, path=path, expected=expected)
        train = _load_torchvision(TorchCIFAR10, train=True, download=self.download,
                                  transform=tf_train, **kw)
        test = _load_torchvision(TorchCIFAR10, train=False, download=False, transform=tf_test,
                                 **kw)
        return DatasetSplits(train, test, (3, 32, 32), 10, mean, std)


TINYIMAGENET_MEAN = (0.4802, 0.4481, 0.3975)
TINYIMAGENET_STD = (0.2302, 0.2265, 0.2262)
TINYIMAGENET_DIR = "tiny-imagenet-200"


def _tinyimagenet_howto(root: str) -> str:
    return (
        f"run 'python -m fastcert.prep_tinyimagenet --root {root}' on a machine with network access, "
        f"or download tiny-imagenet-200.zip elsewhere and run "
        f"'python -m fastcert.prep_tinyimagenet --root {root} --zip PATH/TO/tiny-imagenet-200.zip'."
    )


@dataclass
class TinyImageNet(DataSource):
    """TinyImageNet through ImageFolder (see the module docstring)."""

    def splits(self, seed: int) -> DatasetSplits:
        from torchvision import transforms as T
        from torchvision.datasets import ImageFolder

        root = self.root
        base = os.path.join(root, TINYIMAGENET_DIR)
        train_dir, val_dir = os.path.join(base, "train"), os.path.join(base, "val")
        if self.download and not (os.path.isdir(train_dir) and os.path.isdir(val_dir)):
            from fastcert import prep_tinyimagenet

            try:
                prep_tinyimagenet.prepare(root)
            except (OSError, RuntimeError) as e:
                raise _not_found("TinyImageNet", base, _tinyimagenet_howto(root),
                                 f"Downloading failed ({e}).") from e
        for d in (train_dir, val_dir):
            if not os.path.isdir(d):
                raise _not_found("TinyImageNet", base, _tinyimagenet_howto(root),
                                 f"Missing folder '{d}'.")
        val_images = os.path.join(val_dir, "images")
        if os.path.isdir(val_images) and any(f.lower().endswith(".jpeg")
                                             for f in os.listdir(val_images)):
            raise _not_found(
                "TinyImageNet (validation set in class folders)",
                val_dir,
                _tinyimagenet_howto(root),
                f"'{val_images}' still holds the flat validation images: the validation set has "
                "not been reorganised into one folder per class.",
            )
        aug = ([T.RandomCrop(64, padding=4, padding_mode="edge"), T.RandomHorizontalFlip()]
               if self.augment else [])
        tf_train, tf_test = _transforms(TINYIMAGENET_MEAN, TINYIMAGENET_STD, aug)
        try:
            train = ImageFolder(train_dir, transform=tf_train)
            test = ImageFolder(val_dir, transform=tf_test)
        except FileNotFoundError as e:  # no class folders / a class folder without images
            raise _not_found("TinyImageNet", base, _tinyimagenet_howto(root), str(e)) from e
        if train.classes != test.classes:
            only_train = sorted(set(train.classes) - set(test.classes))
            only_val = sorted(set(test.classes) - set(train.classes))
            raise ValueError(
                f"TinyImageNet train and val class folders differ under '{base}' "
                f"(only in train: {only_train[:10]}{'...' if len(only_train) > 10 else ''}; "
                f"only in val: {only_val[:10]}{'...' if len(only_val) > 10 else ''}); "
                "the label indices would not match. Re-run fastcert.prep_tinyimagenet."
            )
        if len(train.classes) != 200:
            warnings.warn(
                f"TinyImageNet under '{base}' has {len(train.classes)} classes, not 200; "
                "num_classes follows the folders found.",
                stacklevel=3,
            )
        return DatasetSplits(train, test, (3, 64, 64), len(train.classes), TINYIMAGENET_MEAN,
                             TINYIMAGENET_STD)


# --------------------------------------------------------------------------------------------
# data-parallel shards and the on-device path

#: ``on_device: auto`` moves the splits to a CUDA device when they take at most this share of
#: its memory (the rest is for the model, its bounds and cuDNN's workspaces).
DEVICE_SHARE = 0.25


@dataclass(frozen=True)
class Shard:
    """Rank ``rank`` of ``world`` data-parallel processes.

    Training: every rank walks the same global batches as a one-process run (the same seeded
    permutation) and takes examples ``rank, rank + world, ...`` of each, so the ranks' shares
    of a batch are disjoint and together are the batch. A last batch with fewer examples than
    ranks is skipped (a rank would get none). Test: a contiguous block of whole test batches,
    so the gathered results are in the test set's order."""

    rank: int
    world: int

    def __post_init__(self):
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} is not among the {self.world} ranks")

    def batch_sizes(self, n: int, batch_size: int) -> list[int]:
        """Global sizes of an epoch's batches (those with an example for every rank)."""
        sizes = [min(batch_size, n - start) for start in range(0, n, batch_size)]
        if sizes and sizes[-1] < self.world:
            warnings.warn(f"the last training batch ({sizes[-1]} examples) is skipped every "
                          f"epoch: fewer examples than the {self.world} ranks", stacklevel=3)
            sizes.pop()
        return sizes

    def share(self, batch: torch.Tensor) -> torch.Tensor:
        return batch[self.rank::self.world]

    def block(self, n: int, batch_size: int) -> tuple[int, int, int]:
        """(index of the first test batch, first example, end) of this rank's test block."""
        batches = math.ceil(n / batch_size)
        per_rank = math.ceil(batches / self.world)
        first = min(self.rank * per_rank, batches)
        last = min(first + per_rank, batches)
        return first, first * batch_size, min(last * batch_size, n)


class _ShardedBatches:
    """A batch sampler giving this rank's share (:class:`Shard`) of each global batch."""

    def __init__(self, batches: BatchSampler, shard: Shard):
        self.batches, self.shard = batches, shard
        self.global_sizes = shard.batch_sizes(len(batches.sampler), batches.batch_size)

    def __len__(self) -> int:
        return len(self.global_sizes)

    def __iter__(self):
        for batch in self.batches:
            if len(batch) >= self.shard.world:
                yield batch[self.shard.rank::self.shard.world]


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
           workers: int = 0) -> "DeviceBatches":
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


# --------------------------------------------------------------------------------------------
# a binary task from two classes (the IBP convergence experiment)


@dataclass
class UnclippedBundle(DataBundle):
    """A :class:`DataBundle` whose L∞ box is not clipped to the data range: [x - ε, x + ε]
    (the perturbation set of Wang 2022's convergence analysis, Eq. 4.3), rounded outward like
    :meth:`DataBundle.eps_box` so that it contains the exact box."""

    def eps_box(self, x: torch.Tensor, eps: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, std = self._stats(x)
        if isinstance(eps, torch.Tensor):
            eps = eps.to(device=x.device, dtype=std.dtype)
            if eps.dim() == 1 and x.dim() == 4 and eps.shape[0] == x.shape[0]:
                eps = eps.view(-1, 1, 1, 1)
        elif eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        delta = eps / std
        slack = _outward(x.abs() + delta)  # rounded outward, as DataBundle.eps_box
        return x - delta - slack, x + delta + slack


def _labels(ds: Dataset) -> torch.Tensor:
    """Every label of a data set: its ``targets`` (torchvision) or tensors (TensorDataset), else
    read item by item."""
    if isinstance(ds, TensorDataset):
        return ds.tensors[1]
    targets = getattr(ds, "targets", None)
    if targets is not None:
        return torch.as_tensor(targets)
    return torch.tensor([int(ds[i][1]) for i in range(len(ds))])  # type: ignore[arg-type]


@dataclass
class TwoClasses(DataSource):
    """A binary task from two classes of another data set ``source`` (any :class:`DataSource`
    node: the digits by default; MNIST or any MNIST-format set with ``source._target_:
    fastcert.data.MNIST``), e.g. digits 2 vs 5 as in Sec. 4.3 of Wang 2022 (MNIST there).
    ``classes[0]`` becomes label 0 (y = -1) and ``classes[1]`` label 1 (y = +1); images keep the
    source's preprocessing (pixels in [0, 1]). ``evaluate_on="train"`` makes the test loader
    iterate the training set (unshuffled), since the thesis reports *training* errors;
    ``clip=false`` leaves the L∞ box unclipped, [x - ε, x + ε], as in its Eq. 4.3."""

    source: DataSource = field(default_factory=lambda: Digits())
    classes: list[int] = field(default_factory=lambda: [2, 5])
    evaluate_on: str = "test"
    clip: bool = True

    def __post_init__(self):
        super().__post_init__()
        if len(self.classes) != 2 or self.classes[0] == self.classes[1]:
            raise ValueError(f"data.classes={list(self.classes)}: name two different classes, "
                             f"e.g. data.classes=[2,5]")
        if self.evaluate_on not in ("test", "train"):
            raise ValueError(f"data.evaluate_on={self.evaluate_on!r}: choose test or train")

    @property
    def name(self) -> str:
        return f"{self.source.name}_{self.classes[0]}v{self.classes[1]}"

    def _binary(self, ds: Dataset, split: str) -> TensorDataset:
        """The examples of the two classes, in the source's order, relabelled 0 / 1."""
        labels = _labels(ds)
        for c in self.classes:
            if not (labels == c).any():
                raise ValueError(f"data.classes: class {c} has no {split} example in "
                                 f"{self.source.name}")
        keep = torch.nonzero((labels == self.classes[0]) | (labels == self.classes[1])).flatten()
        x = torch.stack([ds[i][0] for i in keep.tolist()])
        return TensorDataset(x, (labels[keep] == self.classes[1]).long())

    def splits(self, seed: int) -> DatasetSplits:
        inner = self.source.splits(seed)
        train = self._binary(inner.train, "training")
        test = train if self.evaluate_on == "train" else self._binary(inner.test, "test")
        return DatasetSplits(train, test, inner.input_shape, 2, inner.mean, inner.std)

    def load(self, seed: int = 0, device: torch.device | str | None = None,
             shard: Shard | None = None) -> DataBundle:
        bundle = super().load(seed, device, shard)
        if self.clip:
            return bundle
        return UnclippedBundle(**{f.name: getattr(bundle, f.name)
                                  for f in dataclasses.fields(bundle) if f.init})
