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

Missing files raise :class:`DatasetNotFoundError` (a ``FileNotFoundError``) whose message names
the expected path and how to obtain the data. A new data set is a subclass of
:class:`DataSource` defining ``splits(seed)`` and a ``conf/data/<name>.yaml`` naming it.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass, field
from typing import Sequence
from urllib.error import URLError

import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

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

    train: DataLoader
    test: DataLoader
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

    def load(self, seed: int = 0) -> DataBundle:
        """Train/test loaders and the metadata of the data set."""
        splits = self.splits(int(seed))
        train_ds = _limit(splits.train, self.limit_train, seed, "limit_train")
        test_ds = _limit(splits.test, self.limit_test, seed + 1, "limit_test")
        common = dict(
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            # not persistent: workers are re-seeded every epoch from the loader's generator,
            # which the training loop reseeds from (seed, epoch), so a resumed run augments
            # identically
            persistent_workers=False,
        )
        train = DataLoader(train_ds, batch_size=self.batch_size, shuffle=True,
                           generator=torch.Generator().manual_seed(int(seed)), **common)
        test = DataLoader(test_ds, batch_size=self.test_batch_size or self.batch_size,
                          shuffle=False, **common)
        return DataBundle(
            train=train,
            test=test,
            input_shape=tuple(splits.input_shape),  # type: ignore[arg-type]
            num_classes=int(splits.num_classes),
            mean=torch.tensor(splits.mean, dtype=torch.float32),
            std=torch.tensor(splits.std, dtype=torch.float32),
            name=self.name,
        )


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
# a binary task from two classes (the IBP convergence experiment)


@dataclass
class UnclippedBundle(DataBundle):
    """A :class:`DataBundle` whose L∞ box is not clipped to the data range: [x - ε, x + ε]
    (the perturbation set of Wang 2022's convergence analysis, Eq. 4.3)."""

    def eps_box(self, x: torch.Tensor, eps: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, std = self._stats(x)
        if isinstance(eps, torch.Tensor):
            eps = eps.to(device=x.device, dtype=std.dtype)
            if eps.dim() == 1 and x.dim() == 4 and eps.shape[0] == x.shape[0]:
                eps = eps.view(-1, 1, 1, 1)
        elif eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        delta = eps / std
        return x - delta, x + delta


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

    def load(self, seed: int = 0) -> DataBundle:
        bundle = super().load(seed)
        if self.clip:
            return bundle
        return UnclippedBundle(**{f.name: getattr(bundle, f.name)
                                  for f in dataclasses.fields(bundle) if f.init})
