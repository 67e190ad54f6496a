"""The memory budget of the evaluation (fastcert.memory.Budget, ``memory_gb``): peak resident
memory per phase, measured in a fresh process (the kernel's VmHWM of that process, reset per
chunk), stays within the budget, and within 1.5x of what the largest chunk alone needs."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fastcert import memory

from conftest import ROOT, TINY

pytestmark = pytest.mark.skipif(memory._libc() is None or not memory.reset_peak(),
                                reason="needs glibc and /proc/self/clear_refs")

# A dense 784-1024-1024-1024-10 MLP: CROWN's working set is ~B·(Σ neurons)·(max width) floats
# (every intermediate bound backward from 1024 neurons through 1024-wide layers), ~30 MB per
# example, ~4 GB for a test batch of 128 at once.
EVAL = r"""
import json, sys
import torch
torch.set_num_threads(1)
from fastcert import memory
from fastcert.bounds import BoundedNet
from fastcert.evaluate import evaluate
from fastcert.attacks import PGDConfig
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 1024), torch.nn.ReLU(),
                            torch.nn.Linear(1024, 1024), torch.nn.ReLU(),
                            torch.nn.Linear(1024, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 10))
x = torch.rand(int(sys.argv[2]), 1, 28, 28)
y = torch.randint(0, 10, (len(x),))
net = BoundedNet(model, x[:2], 10)
box = lambda x, eps: ((x - eps).clamp(0, 1), (x + eps).clamp(0, 1))
memory.keep_freed_memory()   # as a CPU run leaves it: evaluate gives it back
budgets = []
class Recorded(memory.Budget):
    def __init__(self, *args):
        super().__init__(*args)
        budgets.append(self)
memory.Budget = Recorded
result = evaluate(net, [(x, y)], box, 0.01, verifiers=sys.argv[3].split(","),
                  pgd=PGDConfig(steps=3, restarts=1), memory_gb=float(sys.argv[1]))
chunks = {p: budgets[0].chunk(p) for p in result.peak_rss}
print(json.dumps({"peak": result.peak_rss, "chunk": chunks, "applied": memory.applied()}))
"""


def _python(code: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={"PYTHONPATH": str(ROOT),
                                                       "OMP_NUM_THREADS": "1",
                                                       "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_phase_stays_within_the_budget():
    """A budget of 1 GiB (~0.4 GiB of it the interpreter, torch and auto_LiRPA) for a batch whose
    CROWN would need ~4 GB at once: each phase's peak is within the budget, and the allocator
    setting of training was released."""
    gib = 2**30
    got = _python(EVAL, "1.0", "128", "ibp,crown")
    assert set(got["peak"]) == {"attack", "ibp", "crown"}, got
    assert not got["applied"]
    for phase, peak in got["peak"].items():
        assert peak <= 1.0 * gib, (phase, peak / gib)
    assert got["peak"]["crown"] > 0.6 * gib, got  # the budget is used, not merely undershot


def test_the_peak_is_within_one_and_a_half_of_the_largest_chunk():
    """The whole evaluation's CROWN peak, against a process that runs CROWN on one chunk of
    the size the budget chose, at once (a budget it cannot reach): at most 1.5x."""
    chunked = _python(EVAL, "1.0", "128", "crown")
    size = chunked["chunk"]["crown"]
    assert 1 < size < 128, chunked
    alone = _python(EVAL, "100", str(size), "crown")
    assert alone["chunk"]["crown"] >= size, alone
    assert chunked["peak"]["crown"] <= 1.5 * alone["peak"]["crown"], (chunked, alone)


@pytest.mark.parametrize("value", ["-1", "0", "lots"])
def test_the_budget_key_is_checked(compose, value):
    from fastcert.config import ConfigError
    from fastcert.settings import validate

    with pytest.raises(ConfigError, match="memory_gb"):
        validate(compose(TINY + [f"memory_gb={value}"]))


def test_null_is_a_quarter_of_the_machine():
    assert memory.Budget(None).bytes == int(memory.machine_memory_bytes() / 4)
    assert memory.Budget(0.5).bytes == 2**29
