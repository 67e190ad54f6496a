"""A binary task from two classes of another data set (:class:`TwoClasses`; the IBP convergence
experiment of Wang 2022)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch.utils.data import Dataset, TensorDataset

from fastcert.data.bundle import DataBundle, UnclippedBundle
from fastcert.data.shard import Shard
from fastcert.data.source import DatasetSplits, DataSource
from fastcert.data.sources import Digits


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
