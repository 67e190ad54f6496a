"""Atomic writes (checkpoints and text): a killed run never leaves a half-written file under
the real name."""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read (truncated, corrupt, or not a fastcert checkpoint)."""


def save_atomic(state: dict, path: str | os.PathLike) -> None:
    """Write ``state`` to a temporary file beside ``path``, fsync it, then rename over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``: readers
    see the old or the new content, never half of it (results, metrics, run ids)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def load(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a checkpoint, or raise :class:`CheckpointError` naming the file and what to do."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # torch raises several types for truncated/corrupt zip files
        raise CheckpointError(
            f"checkpoint {path} is unreadable ({type(e).__name__}: {e}). It may have been "
            f"truncated or corrupted; nothing was changed. Point resume=/checkpoint= at another "
            f"file, or move this one away to start the run from scratch.") from e
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path} is not a fastcert checkpoint (no 'model' entry)")
    return state


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
