"""Shared fixtures: Hydra composition of the real conf/ tree, and tiny settings for runs."""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pickle
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "fastcert" / "conf"

# Tiny kwargs per model family (tests fall back to a heuristic for a newly registered model).
TINY_MODELS: dict[str, dict] = {
    "mlp": {"widths": (16, 16)},
    "cnn7": {"width": 0.125},
    "dm_small": {"width": 0.25},
    "dm_medium": {"width": 0.125},
    "dm_large": {"width": 0.125},
    "cnn_small": {"width": 0.5},
    "wide_resnet": {"widen_factor": 1, "base_width": 4, "fc_width": 16},
    "resnext": {"num_blocks": [1, 1, 1], "cardinality": 2, "bottleneck_width": 2, "stem_width": 4,
                "fc_width": 16},
    "cnn_2layer": {"width": 1, "linear_size": 16},
    "cnn_4layer": {"width": 1, "linear_size": 16},
    "cnn_3layer_fixed": {"width": 1, "linear_size": 16},
}

MODEL_NAMES = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))


def tiny_kwargs(name: str) -> dict:
    """Tiny options of a model family (a newly added model falls back to width=0.125 when it
    takes a width multiplier)."""
    from fastcert.config import option_node

    if name in TINY_MODELS:
        return dict(TINY_MODELS[name])
    return {"width": 0.125} if "width" in option_node("model", name) else {}


def build_model(name: str, input_shape, num_classes: int, **options):
    """conf/model/<name>.yaml with ``options`` (bn, width ...) for the given data shape."""
    from fastcert.config import build_option

    return build_option("model", name, options, input_shape=input_shape, num_classes=num_classes)


def bn_mlp(seed: int = 0):
    """A BoundedNet (training mode) over a 64-16-16-10 MLP with BatchNorm for 1x8x8 inputs,
    its weights drawn with ``seed``."""
    from fastcert.bounds import BoundedNet

    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
        torch.nn.Linear(16, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
        torch.nn.Linear(16, 10))
    return BoundedNet(model, torch.zeros(2, 1, 8, 8), 10).train()


def pixel_box(center, radius):
    """The L∞ box of ``radius`` around ``center``, clipped to the pixel range [0, 1]."""
    return (center - radius).clamp(0, 1), (center + radius).clamp(0, 1)


def random_batch(eps: float, eps_target: float = 0.1, diagnostics: bool = False, n: int = 8):
    """A training Batch of ``n`` random 1x8x8 images and labels (generator seed 1) with their
    :func:`pixel_box` at ``eps``."""
    from fastcert.methods import Batch

    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    lower, upper = pixel_box(x, eps)
    return Batch(x, y, lower, upper, eps, eps_target, pixel_box, diagnostics)


# Smallest settings that still go through every stage of a run.
TINY = ["debug=smoke", "device=cpu", "data.limit_train=96", "data.limit_test=48"]


def pytest_configure(config):
    # One torch thread per test process: on a small or busy machine two OpenMP threads per
    # process spin against each other and small models run 10-30x slower.
    torch.set_num_threads(1)


def compose_config(name: str = "config", overrides=(), return_hydra_config: bool = False):
    """The DictConfig of ``conf/<name>.yaml`` with ``overrides``, as the command line composes
    it (``config``: ``python -m fastcert.run``; ``certify``, ``export``: those commands)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return hydra_compose(name, overrides=list(overrides),
                                 return_hydra_config=return_hydra_config)
    finally:
        GlobalHydra.instance().clear()


def once_per_session(tmp_path_factory, name: str, make):
    """``make(folder)`` run once per test session, however many pytest-xdist workers ask: its
    JSON value is kept beside the workers' temporary folders, written under a lock. The first
    worker to ask runs it in a fresh folder; the others wait for it and read the value (a module
    fixture alone runs once per worker whose tests use it). If ``make`` raises, no value is
    kept: the error is that worker's, and the next worker to ask runs ``make`` again."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent                  # shared by the workers of this session
        name = f"{name}-{os.environ.get('PYTEST_XDIST_TESTRUNUID', '')}"
    value = base / f"{name}.json"
    with open(base / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not value.exists():
            folder = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=base))
            partial = base / f"{name}.json.part"
            partial.write_text(json.dumps(make(folder)))
            os.replace(partial, value)
        return json.loads(value.read_text())


@pytest.fixture
def compose():
    """compose(overrides) -> DictConfig from conf/config.yaml, as `python -m fastcert.run` would."""

    def _compose(overrides=(), return_hydra_config=False):
        return compose_config("config", overrides, return_hydra_config)

    return _compose



class _Watched:
    """A loader that records each pass over it (``name``) and each read of its data set
    (``name.dataset``) in ``events``."""

    def __init__(self, loader, name: str, events: list):
        self._loader, self._name, self._events = loader, name, events

    def __iter__(self):
        self._events.append(self._name)
        return iter(self._loader)

    def __len__(self):
        return len(self._loader)

    @property
    def dataset(self):
        self._events.append(f"{self._name}.dataset")
        return self._loader.dataset

    def __getattr__(self, key):
        return getattr(self._loader, key)


class LoaderWatch:
    """What :func:`loader_watch` saw: ``events`` in order ("val", "test", "fit" when the
    pipeline's fit returns, "<split>.dataset" on each read of a loader's data set) and
    ``loaded``, each loaded bundle's own train and val loaders, before they were watched."""

    def __init__(self):
        self.events: list[str] = []
        self.loaded: list[tuple] = []

    def passes(self) -> list[str]:
        """The events without the data-set reads: the loader passes and fit's return."""
        return [e for e in self.events if not e.endswith(".dataset")]


@pytest.fixture
def loader_watch(monkeypatch) -> LoaderWatch:
    """Watch when a run iterates its validation and test loaders, relative to the end of
    training (the validation-split and no-test-set-leakage tests)."""
    import fastcert.data.source as source
    import fastcert.pipeline as pipeline

    watch, load, fit = LoaderWatch(), source.DataSource.load, pipeline.fit

    def watched(self, *args, **kwargs):
        bundle = load(self, *args, **kwargs)
        watch.loaded.append((bundle.train, bundle.val))
        bundle.test = _Watched(bundle.test, "test", watch.events)
        bundle.val = _Watched(bundle.val, "val", watch.events)
        return bundle

    def fit_then_record(*args, **kwargs):
        out = fit(*args, **kwargs)
        watch.events.append("fit")
        return out

    monkeypatch.setattr(source.DataSource, "load", watched)
    monkeypatch.setattr(pipeline, "fit", fit_then_record)
    return watch

def count_forwards(module: torch.nn.Module) -> list[int]:
    """A one-element list counting ``module``'s forward calls from now on (reset it by
    assigning ``calls[0] = 0``)."""
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


class FullSizeOps(TorchDispatchMode):
    """A dispatch mode that lists the ops (views and bare allocations left out) whose output
    has at least ``numel`` elements: the passes a computation makes over tensors of that size
    (the op-count tests of the step's elementwise work; counts, never timings). One instance
    per ``with`` block."""

    NO_PASS = {"view", "t", "transpose", "expand", "detach", "unsqueeze", "squeeze", "unbind",
               "as_strided", "alias", "_unsafe_view", "slice", "select", "reshape", "permute",
               "empty", "empty_like", "empty_strided"}

    def __init__(self, numel: int):
        super().__init__()
        self.numel = numel
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__.split(".")[0]
        outs = out if isinstance(out, (tuple, list)) else [out]
        if name not in self.NO_PASS and any(isinstance(o, torch.Tensor) and o.numel() >= self.numel
                                          for o in outs):
            self.ops.append(name)
        return out


# ---- small datasets in their true on-disk formats (real loaders read them) ----------------

def _write_idx(path: Path, arr: np.ndarray) -> None:
    """IDX format: magic (0, 0, 0x08 = ubyte, ndim), big-endian int32 dims, raw bytes."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    with open(path, "wb") as f:
        f.write(bytes([0, 0, 0x08, arr.ndim]))
        f.write(struct.pack(">" + "i" * arr.ndim, *arr.shape))
        f.write(arr.tobytes())


def write_idx_set(folder: Path, n_train: int, n_test: int, seed: int,
                  gzipped: bool = False) -> dict:
    """The four idx files of an MNIST-format set (random 28x28 images, labels 0-9) in
    ``folder``, each gzipped (as Debian's dataset-fashion-mnist ships them) or plain (as
    torchvision extracts them); ``{split: (images, labels)}``."""
    import gzip

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    data = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, size=n, dtype=np.uint8)
        for kind, arr in (("images-idx3", x), ("labels-idx1", y)):
            path = folder / f"{split}-{kind}-ubyte"
            _write_idx(path, arr)
            if gzipped:
                path.with_name(path.name + ".gz").write_bytes(gzip.compress(path.read_bytes()))
                path.unlink()
        data[split] = (x, y)
    return data


@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("mnist")
    return root, write_idx_set(root / "MNIST" / "raw", 60, 20, seed=0)


def _md5(p: Path) -> str:
    return hashlib.md5(p.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    base = root / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(1)
    batches = {}
    for name, n in [(f"data_batch_{i}", 8) for i in range(1, 6)] + [("test_batch", 12)]:
        x = rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8)  # rows: R plane, G, B
        y = [int(v) for v in rng.integers(0, 10, size=n)]
        with open(base / name, "wb") as f:
            pickle.dump({"batch_label": name.encode(), "labels": y, "data": x,
                         "filenames": [f"{name}_{i}.png".encode() for i in range(n)]}, f)
        batches[name] = (x, y)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
             "truck"]
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"num_cases_per_batch": 8, "label_names": names, "num_vis": 3072}, f)
    md5 = {p.name: _md5(p) for p in base.iterdir()}
    return root, batches, md5


@pytest.fixture
def cifar_md5(cifar_root, monkeypatch):
    """Point torchvision's CIFAR-10 MD5 table at the generated files (only the constants change)."""
    from torchvision.datasets import CIFAR10

    _, _, md5 = cifar_root
    monkeypatch.setattr(CIFAR10, "train_list", [[f, md5[f]] for f, _ in CIFAR10.train_list])
    monkeypatch.setattr(CIFAR10, "test_list", [[f, md5[f]] for f, _ in CIFAR10.test_list])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": md5[CIFAR10.meta["filename"]]})


WNIDS = ["n01443537", "n01629819", "n01641577"]


def make_tiny_imagenet(base: Path, n_train: int = 4, n_val: int = 2) -> dict[str, str]:
    """tiny-imagenet-200 as in the zip: train/<wnid>/images/*.JPEG, flat val/images +
    annotations."""
    rng = np.random.default_rng(2)
    (base / "val" / "images").mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    labels, lines = {}, []
    k = 0
    for wnid in WNIDS:
        d = base / "train" / wnid / "images"
        d.mkdir(parents=True)
        for i in range(n_train):
            image = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
            image.save(d / f"{wnid}_{i}.JPEG")
        (base / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
        for _ in range(n_val):
            fname = f"val_{k}.JPEG"
            arr = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            # one grayscale image
            img = Image.fromarray(arr) if k else Image.fromarray(arr[..., 0], mode="L")
            img.save(base / "val" / "images" / fname)
            lines.append(f"{fname}\t{wnid}\t0\t0\t63\t63")
            labels[fname] = wnid
            k += 1
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return labels


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    """A reorganised tiny-imagenet-200 (3 classes) under a data root."""
    from fastcert import prep_tinyimagenet

    root = tmp_path_factory.mktemp("tiny")
    make_tiny_imagenet(root / "tiny-imagenet-200")
    prep_tinyimagenet.reorganize_val(root / "tiny-imagenet-200")
    return root
