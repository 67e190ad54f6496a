"""The allocator setting (fastcert.memory): glibc keeps freed memory, so a step's large buffers
are not faulted back in every step; on by default on CPU runs, off with
``keep_freed_memory=false``. Counted in page faults (``getrusage``), never timed. mallopt is
process-wide and cannot be undone, so every check runs in a fresh process."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fastcert import memory

from conftest import ROOT, TINY

pytestmark = pytest.mark.skipif(memory._libc() is None, reason="needs glibc")

# 64 MiB buffers: above glibc's largest dynamic mmap threshold (32 MiB), so by default each
# one is mmap-ed, unmapped on free and faulted in page by page when next written.
FAULTS = r"""
import json, sys
import torch
from fastcert import memory
if sys.argv[1] == "keep":
    assert memory.keep_freed_memory() and memory.applied()
per_round = []
for i in range(8):
    before = memory.minor_faults()
    x = torch.empty(16 * 2**20).fill_(1.0)   # 64 MiB, every page written
    del x
    per_round.append(memory.minor_faults() - before)
print(json.dumps(per_round[2:]))
"""


def _python(code: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={"PYTHONPATH": str(ROOT),
                                                       "OMP_NUM_THREADS": "1",
                                                       "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


def test_kept_memory_is_not_faulted_back_in():
    """Allocating and freeing the same 64 MiB eight times: with glibc's defaults every round
    faults its pages in again; with keep_freed_memory the rounds after the first take
    (almost) none."""
    default = json.loads(_python(FAULTS, "default"))
    kept = json.loads(_python(FAULTS, "keep"))
    pages = 64 * 2**20 // 4096
    assert min(default) > 0.5 * pages / 512, default   # ≥ one fault per 2 MiB even with THP
    assert max(kept) < 0.01 * pages, kept
    assert sum(kept) * 20 < sum(default), (default, kept)


BUILD = r"""
import sys, warnings
warnings.filterwarnings("ignore")
from hydra import compose, initialize_config_dir
from fastcert import memory
from fastcert.pipeline import build
with initialize_config_dir(config_dir=sys.argv[1], version_base="1.3"):
    cfg = compose("config", overrides=sys.argv[2:])
build(cfg)
print(memory.applied())
"""


@pytest.mark.parametrize("setting,applied", [(None, "True"), ("true", "True"),
                                             ("false", "False")])
def test_runs_keep_freed_memory_on_cpu_unless_switched_off(setting, applied):
    over = TINY + ([f"keep_freed_memory={setting}"] if setting else [])
    assert _python(BUILD, str(ROOT / "conf"), *over) == applied


def test_the_key_is_checked(compose):
    from fastcert.config import ConfigError
    from fastcert.pipeline import validate

    with pytest.raises(ConfigError, match="keep_freed_memory"):
        validate(compose(TINY + ["keep_freed_memory=sometimes"]))
