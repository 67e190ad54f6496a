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

from conftest import CONF, ROOT, TINY

pytestmark = pytest.mark.skipif(memory._libc() is None, reason="needs glibc")

# One Adam step of CNN-7's last hidden layer (Linear(32768, 512), Shi et al. 2021): its 64 MiB
# weight gradient and Adam's 64 MiB temporaries are above glibc's largest dynamic mmap threshold
# (32 MiB), so by default each is mmap-ed, unmapped on free and faulted in again next step.
FAULTS = r"""
import json, sys
import torch
from fastcert import memory
torch.set_num_threads(1)
if sys.argv[1] == "keep":
    assert memory.keep_freed_memory() and memory.applied()
torch.manual_seed(0)
fc = torch.nn.Linear(32768, 512)
opt = torch.optim.Adam(fc.parameters(), lr=1e-3)
x = torch.randn(32, 32768)
faults = []
for step in range(8):
    before = memory.minor_faults()
    loss = fc(x).square().mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    faults.append(memory.minor_faults() - before)
print(json.dumps(faults[3:]))
"""


def _python(code: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={"PYTHONPATH": str(ROOT),
                                                       "OMP_NUM_THREADS": "1",
                                                       "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


def test_kept_memory_is_not_faulted_back_in_every_step():
    """Steps 4-8 of that training loop: with glibc's defaults every step faults at least one
    64 MiB buffer back in (16384 pages); with keep_freed_memory a typical step faults none
    (now and then the heap grows once more: at most one such step here)."""
    default = json.loads(_python(FAULTS, "default"))
    kept = json.loads(_python(FAULTS, "keep"))
    assert min(default) >= 64 * 2**20 // 4096, default
    assert sorted(kept)[len(kept) // 2] < 100, kept
    assert sum(kept) * 4 < sum(default), (kept, default)


BUILD = r"""
import sys, warnings
warnings.filterwarnings("ignore")
from hydra import compose, initialize_config_dir
from fastcert import memory
from fastcert.pipeline import build
from fastcert.settings import validate
with initialize_config_dir(config_dir=sys.argv[1], version_base="1.3"):
    cfg = compose("config", overrides=sys.argv[2:])
build(validate(cfg))
print(memory.applied())
"""


@pytest.mark.parametrize("setting,applied", [(None, "True"), ("true", "True"),
                                             ("false", "False")])
def test_runs_keep_freed_memory_on_cpu_unless_switched_off(setting, applied):
    over = TINY + ([f"keep_freed_memory={setting}"] if setting else [])
    assert _python(BUILD, str(CONF), *over) == applied


def test_the_key_is_checked(compose):
    from fastcert.config import ConfigError
    from fastcert.settings import validate

    with pytest.raises(ConfigError, match="keep_freed_memory"):
        validate(compose(TINY + ["keep_freed_memory=sometimes"]))
