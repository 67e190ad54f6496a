"""A data-parallel rank's part of the data: its share of every training batch and its block of
test batches (:class:`Shard`), and the batch sampler that gives the share
(:class:`ShardedBatches`)."""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch.utils.data import BatchSampler


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


class ShardedBatches:
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
