"""The data sets: scikit-learn's digits, MNIST, Fashion-MNIST (its idx files read where they
lie), CIFAR-10 and TinyImageNet (see :mod:`fastcert.data` for each one's preprocessing)."""
from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.error import URLError

import torch
from torch.utils.data import TensorDataset

from fastcert.data.errors import load_torchvision, not_found
from fastcert.data.source import DatasetSplits, DataSource, transforms, with_transform


@dataclass
class Digits(DataSource):
    """scikit-learn's UCI digits (see :mod:`fastcert.data`); ``split_seed`` fixes the
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
    """torchvision's MNIST (see :mod:`fastcert.data`)."""

    def splits(self, seed: int) -> DatasetSplits:
        from torchvision.datasets import MNIST as TorchMNIST

        mean, std = (0.0,), (1.0,)
        tf, _ = transforms(mean, std, [])
        path = os.path.join(self.root, "MNIST", "raw")
        kw = dict(name="MNIST", root=self.root, path=path, expected=_MNIST_FILES,
                  download=self.download, transform=tf)
        train = load_torchvision(TorchMNIST, train=True, **kw)
        test = load_torchvision(TorchMNIST, train=False, **{**kw, "download": False})
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
        """torchvision's class, its data read from ``files`` instead of
        ``<root>/FashionMNIST/raw``."""

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
    """Fashion-MNIST through torchvision (see :mod:`fastcert.data`)."""

    def splits(self, seed: int) -> DatasetSplits:
        mean, std = (0.0,), (1.0,)
        tf, _ = transforms(mean, std, [])
        raw = os.path.join(self.root, "FashionMNIST", "raw")
        files = _idx_files([raw, self.root], _MNIST_FILES)
        if files is None and not self.download:
            raise not_found("Fashion-MNIST", self.root, _FASHION_HOWTO,
                             f"Looked in '{raw}' and '{self.root}' for "
                             f"{', '.join(_MNIST_FILES)} (each may be gzipped: .gz).")
        try:
            train = _fashion_dataset(files, self.root, True, self.download, tf)
            test = _fashion_dataset(files, self.root, False, False, tf)
        except (RuntimeError, URLError) as e:
            raise not_found("Fashion-MNIST", raw, _FASHION_HOWTO,
                             f"Downloading failed ({' '.join(str(e).split())[:400]}).") from e
        return DatasetSplits(train, test, (1, 28, 28), 10, mean, std)


CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)


@dataclass
class CIFAR10(DataSource):
    """torchvision's CIFAR-10 (see :mod:`fastcert.data`): normalised with ``mean``/``std``,
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
        tf_train, tf_test = transforms(mean, std, aug)
        path = os.path.join(self.root, TorchCIFAR10.base_folder)
        expected = ([f for f, _ in TorchCIFAR10.train_list + TorchCIFAR10.test_list]
                    + [TorchCIFAR10.meta["filename"]])
        kw = dict(name="CIFAR-10", root=self.root, path=path, expected=expected)
        train = load_torchvision(TorchCIFAR10, train=True, download=self.download,
                                  transform=tf_train, **kw)
        test = load_torchvision(TorchCIFAR10, train=False, download=False, transform=tf_test,
                                 **kw)
        return DatasetSplits(train, test, (3, 32, 32), 10, mean, std,
                             with_transform(train, tf_test) if aug else None)


TINYIMAGENET_MEAN = (0.4802, 0.4481, 0.3975)
TINYIMAGENET_STD = (0.2302, 0.2265, 0.2262)
TINYIMAGENET_DIR = "tiny-imagenet-200"


def _tinyimagenet_howto(root: str) -> str:
    return (
        f"run 'python -m fastcert.prep_tinyimagenet --root {root}' on a machine with network "
        f"access, "
        f"or download tiny-imagenet-200.zip elsewhere and run "
        f"'python -m fastcert.prep_tinyimagenet --root {root} --zip PATH/TO/tiny-imagenet-200.zip'."
    )


@dataclass
class TinyImageNet(DataSource):
    """TinyImageNet through ImageFolder (see :mod:`fastcert.data`)."""

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
                raise not_found("TinyImageNet", base, _tinyimagenet_howto(root),
                                 f"Downloading failed ({e}).") from e
        for d in (train_dir, val_dir):
            if not os.path.isdir(d):
                raise not_found("TinyImageNet", base, _tinyimagenet_howto(root),
                                 f"Missing folder '{d}'.")
        val_images = os.path.join(val_dir, "images")
        if os.path.isdir(val_images) and any(f.lower().endswith(".jpeg")
                                             for f in os.listdir(val_images)):
            raise not_found(
                "TinyImageNet (validation set in class folders)",
                val_dir,
                _tinyimagenet_howto(root),
                f"'{val_images}' still holds the flat validation images: the validation set has "
                "not been reorganised into one folder per class.",
            )
        aug = ([T.RandomCrop(64, padding=4, padding_mode="edge"), T.RandomHorizontalFlip()]
               if self.augment else [])
        tf_train, tf_test = transforms(TINYIMAGENET_MEAN, TINYIMAGENET_STD, aug)
        try:
            train = ImageFolder(train_dir, transform=tf_train)
            test = ImageFolder(val_dir, transform=tf_test)
        except FileNotFoundError as e:  # no class folders / a class folder without images
            raise not_found("TinyImageNet", base, _tinyimagenet_howto(root), str(e)) from e
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
                             TINYIMAGENET_STD, with_transform(train, tf_test) if aug else None)
