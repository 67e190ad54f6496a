"""certify's journal: results appended as they are decided, so that a killed certify (SIGKILL
included) resumes where it stopped, several processes (``workers=N``, ``shard=i/n``) share one
output dir, and a later certify at other radii adds to the earlier results.

``<out dir>/journal/`` holds

* ``settings.json`` — everything that determines the results (checkpoint hash, attack,
  verifiers, cascade, α-CROWN, complete stage, test subset, batch size, seed), written by the
  first certify into the dir; a later one with other settings is refused (its results would
  not be comparable), one with the same settings resumes and adds radii;
* ``part-<pid>-<n>.jsonl`` — one file per writing process, one JSON line per record, flushed
  and fsynced: ``{"kind": "batch", "eps", "batch", "rows", "times", "violations", "ties",
  "tightness"}`` per test batch once the attack and the incomplete cascade decided it, and
  ``{"kind": "complete", "eps", "index", ...}`` per example once the complete engine decided
  it. A line cut short by a kill is ignored.

A batch is the unit of the incomplete stages because its results depend only on the batch (the
attack's random starts are seeded per test batch, :func:`fastcert.seeding.stream_seed`), never
on which process computes it or when.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from fastcert.config import ConfigError

JOURNAL = "journal"


def _eps_key(eps: float) -> str:
    return repr(float(eps))


class Journal:
    """The journal of one output dir."""

    def __init__(self, out_dir: Path):
        self.dir = Path(out_dir) / JOURNAL
        self._file = None

    def check_settings(self, settings: dict) -> bool:
        """Whether ``settings`` match those already recorded (True) or the dir has none yet
        (False); refuses (ConfigError) other settings. Writes nothing."""
        path = self.dir / "settings.json"
        if not path.is_file():
            return False
        before = json.loads(path.read_text())
        if before != settings:
            diff = sorted(k for k in set(before) | set(settings)
                          if before.get(k) != settings.get(k))
            raise ConfigError(
                f"{self.dir.parent} holds certify results made with other settings "
                f"(differing: {', '.join(diff)}); certify into another dir with "
                f"hydra.run.dir=<dir> (or rerun with the settings of {path})")
        return True

    def start(self, settings: dict) -> None:
        """Record ``settings`` (first writer wins; the others must match)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / "settings.json"
        try:
            with open(path, "x") as f:
                f.write(json.dumps(settings, indent=2, sort_keys=True) + "\n")
        except FileExistsError:
            self.check_settings(settings)

    def append(self, record: dict) -> None:
        """One record, durable when this returns."""
        if self._file is None:
            self.dir.mkdir(parents=True, exist_ok=True)
            k = 0
            while (self.dir / f"part-{os.getpid()}-{k}.jsonl").exists():
                k += 1
            self._file = open(self.dir / f"part-{os.getpid()}-{k}.jsonl", "a")
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def read(self) -> dict[str, dict]:
        """Per ε (``repr(float(eps))``): ``{"batches": {b: record}, "complete": {index:
        record}}`` from every part file (the first record of each key wins)."""
        out: dict[str, dict] = {}
        for path in sorted(self.dir.glob("part-*.jsonl")):
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # the tail of a write cut short by a kill
                    continue
                at = out.setdefault(_eps_key(rec["eps"]), {"batches": {}, "complete": {}})
                if rec["kind"] == "batch":
                    at["batches"].setdefault(int(rec["batch"]), rec)
                else:
                    at["complete"].setdefault(int(rec["index"]), rec)
        return out

    def at(self, eps: float) -> dict:
        return self.read().get(_eps_key(eps), {"batches": {}, "complete": {}})
