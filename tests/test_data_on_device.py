"""The on-device data path (fastcert.data.DeviceBatches, CropFlip, Shard), run here with the CPU
as the device (the same code as on CUDA): the DataLoader's example order, torchvision's
crop/flip by definition, reproducible epochs, shards that add up to the batch, and a resumed
run identical to an uninterrupted one."""
from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import TensorDataset

from fastcert.config import ConfigError, build_option
from fastcert.data import CropFlip, DeviceBatches, Shard
from fastcert.pipeline import run

from conftest import TINY


def _load(name: str, seed: int = 0, **settings):
    return build_option("data", name, settings).load(seed=seed)


def _epochs(loader, seed: int, epochs: int = 3):
    """The batches of ``epochs`` epochs, the generator reseeded and the loader wrapped in
    tqdm.auto as fit does."""
    from tqdm.auto import tqdm

    from fastcert.seeding import stream_seed

    out = []
    for epoch in range(epochs):
        loader.generator.manual_seed(stream_seed(seed, epoch))
        torch.manual_seed(stream_seed(seed, epoch))
        out.append([(x.clone(), y.clone()) for x, y in tqdm(loader, disable=True)])
    return out


def test_digits_on_device_gives_the_dataloaders_batches():
    """Without augmentation the on-device batches are the DataLoader's, example for example,
    in every epoch: same order (the generator's base-seed draw, then the permutation)."""
    a = _load("digits", on_device=True, batch_size=64)
    b = _load("digits", on_device=False, batch_size=64)
    assert isinstance(a.train, DeviceBatches) and not isinstance(b.train, DeviceBatches)
    assert len(a.train) == len(b.train) == 23
    for ea, eb in zip(_epochs(a.train, 0), _epochs(b.train, 0), strict=True):
        for (xa, ya), (xb, yb) in zip(ea, eb, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    for (xa, ya), (xb, yb) in zip(a.test, b.test, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert a.test.dataset is not None and len(a.test.dataset) == 360


def test_auto_uses_the_device_on_cuda_when_the_splits_fit(monkeypatch):
    source = build_option("data", "cifar10", {})
    assert source.on_device == "auto"
    assert not source.uses_device(60_000, (3, 32, 32), torch.device("cpu"))

    class Props:
        total_memory = 8 * 2**30

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props)
    cuda = torch.device("cuda", 0)
    assert source.uses_device(60_000, (3, 32, 32), cuda)           # 0.7 GB of 8 GB
    assert not source.uses_device(110_000, (3, 64, 64), cuda)      # TinyImageNet: 5.4 GB
    assert not build_option("data", "tinyimagenet", {}).uses_device(10, (3, 64, 64), cuda)
    assert build_option("data", "tinyimagenet", {"on_device": True}).uses_device(
        10**6, (3, 64, 64), torch.device("cpu"))
    with pytest.raises(ConfigError, match="data.on_device"):
        build_option("data", "digits", {"on_device": "sometimes"})


def test_cifar_on_device_holds_the_unaugmented_images(cifar_root, cifar_md5):
    """The split on the device is every image through the deterministic transforms
    (ToTensor, Normalize) exactly; the random crop and flip become the batches' CropFlip."""
    root, _, _ = cifar_root
    a = _load("cifar10", root=str(root), on_device=True, num_workers=0)
    assert a.train.augment == CropFlip(pad=4, flip_p=0.5)
    assert a.test.augment is None
    plain = _load("cifar10", root=str(root), augment=False, num_workers=0)
    xs = torch.stack([plain.train.dataset[i][0] for i in range(len(plain.train.dataset))])
    assert torch.equal(a.train.x, xs)
    assert torch.equal(a.test.x, torch.stack([x for x, _ in plain.test.dataset]))


def test_crop_flip_is_torchvisions_definition():
    """Each example equals torchvision's pad (edge) → crop at its offsets → horizontal flip."""
    import torchvision.transforms.functional as TF

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 9, 7, generator=g)
    aug = CropFlip(pad=3, flip_p=0.5)
    offsets, flips = aug.draw(64, torch.Generator().manual_seed(1))
    out = aug(x, offsets, flips)
    for b in range(64):
        padded = TF.pad(x[b], [3, 3, 3, 3], padding_mode="edge")
        want = TF.crop(padded, int(offsets[b, 0]), int(offsets[b, 1]), 9, 7)
        if flips[b]:
            want = TF.hflip(want)
        assert torch.equal(out[b], want), b
    assert flips.any() and not flips.all()


def test_crop_flip_statistics():
    """Offsets cover [0, 2·pad] uniformly (each value within 5 σ of n/9), flips ≈ 50 %."""
    n = 90_000
    offsets, flips = CropFlip(pad=4, flip_p=0.5).draw(n, torch.Generator().manual_seed(2))
    assert offsets.min() == 0 and offsets.max() == 8
    counts = torch.bincount(offsets.flatten(), minlength=9).double()
    expected = 2 * n / 9
    sigma = (2 * n * (1 / 9) * (8 / 9)) ** 0.5
    assert ((counts - expected).abs() < 5 * sigma).all(), counts
    assert abs(flips.double().mean().item() - 0.5) < 5 * (0.25 / n) ** 0.5
    none = CropFlip(pad=0, flip_p=0.0).draw(100, torch.Generator().manual_seed(3))
    assert not none[0].any() and not none[1].any()


def test_on_device_epochs_are_reproducible_and_differ_from_each_other(cifar_root, cifar_md5):
    root, _, _ = cifar_root
    a = _load("cifar10", root=str(root), on_device=True, batch_size=8, num_workers=0)
    b = _load("cifar10", root=str(root), on_device=True, batch_size=8, num_workers=0)
    ea, eb = _epochs(a.train, 5), _epochs(b.train, 5)
    for batches_a, batches_b in zip(ea, eb):
        for (xa, ya), (xb, yb) in zip(batches_a, batches_b, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(ea[0][0][0], ea[1][0][0])  # another epoch: another order/augmentation
    # augmentation changes pixels but never labels or the set of examples in an epoch
    labels = torch.cat([y for _, y in ea[0]]).sort().values
    assert torch.equal(labels, a.train.y.sort().values)


def test_unsupported_random_transform_is_refused_on_the_device():
    from torchvision import transforms as T

    from fastcert.data.on_device import _device_form

    class Images(TensorDataset):
        transform = T.Compose([T.RandomRotation(10), T.ToTensor()])

    with pytest.raises(ValueError, match="RandomRotation"):
        _device_form(Images(torch.zeros(2, 3, 4, 4)))


# ---- shards ----------------------------------------------------------------------------------


def test_shards_of_each_batch_add_up_to_the_batch():
    """Two ranks take disjoint halves of every global batch (DataLoader and on-device paths
    alike); a last batch with fewer examples than ranks is skipped; test blocks tile the
    test set in order."""
    settings = {"batch_size": 64, "test_batch_size": 100, "limit_train": 1000}
    whole = _load("digits", **settings)
    parts = [build_option("data", "digits", {**settings, "on_device": on}).load(
             0, shard=Shard(r, 2)) for on in (False, True) for r in (0, 1)]
    ref = _epochs(whole.train, 0, epochs=2)
    for path in (parts[:2], parts[2:]):
        got = [_epochs(p.train, 0, epochs=2) for p in path]
        for epoch in range(2):
            assert len(got[0][epoch]) == len(ref[epoch]) == 16
            for t, (x, y) in enumerate(ref[epoch]):
                (x0, y0), (x1, y1) = got[0][epoch][t], got[1][epoch][t]
                assert torch.equal(x0, x[0::2]) and torch.equal(x1, x[1::2])
                assert torch.equal(y0, y[0::2]) and torch.equal(y1, y[1::2])
        test = [torch.cat([y for _, y in p.test]) for p in path]   # 4 batches: 2 per rank
        assert [p.test.first_batch for p in path] == [0, 2]
        assert torch.equal(torch.cat(test), torch.cat([y for _, y in whole.test]))
    assert Shard(1, 3).batch_sizes(130, 64) == [64, 64]   # the last 2 < 3 ranks: skipped
    assert Shard(0, 2).block(10, 4) == (0, 0, 8) and Shard(1, 2).block(10, 4) == (2, 8, 10)


def test_on_device_shards_share_the_global_augmentation(cifar_root, cifar_md5):
    """Augmentation is drawn for the whole global batch, so two ranks together see exactly a
    one-process run's augmented batches."""
    root, _, _ = cifar_root
    whole = _load("cifar10", root=str(root), on_device=True, batch_size=8, num_workers=0)
    ranks = [build_option("data", "cifar10", {"root": str(root), "on_device": True,
                                              "batch_size": 8, "num_workers": 0}).load(
             0, shard=Shard(r, 2))
             for r in (0, 1)]
    ref = _epochs(whole.train, 0, epochs=1)[0]
    got = [_epochs(r.train, 0, epochs=1)[0] for r in ranks]
    for t, (x, _y) in enumerate(ref):
        assert torch.equal(got[0][t][0], x[0::2]) and torch.equal(got[1][t][0], x[1::2])


# ---- runs ------------------------------------------------------------------------------------


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_run_on_device_equals_the_dataloader_run_without_augmentation(compose, tmp_path):
    """digits: same batches, so the same training and results, example for example."""
    a = run(compose(TINY + ["data.on_device=true"]), tmp_path / "device")
    b = run(compose(TINY + ["data.on_device=false"]), tmp_path / "loader")
    for key in ("clean_acc", "pgd_acc", "ibp_verified_acc"):
        assert a[key] == b[key], key
    for ra, rb in zip(_records(tmp_path / "device"), _records(tmp_path / "loader"), strict=True):
        ra.pop("epoch_time_s"), rb.pop("epoch_time_s")
        assert ra == rb


def test_on_device_augmented_run_resumes_identically(compose, tmp_path, monkeypatch, cifar_root,
                                                     cifar_md5):
    """CIFAR-shaped data augmented on the device: interrupted mid-epoch and resumed, the run
    ends with the records and results of an uninterrupted one."""
    from test_resume import assert_resumes_identically

    root, _, _ = cifar_root
    assert_resumes_identically(compose, [
        "debug=smoke", "device=cpu", "data=cifar10", f"data.root={root}", "data.on_device=true",
        "data.num_workers=0", "data.batch_size=20", "data.limit_train=40", "data.limit_test=12",
        "model=cnn7", "model.width=0.125"], tmp_path, monkeypatch)
