"""Claiming a fresh output directory: two runs started in the same second never share one.

A run's default dir is named by the time it starts (``outputs/DATE/TIME``, a sweep's
``multirun/DATE/TIME``), so two launches in the same second get the same name. :func:`claim`
creates the dir with ``os.mkdir``, which the file system performs atomically (exactly one of
several processes creating the same path succeeds; the others get ``FileExistsError``); a
taken name gets the first free suffix ``_1``, ``_2`` … This module imports nothing beyond the
standard library, so that many processes can claim at once cheaply.
"""
from __future__ import annotations

import os
from pathlib import Path

#: How many suffixes are tried before giving up (only a broken file system gets there).
MAX_SUFFIX = 10_000


def _mkdirs(path: Path) -> list[Path]:
    """Create the missing parents of ``path`` (not ``path``); the ones this call created,
    outermost first."""
    missing = [p for p in reversed(path.parents) if not p.exists()]
    created = []
    for p in missing:
        try:
            os.mkdir(p)
            created.append(p)
        except FileExistsError:  # another process made it in between
            pass
    return created


def claim(path: str | os.PathLike) -> tuple[Path, list[Path]]:
    """Create a fresh directory at ``path`` or, when that name is taken, at ``path_1``,
    ``path_2`` … (the first free one); exactly one concurrent caller gets each name. Returns
    the claimed dir and every directory this call created (missing parents first, the claimed
    dir last), which :func:`release` removes again if they stay empty.

    Raises ``PermissionError`` (or another ``OSError``) where the location is not writable."""
    path = Path(path)
    created = _mkdirs(path)
    for k in range(MAX_SUFFIX):
        candidate = path if k == 0 else path.with_name(f"{path.name}_{k}")
        try:
            os.mkdir(candidate)
        except FileExistsError:
            continue
        return candidate, [*created, candidate]
    raise FileExistsError(f"{path}: {MAX_SUFFIX} directories of this name exist already")


def create(path: str | os.PathLike) -> list[Path]:
    """Create ``path`` and its missing parents (an explicit run dir, used as given: it may
    exist); the directories this call created, for :func:`release`. Raises
    ``PermissionError`` where an existing ``path`` is not writable."""
    path = Path(path)
    created = _mkdirs(path)
    try:
        os.mkdir(path)
        created.append(path)
    except FileExistsError:
        if not path.is_dir():
            raise NotADirectoryError(20, "Not a directory", str(path)) from None
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied", str(path)) from None
    return created


def release(created: list[Path]) -> None:
    """Remove the directories :func:`claim` created, innermost first, where they are still
    empty (``os.rmdir`` removes nothing else): what a refused run claimed leaves no trace,
    and nothing anyone wrote is ever deleted."""
    for p in reversed(created):
        try:
            os.rmdir(p)
        except OSError:
            return
