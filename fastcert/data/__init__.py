"""Datasets for certified training: one class per data set, ``conf/data/<name>.yaml`` naming it
(``_target_: fastcert.data.<Class>``) with its loader settings; ``.load(seed)`` gives a
:class:`DataBundle`.

Every loader yields *normalised* images ``x_n = (x - mean) / std`` where ``x`` is in pixel units
``[0, 1]``; the :class:`DataBundle` carries ``mean``/``std`` so that perturbation radii can stay in
pixel units (:meth:`DataBundle.eps_box` scales ε per channel by ``1/std`` and clamps the box to the
image range).

:class:`Digits`
    scikit-learn's copy of the UCI handwritten digits (1797 images, 1x8x8, 10 classes), shipped
    inside the scikit-learn wheel, so it works offline. Pixel values 0..16 are divided by 16. The
    split is a stratified 80/20 split (``sklearn.model_selection.train_test_split(test_size=0.2,
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

Validation split (``val_size``, ``val_seed``, every data set): ``val_size`` examples (an int, or
a fraction in (0, 1) of the training set) are held out of training, drawn with ``val_seed``
(default 0, independent of the run's seed), before ``limit_train`` draws from the rest; they go
through the test-time transform (no augmentation) and ``DataBundle.val`` is their loader (None
without a split). A run evaluates its final model on them as on the test set (``val_<key>`` in
results.json).

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

The modules: ``bundle`` (the box maths), ``source`` (:class:`DataSource`, loaders), ``sources``
(the five data sets), ``errors`` (missing files), ``shard`` (data-parallel ranks), ``on_device``
(batches on the device), ``two_classes`` (the binary task).
"""
from fastcert.data.bundle import DataBundle, UnclippedBundle
from fastcert.data.errors import DatasetNotFoundError
from fastcert.data.on_device import CropFlip, DeviceBatches
from fastcert.data.shard import Shard
from fastcert.data.source import DatasetSplits, DataSource
from fastcert.data.sources import (
    CIFAR10,
    CIFAR10_MEAN,
    CIFAR10_STD,
    MNIST,
    TINYIMAGENET_MEAN,
    TINYIMAGENET_STD,
    Digits,
    FashionMNIST,
    TinyImageNet,
)
from fastcert.data.two_classes import TwoClasses

__all__ = [
    "DataBundle",
    "DataSource",
    "DatasetNotFoundError",
    "DatasetSplits",
    "Digits",
    "MNIST",
    "FashionMNIST",
    "CIFAR10",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "TinyImageNet",
    "TINYIMAGENET_MEAN",
    "TINYIMAGENET_STD",
    "CropFlip",
    "DeviceBatches",
    "Shard",
    "TwoClasses",
    "UnclippedBundle",
]
