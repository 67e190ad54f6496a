"""The validation split (``data.val_size``, ``data.val_seed``): held out of the training set,
the same for every run seed, through the test-time transform, on every loading path (DataLoader,
on the device, data-parallel shards, limit_train, the two-class task); evaluated at the end of a
run with the test set's evaluation, the test loader untouched before that."""
from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import Subset

from fastcert.config import ConfigError, build_option
from fastcert.data import DeviceBatches, Shard
from fastcert.pipeline import run

from conftest import TINY


def _load(name: str, seed: int = 0, shard=None, **settings):
    return build_option("data", name, settings).load(seed=seed, shard=shard)


def _base_indices(ds) -> list[int]:
    """The indices of ``ds``'s examples in the data set under its chain of Subsets."""
    if not isinstance(ds, Subset):
        return list(range(len(ds)))
    inner = _base_indices(ds.dataset)
    return [inner[i] for i in ds.indices]


def _examples(loader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


@pytest.mark.parametrize("val_size,n_val", [(100, 100), (0.25, 359)])
def test_held_out_examples_are_disjoint_from_training(val_size, n_val):
    d = _load("digits", val_size=val_size)
    train, val = _base_indices(d.train.dataset), _base_indices(d.val.dataset)
    assert len(val) == n_val and len(train) == 1437 - n_val
    assert not set(train) & set(val) and sorted(train + val) == list(range(1437))
    assert _load("digits").val is None  # val_size 0: no split, the whole training set
    assert len(_load("digits").train.dataset) == 1437


def test_the_split_is_the_same_for_every_run_seed_and_follows_val_seed():
    a, b = _load("digits", seed=0, val_size=50), _load("digits", seed=7, val_size=50)
    assert _base_indices(a.val.dataset) == _base_indices(b.val.dataset)
    assert torch.equal(_examples(a.val)[0], _examples(b.val)[0])
    c = _load("digits", seed=0, val_size=50, val_seed=1)
    assert _base_indices(c.val.dataset) != _base_indices(a.val.dataset)


def test_limit_train_draws_from_the_rest_and_keeps_the_split():
    a = _load("digits", seed=0, val_size=50, limit_train=200)
    b = _load("digits", seed=3, val_size=50, limit_train=200)
    assert _base_indices(a.val.dataset) == _base_indices(b.val.dataset)
    for d in (a, b):
        train = _base_indices(d.train.dataset)
        assert len(train) == 200 and not set(train) & set(_base_indices(d.val.dataset))
    assert _base_indices(a.train.dataset) != _base_indices(b.train.dataset)


@pytest.mark.parametrize("value", [-1, 1.5, "a", True])
def test_a_bad_val_size_is_refused_naming_the_key(value):
    with pytest.raises(ConfigError, match="data.val_size"):
        build_option("data", "digits", {"val_size": value})
    with pytest.raises(ConfigError, match="data.val_size=1437"):
        _load("digits", val_size=1437)


def test_validation_examples_go_through_the_test_time_transform(cifar_root, cifar_md5):
    """CIFAR-10 with augmentation: every pass over the validation split gives the same images,
    those of the training set read without crop and flip."""
    root, batches, _ = cifar_root
    d = _load("cifar10", root=str(root), val_size=10, num_workers=0, batch_size=8,
              mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])
    x1, y1 = _examples(d.val)
    x2, _ = _examples(d.val)
    assert torch.equal(x1, x2) and x1.shape == (10, 3, 32, 32)
    import numpy as np
    raw = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)])
    labels = sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    idx = _base_indices(d.val.dataset)
    want = torch.tensor(raw[idx]).view(-1, 3, 32, 32).float() / 255
    assert torch.allclose(x1, want, atol=1e-6) and y1.tolist() == [labels[i] for i in idx]


def test_on_device_and_shards_give_the_same_validation_examples():
    plain = _load("digits", val_size=70, test_batch_size=32, on_device=False)
    device = _load("digits", val_size=70, test_batch_size=32, on_device=True)
    assert isinstance(device.val, DeviceBatches)
    want = _examples(plain.val)
    got = _examples(device.val)
    assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
    for on_device in (False, True):
        parts = [_load("digits", shard=Shard(r, 2), val_size=70, test_batch_size=32,
                       on_device=on_device).val for r in range(2)]
        assert [p.first_batch for p in parts] == [0, 2]
        x = torch.cat([_examples(p)[0] for p in parts])
        assert torch.equal(x, want[0])


def test_two_class_task_holds_out_of_its_binary_training_set():
    d = _load("digits_2v5", val_size=0.2, evaluate_on="test")
    train, val = _base_indices(d.train.dataset), _base_indices(d.val.dataset)
    assert len(val) == round(0.2 * (len(train) + len(val))) and not set(train) & set(val)
    assert set(_examples(d.val)[1].tolist()) <= {0, 1}


def test_run_evaluates_the_validation_split_and_reads_the_test_set_last(compose, tmp_path,
                                                                      loader_watch):
    """results.json gets val_<key> for every accuracy; the test loader is first iterated
    after training and after the validation split's evaluation."""
    results = run(compose(TINY + ["data.val_size=40"]), tmp_path / "run")
    assert loader_watch.passes() == ["fit", "val", "test"]
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    for key in ("clean_acc", "pgd_acc", "ibp_verified_acc", "crown_verified_acc",
                "any_verified_acc"):
        assert key in saved and f"val_{key}" in saved, key
    assert saved["n_val"] == 40 and saved["n_test"] == 48 and results["n_val"] == 40
    assert saved["soundness"]["val_violations"] == []
