"""Where a search's Optuna study lives, read the same way by the sweeper that runs the search
(``hydra_plugins.fastcert_sweeper``), by a trial that compares itself with finished trials
(:mod:`fastcert.search`) and by ``python -m experiments.pareto``.

A storage is named by one string (:func:`storage_url`):

* ``sqlite`` (the default of ``hydra/sweeper=fastcert``): ``<sweep dir>/study.db``, an SQLite
  file for the processes of one machine;
* ``journal``: ``<sweep dir>/study.journal``, Optuna's append-only journal file
  (``JournalFileBackend``), for launchers on several nodes sharing a file system (Optuna's
  documentation recommends it over SQLite on NFS);
* a path ending in ``.db`` / ``.sqlite`` (SQLite) or ``.journal`` (journal file);
* an SQLAlchemy URL (``sqlite:///...``, ``postgresql://...``, ``mysql://...``).

Optuna must be 4.5 or newer (``pip install 'optuna>=4.5,<6'``): SQLite through SQLAlchemy 2
and the journal file need it.
"""
from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import Any

#: File names of the two per-sweep-dir storages.
SQLITE_FILE = "study.db"
JOURNAL_FILE = "study.journal"
#: How long a process waits for an SQLite write lock held by another process (seconds).
SQLITE_TIMEOUT_S = 120
#: Attempts to create or load a study while other processes create it at the same moment.
OPEN_ATTEMPTS = 8


def storage_url(spec: str | None, base_dir: str | os.PathLike | None = None) -> str | None:
    """``spec`` as an absolute storage name: ``sqlite:////abs/study.db``, ``/abs/x.journal``
    or a database URL; ``sqlite`` / ``journal`` name the file in ``base_dir`` (the sweep dir).
    None: an in-memory study (nothing to resume or share)."""
    if spec is None or str(spec) in ("", "null", "none", "memory"):
        return None
    spec = str(spec)
    base = Path(base_dir or ".")
    if spec == "sqlite":
        return f"sqlite:///{(base / SQLITE_FILE).resolve()}"
    if spec == "journal":
        return str((base / JOURNAL_FILE).resolve())
    if "://" in spec:
        if spec.startswith("sqlite:///") and not spec.startswith("sqlite:////"):
            return f"sqlite:///{Path(spec[len('sqlite:///'):]).resolve()}"
        return spec
    path = Path(spec).expanduser()
    if path.suffix in (".db", ".sqlite", ".sqlite3"):
        return f"sqlite:///{path.resolve()}"
    if path.suffix == ".journal":
        return str(path.resolve())
    raise ValueError(f"storage={spec}: use sqlite, journal, a file PATH.db or PATH.journal, "
                     f"or a database URL (sqlite:///PATH, postgresql://...)")


def storage_file(url: str) -> Path | None:
    """The file an SQLite URL or a journal path names (None for a database server)."""
    if url.startswith("sqlite:///"):
        return Path(url[len("sqlite:///"):])
    return None if "://" in url else Path(url)


def open_storage(url: str | None):
    """The Optuna storage of :func:`storage_url`'s name (a new in-memory one for None); the
    file's folder is created."""
    import optuna

    if url is None:
        return optuna.storages.InMemoryStorage()
    path = storage_file(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    if "://" not in url:
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(url))
    kwargs = ({"connect_args": {"timeout": SQLITE_TIMEOUT_S}} if url.startswith("sqlite")
              else {})
    return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)


def _retrying(make, what: str):
    """``make()``, tried again after a short random pause while another process creates the
    same storage or study (SQLite: ``UNIQUE constraint failed: alembic_version``; a study
    name inserted twice)."""
    for attempt in range(OPEN_ATTEMPTS):
        try:
            return make()
        except Exception as e:  # noqa: BLE001 - the race's errors come from SQLAlchemy/Optuna
            if attempt + 1 == OPEN_ATTEMPTS:
                raise RuntimeError(f"could not open {what}: {e}") from e
            time.sleep(0.2 + random.random() * (attempt + 1))
    raise AssertionError("unreachable")


def open_study(name: str, url: str | None, directions: list[str] | None = None,
               sampler: Any = None):
    """The study ``name`` in the storage ``url``: created with ``directions`` where it does
    not exist (``directions`` None: it must exist), else loaded. Safe when several launchers
    create it at the same moment."""
    import optuna

    storage = _retrying(lambda: open_storage(url), f"the storage {url}")
    if directions is None:
        return _retrying(lambda: optuna.load_study(study_name=name, storage=storage,
                                                   sampler=sampler), f"study {name} in {url}")
    return _retrying(lambda: optuna.create_study(
        study_name=name, storage=storage, directions=list(directions), sampler=sampler,
        load_if_exists=True), f"study {name} in {url}")


def study_names(url: str) -> list[str]:
    """The studies a storage holds."""
    import optuna

    return optuna.study.get_all_study_names(open_storage(url))
