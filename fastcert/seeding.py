"""Seeds of a run: every random stream is seeded from the run's ``seed`` and an index, so an
epoch's data order and augmentation, and a test batch's attack starts, do not depend on what
ran before them (a resumed run, a sharded evaluation)."""
from __future__ import annotations

import random

import numpy as np
import torch

#: The multiplier of :func:`stream_seed` (a prime, so that nearby seeds' streams do not meet).
STREAM_STRIDE = 1_000_003


def seed_everything(seed: int) -> None:
    """Python's, NumPy's and torch's global RNGs seeded with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def stream_seed(seed: int, index: int) -> int:
    """The seed of stream ``index`` of a run seeded with ``seed`` (an epoch of training, a test
    batch of the evaluation): ``seed · 1,000,003 + index``."""
    return seed * STREAM_STRIDE + index
