"""fastcert.data / fastcert.prep_tinyimagenet on real loaders over small files in the true formats.

MNIST: raw IDX files (uncompressed, what torchvision reads). CIFAR-10: the python pickles;
torchvision checks every file's MD5 against a constant table, so the CIFAR tests replace that table
(``CIFAR10.train_list`` / ``test_list`` / ``meta``) with the MD5s of the generated files via
``monkeypatch`` - the reading code is untouched, and a test checks that without the patch the
same files are rejected. TinyImageNet: the zip's layout (``train/<wnid>/images``, flat
``val/images`` + ``val_annotations.txt``), reorganised by ``reorganize_val``.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastcert import prep_tinyimagenet
from fastcert.config import ConfigError, build_option, instantiate, option_node, options
from fastcert.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    DataBundle,
    DatasetNotFoundError,
    DatasetSplits,
    DataSource,
)

from conftest import WNIDS, make_tiny_imagenet, write_idx_set


def create_data(name: str, seed: int = 0, **settings) -> DataBundle:
    """``data=<name>`` with ``settings`` overriding its keys, loaded with ``seed``."""
    return build_option("data", name, settings).load(seed=seed)


# ------------------------------------------------------------------------------- fixtures


# ------------------------------------------------------------------------------- registry / eps


def test_options_and_unknown_name():
    assert {"digits", "mnist", "fashion_mnist", "cifar10", "tinyimagenet"} <= set(options("data"))
    with pytest.raises(ConfigError) as e:
        create_data("svhn")
    for n in ("digits", "mnist", "cifar10", "tinyimagenet"):
        assert n in str(e.value)


class _Toy(DataSource):
    def splits(self, seed):
        from torch.utils.data import TensorDataset

        ds = TensorDataset(torch.rand(10, 1, 2, 2), torch.zeros(10, dtype=torch.long))
        return DatasetSplits(ds, ds, (1, 2, 2), 2, (0.5,), (0.25,))


def test_a_new_data_set_is_a_data_source_subclass_named_by_target():
    b = instantiate({"_target_": f"{__name__}._Toy", "batch_size": 4}, "data").load(seed=0)
    assert b.num_classes == 2 and len(b.train) == 3 and b.train.batch_size == 4


def _bundle(mean, std) -> DataBundle:
    return DataBundle(None, None, (len(mean), 4, 4), 10, torch.tensor(mean), torch.tensor(std), "x")  # type: ignore[arg-type]


def test_eps_box_scaling_and_clamping():
    b = _bundle(CIFAR10_MEAN, CIFAR10_STD)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 4, 4, generator=g)
    x[0, :, 0, 0] = 0.0
    x[0, :, 0, 1] = 1.0
    xn = b.from_pixels(x)
    assert torch.allclose(b.to_pixels(xn), x, atol=1e-6)
    eps = 8 / 255
    lo, hi = b.eps_box(xn, eps)
    assert lo.shape == hi.shape == xn.shape
    assert (lo <= xn + 1e-6).all() and (xn <= hi + 1e-6).all()
    # in pixel units the box is exactly the clamped L-inf ball
    assert torch.allclose(b.to_pixels(lo), (x - eps).clamp(0, 1), atol=1e-5)
    assert torch.allclose(b.to_pixels(hi), (x + eps).clamp(0, 1), atol=1e-5)
    # interior points: width 2*eps/std per channel
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1).expand_as(x)
    inside = (x > eps) & (x < 1 - eps)
    assert inside.sum() > 100
    assert torch.allclose((hi - lo)[inside], (2 * eps / std)[inside], atol=1e-5)
    assert (torch.allclose(lo[0, :, 0, 0], b.x_min().flatten())
            and torch.allclose(hi[0, :, 0, 1], b.x_max().flatten()))
    # one radius per example; eps = 0 gives a point; negative eps is rejected
    lo2, hi2 = b.eps_box(xn, torch.tensor([0.0] * 8 + [eps] * 8))
    assert (lo2[:8] <= xn[:8]).all() and (hi2[:8] >= xn[:8]).all()  # rounded outward
    assert torch.allclose(lo2[:8], xn[:8], rtol=0, atol=1e-6)
    assert torch.allclose(hi2[:8], xn[:8], rtol=0, atol=1e-6)
    assert torch.allclose(lo2[8:], lo[8:]) and torch.allclose(hi2[8:], hi[8:])
    with pytest.raises(ValueError):
        b.eps_box(xn, -0.1)
    # pixel-unit data (mean 0, std 1): box = clamp(x +- eps, 0, 1)
    u = _bundle((0.0,), (1.0,))
    x1 = torch.rand(4, 1, 4, 4, generator=g)
    lo, hi = u.eps_box(x1, 0.4)
    assert torch.allclose(lo, (x1 - 0.4).clamp(min=0), rtol=0, atol=1e-6)
    assert torch.allclose(hi, (x1 + 0.4).clamp(max=1), rtol=0, atol=1e-6)
    assert float(lo.min()) == 0.0 and float(hi.max()) == 1.0   # the range limits stay exact


# ------------------------------------------------------------------------------- digits


def test_digits_split_is_fixed_whatever_the_seed():
    """The run's seed changes the training (order, init), never the split: "± std over seeds"
    measures training alone. ``data.split_seed`` chooses another split."""
    a = create_data("digits", seed=0)
    b = create_data("digits", seed=7)
    other = create_data("digits", seed=0, split_seed=1)
    for part in ("train", "test"):
        for ta, tb in zip(getattr(a, part).dataset.tensors, getattr(b, part).dataset.tensors):
            assert torch.equal(ta, tb)
    assert not torch.equal(a.test.dataset.tensors[0], other.test.dataset.tensors[0])
    assert build_option("data", "digits").split_seed == 0


def test_digits_split_deterministic_and_stratified():
    a = create_data("digits", batch_size=64, test_batch_size=512, seed=0)
    b = create_data("digits", batch_size=64, test_batch_size=512, seed=0)
    c = create_data("digits", batch_size=64, test_batch_size=512, seed=0, split_seed=1)
    assert a.input_shape == (1, 8, 8) and a.num_classes == 10 and a.name == "digits"
    xtr, ytr = a.train.dataset.tensors
    xte, yte = a.test.dataset.tensors
    assert len(ytr) == 1437 and len(yte) == 360 and len(ytr) + len(yte) == 1797
    assert xtr.shape == (1437, 1, 8, 8) and xtr.dtype == torch.float32
    assert 0.0 <= float(xtr.min()) and float(xtr.max()) <= 1.0 and float(xtr.max()) == 1.0
    assert set(yte.tolist()) == set(range(10))
    # stratified: every class has ~20% of its images in the test set
    counts_te = torch.bincount(yte, minlength=10)
    counts_all = torch.bincount(torch.cat([ytr, yte]), minlength=10)
    assert ((counts_te.float() / counts_all.float() - 0.2).abs() < 0.02).all()
    assert (torch.equal(xte, b.test.dataset.tensors[0])
            and torch.equal(yte, b.test.dataset.tensors[1]))
    assert not torch.equal(xte, c.test.dataset.tensors[0])
    # train + test is a partition of the 1797 images (same multiset of rows)
    from sklearn.datasets import load_digits

    images = (load_digits().images.reshape(-1, 64) / 16.0).astype(np.float32)
    all_rows = sorted(tuple(r) for r in images.tolist())
    split_rows = sorted(tuple(r) for r in torch.cat([xtr, xte]).view(-1, 64).tolist())
    assert split_rows == all_rows
    # reproducible shuffling, normalisation is the identity
    xb1, yb1 = next(iter(a.train))
    xb2, yb2 = next(iter(b.train))
    assert torch.equal(xb1, xb2) and torch.equal(yb1, yb2) and xb1.shape == (64, 1, 8, 8)
    assert torch.equal(a.mean, torch.zeros(1)) and torch.equal(a.std, torch.ones(1))
    xt, _ = next(iter(a.test))
    assert xt.shape == (360, 1, 8, 8) and torch.equal(xt, xte)


def test_limits():
    d = create_data("digits", limit_train=100, limit_test=30, batch_size=32, seed=3)
    assert len(d.train.dataset) == 100 and len(d.test.dataset) == 30
    d2 = create_data("digits", limit_train=100, limit_test=30, batch_size=32, seed=3)
    assert d.train.dataset.indices == d2.train.dataset.indices
    assert len(create_data("digits", limit_train=10**6).train.dataset) == 1437
    with pytest.raises(ConfigError, match="data.limit_train=0: must be a positive integer"):
        create_data("digits", limit_train=0)


# ------------------------------------------------------------------------------- MNIST


def test_mnist_real_loader(mnist_root):
    root, data = mnist_root
    b = create_data("mnist", root=str(root), batch_size=16, test_batch_size=8)
    assert b.input_shape == (1, 28, 28) and b.num_classes == 10
    assert len(b.train.dataset) == 60 and len(b.test.dataset) == 20
    x, y = next(iter(b.train))
    assert x.shape == (16, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.long
    assert 0 <= int(y.min()) and int(y.max()) < 10
    xt, yt = next(iter(b.test))  # unshuffled: exact pixels / 255
    ref_x, ref_y = data["t10k"]
    assert torch.allclose(xt[:, 0], torch.tensor(ref_x[:8], dtype=torch.float32) / 255.0)
    assert yt.tolist() == ref_y[:8].tolist()
    lo, hi = b.eps_box(xt, 0.4)
    assert float(lo.min()) >= 0.0 and float(hi.max()) <= 1.0


def test_mnist_missing(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        create_data("mnist", root=str(tmp_path))
    msg = str(e.value)
    assert str(tmp_path / "MNIST" / "raw") in msg and "data.download=true" in msg
    assert isinstance(e.value, FileNotFoundError)


# ------------------------------------------------------------------------------- Fashion-MNIST


def _fashion_files(folder: Path, gzipped: bool) -> dict:
    """The four Fashion-MNIST idx files (small: 30 train / 12 test)."""
    return write_idx_set(folder, 30, 12, seed=3, gzipped=gzipped)


@pytest.mark.parametrize("layout", ["debian_gz", "torchvision_raw", "torchvision_raw_gz"])
def test_fashion_mnist_reads_the_idx_files_where_they_lie(tmp_path, layout):
    """``data.root`` may hold the gzipped files themselves (apt-get install
    dataset-fashion-mnist: /usr/share/datasets/fashion-mnist) or torchvision's
    FashionMNIST/raw folder; torchvision's readers and dataset class do the rest."""
    folder = tmp_path if layout == "debian_gz" else tmp_path / "FashionMNIST" / "raw"
    data = _fashion_files(folder, gzipped=layout.endswith("gz"))
    before = sorted(p.name for p in tmp_path.rglob("*"))
    b = create_data("fashion_mnist", root=str(tmp_path), batch_size=8, test_batch_size=12,
                    num_workers=0)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written there
    from torchvision.datasets import FashionMNIST as TorchFashionMNIST

    assert (isinstance(b.train.dataset, TorchFashionMNIST)
            and b.train.dataset.classes[0] == "T-shirt/top")
    assert b.input_shape == (1, 28, 28) and b.num_classes == 10 and b.name == "fashionmnist"
    assert len(b.train.dataset) == 30 and len(b.test.dataset) == 12
    xt, yt = next(iter(b.test))  # unshuffled: exact pixels / 255
    ref_x, ref_y = data["t10k"]
    assert torch.equal(xt[:, 0], torch.tensor(ref_x, dtype=torch.float32) / 255.0)
    assert yt.tolist() == ref_y.tolist()
    assert torch.equal(b.train.dataset.targets, torch.tensor(data["train"][1], dtype=torch.long))
    assert torch.equal(b.mean, torch.zeros(1)) and torch.equal(b.std, torch.ones(1))


def test_fashion_mnist_missing_says_how_to_get_it(tmp_path):
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"")  # one of four is not enough
    with pytest.raises(DatasetNotFoundError) as e:
        create_data("fashion_mnist", root=str(tmp_path))
    msg = str(e.value)
    assert "apt-get install dataset-fashion-mnist" in msg and "data.download=true" in msg
    assert str(tmp_path / "FashionMNIST" / "raw") in msg and "t10k-labels-idx1-ubyte" in msg


DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not DEBIAN_FASHION.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_from_the_debian_package():
    """The real data set as Debian installs it: 60,000 / 10,000 balanced images."""
    b = create_data("fashion_mnist", root=str(DEBIAN_FASHION), num_workers=0)
    assert len(b.train.dataset) == 60000 and len(b.test.dataset) == 10000
    assert torch.bincount(b.train.dataset.targets).tolist() == [6000] * 10
    assert torch.bincount(b.test.dataset.targets).tolist() == [1000] * 10


# ------------------------------------------------------------------------------- CIFAR-10


def test_cifar10_real_loader(cifar_root, cifar_md5):
    root, batches, _ = cifar_root
    b = create_data("cifar10", root=str(root), batch_size=10, test_batch_size=12, augment=False)
    assert b.input_shape == (3, 32, 32) and b.num_classes == 10
    assert len(b.train.dataset) == 40 and len(b.test.dataset) == 12
    assert (torch.allclose(b.mean, torch.tensor(CIFAR10_MEAN))
            and torch.allclose(b.std, torch.tensor(CIFAR10_STD)))
    xt, yt = next(iter(b.test))
    ref_x, ref_y = batches["test_batch"]
    ref = torch.tensor(ref_x, dtype=torch.float32).view(-1, 3, 32, 32) / 255.0
    expected = ((ref - torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1))
                / torch.tensor(CIFAR10_STD).view(1, 3, 1, 1))
    assert xt.shape == (12, 3, 32, 32) and yt.tolist() == ref_y
    assert torch.allclose(xt, expected, atol=1e-5)
    assert torch.allclose(b.to_pixels(xt), ref, atol=1e-5)
    lo, hi = b.eps_box(xt, 8 / 255)
    assert (lo >= b.x_min(xt) - 1e-6).all() and (hi <= b.x_max(xt) + 1e-6).all()
    # augmented training loader: shapes, labels, values within the normalised pixel range
    ba = create_data("cifar10", root=str(root), batch_size=16, augment=True, seed=0)
    torch.manual_seed(0)  # num_workers=0: the transforms draw from the global RNG
    x, y = next(iter(ba.train))
    assert x.shape == (16, 3, 32, 32) and 0 <= int(y.min()) and int(y.max()) < 10
    assert (x >= ba.x_min(x) - 1e-5).all() and (x <= ba.x_max(x) + 1e-5).all()
    plain = create_data("cifar10", root=str(root), batch_size=16, augment=False, seed=0)
    plain_x, plain_y = next(iter(plain.train))
    # same order, augmented pixels
    assert torch.equal(plain_y, y) and not torch.allclose(plain_x, x)
    bb = create_data("cifar10", root=str(root), batch_size=16, augment=True, seed=0)
    torch.manual_seed(0)
    x2, y2 = next(iter(bb.train))
    assert torch.equal(y, y2) and torch.equal(x, x2)  # seeded order and augmentation


def test_cifar10_normalisation_and_crop_padding_are_fields(cifar_root, cifar_md5):
    """Shi et al.'s released code normalises CIFAR-10 with std (0.2023, 0.1994, 0.2010) and
    pads random crops by 2 (edge): data fields its presets set (the defaults stay)."""
    root, batches, _ = cifar_root
    shi_std = (0.2023, 0.1994, 0.2010)
    b = create_data("cifar10", root=str(root), std=list(shi_std), test_batch_size=12)
    assert torch.allclose(b.std, torch.tensor(shi_std))
    xt, _ = next(iter(b.test))
    ref = torch.tensor(batches["test_batch"][0], dtype=torch.float32).view(-1, 3, 32, 32) / 255.0
    expected = ((ref - torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1))
                / torch.tensor(shi_std).view(1, 3, 1, 1))
    assert torch.allclose(xt, expected, atol=1e-5)
    assert build_option("data", "cifar10").crop_padding == 4

    def crop_offsets(padding):
        """Per augmented training image, the offsets (i, j) at which it is a crop of its
        original edge-padded by ``padding`` (or of that padded image's mirror)."""
        kw = dict(root=str(root), batch_size=40, seed=0, num_workers=0)
        aug = create_data("cifar10", crop_padding=padding, **kw)
        torch.manual_seed(0)  # num_workers=0: the transforms draw from the global RNG
        x, _ = next(iter(aug.train))
        plain, _ = next(iter(create_data("cifar10", augment=False, **kw).train))  # same order
        x, plain = aug.to_pixels(x), aug.to_pixels(plain)
        padded = torch.nn.functional.pad(plain, (padding,) * 4, mode="replicate")
        return [{(i, j) for i in range(2 * padding + 1) for j in range(2 * padding + 1)
                 for img in (padded[k], padded[k].flip(-1))
                 if torch.allclose(img[:, i:i + 32, j:j + 32], x[k], atol=1e-5)}
                for k in range(len(x))]

    assert all(crop_offsets(0))                            # flips only
    shifts = crop_offsets(2)
    assert all(shifts)                                     # every crop within 2 pixels
    assert any((2, 2) not in hits for hits in shifts)      # and some are shifted


def test_cifar10_md5_is_checked(cifar_root):
    """Without the patched table, torchvision's real MD5 check rejects the generated files."""
    root, _, _ = cifar_root
    with pytest.raises(DatasetNotFoundError, match="MD5"):
        create_data("cifar10", root=str(root))


def test_cifar10_missing(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        create_data("cifar10", root=str(tmp_path))
    msg = str(e.value)
    assert (str(tmp_path / "cifar-10-batches-py") in msg and "data.download=true" in msg
            and "data_batch_1" in msg)


# ------------------------------------------------------------------------------- TinyImageNet


def test_tinyimagenet_reorganize_and_load(tmp_path):
    base = tmp_path / "tiny-imagenet-200"
    labels = make_tiny_imagenet(base)
    # not reorganised yet: clear error pointing at the prep command
    with pytest.raises(DatasetNotFoundError, match="prep_tinyimagenet"):
        create_data("tinyimagenet", root=str(tmp_path))
    assert prep_tinyimagenet.reorganize_val(base) == len(labels)
    assert prep_tinyimagenet.reorganize_val(base) == 0  # idempotent
    assert prep_tinyimagenet.reorganize_val(tmp_path) == 0  # the data root is accepted too
    assert not (base / "val" / "images").exists()
    for fname, wnid in labels.items():
        assert (base / "val" / wnid / fname).is_file()

    with pytest.warns(UserWarning, match="not 200"):
        b = create_data("tinyimagenet", root=str(tmp_path), batch_size=5, test_batch_size=6,
                        augment=True)
    assert b.input_shape == (3, 64, 64) and b.num_classes == len(WNIDS)
    assert b.train.dataset.classes == b.test.dataset.classes == sorted(WNIDS)
    assert len(b.train.dataset) == 12 and len(b.test.dataset) == 6
    x, y = next(iter(b.train))
    assert x.shape == (5, 3, 64, 64) and 0 <= int(y.min()) and int(y.max()) < len(WNIDS)
    xt, yt = next(iter(b.test))
    assert xt.shape == (6, 3, 64, 64)  # includes the grayscale JPEG, converted to RGB
    # val labels follow the annotations, with train's class indices
    c2i = b.train.dataset.class_to_idx
    for (path, label) in b.test.dataset.samples:
        assert label == c2i[labels[Path(path).name]]
    # normalisation: un-normalising the (unaugmented) val images gives the JPEG pixels
    ref = torch.tensor(np.asarray(Image.open(b.test.dataset.samples[1][0]).convert("RGB")),
                       dtype=torch.float32)
    assert torch.allclose(b.to_pixels(xt[1]), ref.permute(2, 0, 1) / 255.0, atol=1e-5)


def test_tinyimagenet_class_mismatch(tmp_path):
    base = tmp_path / "tiny-imagenet-200"
    make_tiny_imagenet(base)
    prep_tinyimagenet.reorganize_val(base)
    (base / "train" / "n99999999" / "images").mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(base / "train" / "n99999999" / "images" / "a.JPEG")
    with pytest.raises(ValueError, match="n99999999"):
        create_data("tinyimagenet", root=str(tmp_path))


def test_tinyimagenet_missing(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        create_data("tinyimagenet", root=str(tmp_path))
    msg = str(e.value)
    assert str(tmp_path / "tiny-imagenet-200") in msg
    assert "python -m fastcert.prep_tinyimagenet" in msg and "--zip" in msg


def test_prep_from_zip_idempotent(tmp_path, capsys):
    src = tmp_path / "src"
    labels = make_tiny_imagenet(src / "tiny-imagenet-200")
    zpath = tmp_path / "tiny-imagenet-200.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for p in sorted((src).rglob("*")):
            zf.write(p, p.relative_to(src).as_posix())
    root = tmp_path / "data"
    assert prep_tinyimagenet.main(["--root", str(root), "--zip", str(zpath)]) == 0
    assert prep_tinyimagenet.main(["--root", str(root), "--zip", str(zpath)]) == 0
    for fname, wnid in labels.items():
        assert (root / "tiny-imagenet-200" / "val" / wnid / fname).is_file()
    assert "moved 0 validation" in capsys.readouterr().out


def test_prep_download_without_network(tmp_path, capsys):
    # port 9 (discard) on localhost: refused at once, like a machine without network
    rc = prep_tinyimagenet.main(["--root", str(tmp_path), "--url", "http://127.0.0.1:9/tiny-imagenet-200.zip"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "could not download" in err and "--zip" in err
    assert not list(tmp_path.glob("*.part"))


# ------------------------------------------------------------------------------- configs


@pytest.mark.parametrize(
    "name,eps,bs",
    [("digits", 0.1, 64), ("mnist", 0.4, 256), ("fashion_mnist", 0.1, 256),
     ("cifar10", 8 / 255, 128), ("tinyimagenet", 1 / 255, 128)],
)
def test_yaml_configs(name, eps, bs):
    node = option_node("data", name)
    assert node["name"] == name and node["_target_"].startswith("fastcert.data.")
    source = build_option("data", name)
    assert isinstance(source, DataSource)
    assert source.eps == pytest.approx(eps, rel=1e-12) and source.eps_max == 1.0
    assert source.batch_size == bs and source.download is False
    if name == "digits":
        b = source.load(seed=0)
        assert b.train.batch_size == 64 and b.test.batch_size == 512


def test_worker_processes():
    a = create_data("digits", batch_size=128, num_workers=1, seed=5)
    b = create_data("digits", batch_size=128, num_workers=1, seed=5)
    ya = torch.cat([y for _, y in a.train])
    yb = torch.cat([y for _, y in b.train])
    assert torch.equal(ya, yb) and len(ya) == 1437


# ------------------------------------------------------------------------------- eps box, exactly


def _exact_box(x: torch.Tensor, eps: float, mean, std):
    """The box of :meth:`DataBundle.eps_box` in float64 (exact to ~1e-16) around the float32
    inputs: [max(x - eps/std, -mean/std), min(x + eps/std, (1-mean)/std)]."""
    m = torch.tensor(mean, dtype=torch.float64).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float64).view(-1, 1, 1)
    x = x.double()
    return torch.maximum(x - eps / s, -m / s), torch.minimum(x + eps / s, (1 - m) / s)


@pytest.mark.parametrize("eps", [0.0, 1 / 255, 2 / 255, 8 / 255, 0.1, 0.3])
def test_eps_box_contains_the_exact_box(cifar_root, cifar_md5, tiny_root, eps):
    """float32 rounding left the box up to 2e-7 inside the exact one on about half the
    coordinates (CIFAR-10 / TinyImageNet statistics); rounded outward, it always contains it,
    for the real loaders' inputs (every pixel value 0..255 in every channel), barely widened."""
    from fastcert.data import TINYIMAGENET_MEAN, TINYIMAGENET_STD

    root, _, _ = cifar_root
    cifar = create_data("cifar10", root=str(root), test_batch_size=12, augment=False)
    tiny = create_data("tinyimagenet", root=str(tiny_root), test_batch_size=6, augment=False)
    levels = torch.arange(256, dtype=torch.float32).view(1, 1, 16, 16).expand(1, 3, 16, 16) / 255
    for bundle, stats in ((cifar, (CIFAR10_MEAN, CIFAR10_STD)),
                          (tiny, (TINYIMAGENET_MEAN, TINYIMAGENET_STD))):
        x = torch.cat([next(iter(bundle.test))[0][..., :16, :16], bundle.from_pixels(levels)])
        lo, hi = bundle.eps_box(x, eps)
        assert lo.dtype == hi.dtype == torch.float32
        for mean, std in (stats, (bundle.mean.tolist(), bundle.std.tolist())):
            exact_lo, exact_hi = _exact_box(x, eps, mean, std)
            inside = (lo.double() > exact_lo) | (hi.double() < exact_hi)
            assert not inside.any(), (f"{bundle.name} eps={eps}: {int(inside.sum())} of "
                                      f"{inside.numel()} coordinates inside the exact box")
            # widened by at most 2^-20 (|x| + eps/std): 16 units in float32's last place
            scale = 2.0**-20 * (x.double().abs() + eps / torch.tensor(std).double().view(-1, 1, 1))
            assert ((exact_lo - lo.double() <= scale).all()
                    and (hi.double() - exact_hi <= scale).all())
