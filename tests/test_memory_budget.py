"""The memory budget of the evaluation (fastcert.memory.Budget, ``memory_gb``): peak resident
memory per phase, measured in a fresh process (the kernel's VmHWM of that process, reset per
chunk), stays within the budget, and within 1.5x of what the largest chunk alone needs; a
chunk is given at most the working set a CPU needs (CHUNK_BYTES), however large the budget."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fastcert import memory

from conftest import ROOT, TINY, once_per_session

pytestmark = pytest.mark.skipif(memory._libc() is None or not memory.reset_peak(),
                                reason="needs glibc and /proc/self/clear_refs")

# A dense 784-1024-1024-1024-10 MLP: CROWN's working set is ~B·(Σ neurons)·(max width) floats
# (every intermediate bound backward from 1024 neurons through 1024-wide layers), ~30 MB per
# example, ~1.4 GB for a test batch of 48 at once.
BATCH = 48
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
# "+G": G GiB above what the process holds now (a budget that binds on any machine)
gb = sys.argv[1]
gb = memory.rss_bytes() / 2**30 + float(gb[1:]) if gb.startswith("+") else float(gb)
budgets = []
class Recorded(memory.Budget):
    def __init__(self, *args):
        super().__init__(*args)
        budgets.append(self)
memory.Budget = Recorded
result = evaluate(net, [(x, y)], box, 0.01, verifiers=sys.argv[3].split(","),
                  pgd=PGDConfig(steps=3, restarts=1), memory_gb=gb)
chunks = {p: budgets[0].chunk(p) for p in result.peak_rss}
print(json.dumps({"peak": result.peak_rss, "chunk": chunks, "applied": memory.applied(),
                  "per_example": budgets[0].per_example, "resident": budgets[0].resident,
                  "budget": budgets[0].bytes}))
"""


def _python(code: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={"PYTHONPATH": str(ROOT),
                                                       "OMP_NUM_THREADS": "1",
                                                       "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def tight(tmp_path_factory):
    """The evaluation (attack, IBP, CROWN) of 48 examples under a budget of 0.2 GiB above what
    the process holds (the interpreter, torch and auto_LiRPA: ~0.5 GiB)."""
    return once_per_session(tmp_path_factory, "memory_budget_tight",
                            lambda _: _python(EVAL, "+0.2", str(BATCH), "ibp,crown"))


def test_every_phase_stays_within_the_budget(tight):
    """A budget of 0.2 GiB above what the process holds for a batch whose CROWN would need
    ~1.4 GB at once: each phase's peak is within the budget, CROWN's chunks use it (the
    largest power of two that fits), and the allocator setting of training was released."""
    got = tight
    assert set(got["peak"]) == {"attack", "ibp", "crown"}, got
    assert not got["applied"]
    for phase, peak in got["peak"].items():
        assert peak <= got["budget"], (phase, peak / 2**30)
    free = got["budget"] - got["resident"]["crown"]
    assert free < memory.CHUNK_BYTES, got                  # the budget binds, not the cap
    used = got["chunk"]["crown"] * got["per_example"]["crown"]
    assert 1 < got["chunk"]["crown"] < BATCH and free / 2 < used <= free, got


def test_a_large_budget_gives_a_chunk_no_more_than_a_cpu_needs():
    """With 100 GiB to spend, CROWN's chunks still hold at most CHUNK_BYTES (the old budget
    alone ran all 48 examples at once: ~1.4 GB), and its peak is within 1.5x of that above
    the process's resident memory."""
    got = _python(EVAL, "100", str(BATCH), "crown")
    assert 1 < got["chunk"]["crown"] < BATCH, got
    assert got["chunk"]["crown"] * got["per_example"]["crown"] <= memory.CHUNK_BYTES, got
    assert got["peak"]["crown"] <= got["resident"]["crown"] + 1.5 * memory.CHUNK_BYTES, got


def test_each_chunk_raises_a_working_set_that_one_example_underestimated():
    """A phase whose chunks need 4x per example what its one-example measurement rose by
    (as alpha-CROWN's optimiser state does): after the first chunk, the next are sized to
    the larger working set."""
    mib, held = 2**20, []

    def work(part):
        n = part.stop - part.start
        block = bytearray((1 if n == 1 else 4 * n) * 8 * mib)   # resident: zero-filled
        held.append(len(block))
        return [n]

    budget = memory.Budget(memory.rss_bytes() / 2**30 + 1.0)
    sizes = [n for out in budget.map("phase", 200, work) for n in out]
    assert sizes[:2] == [1, 1]                             # warm-up, measurement
    first = sizes[2]
    assert first * 8 * mib <= memory.CHUNK_BYTES and first >= 16, sizes
    assert max(sizes[3:]) <= first // 2, sizes             # 4x the rise: a quarter the chunk
    assert budget.per_example["phase"] >= 3.5 * 8 * mib


def test_the_peak_is_within_one_and_a_half_of_the_largest_chunk(tight):
    """The whole evaluation's CROWN peak, against a process that runs CROWN on one chunk of
    the size the budget chose, at once (a budget it cannot reach): at most 1.5x."""
    chunked = tight
    size = chunked["chunk"]["crown"]
    assert 1 < size < BATCH, chunked
    alone = _python(EVAL, "+0.5", str(size), "crown")
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


# certify in a fresh process; its peak resident memory from the kernel's ru_maxrss (never reset,
# unlike the VmHWM the budget resets per chunk), printed last
CERTIFY = r"""
import resource, sys
from fastcert.certify import main
sys.argv = ["fastcert.certify", *sys.argv[1:]]
try:
    main()
finally:
    print(1024 * resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("method", ["taps", "staps"])
def test_certify_of_a_digits_checkpoint_stays_under_2_gb(tmp_path, method):
    """Issue 18's case: a 2-epoch cnn_small digits checkpoint certified on the 360 test digits
    with the default budget (half the available memory) and the full cascade to alpha-CROWN
    peaked at 8.5 GB (TAPS) and 12 GB (STAPS) before the budget, and at 4.4 GB with the budget
    alone (one chunk of all undecided examples); under 2 GB with the chunk cap. On the CPU:
    CUDA's libraries alone would take much of 2 GB."""
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
           "CUDA_VISIBLE_DEVICES": ""}
    run_dir = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "fastcert.run", f"method={method}", "model=cnn_small",
                    "epochs=2", "device=cpu", f"hydra.run.dir={run_dir}"], cwd=ROOT, env=env,
                   check=True, capture_output=True, timeout=900)
    proc = subprocess.run([sys.executable, "-c", CERTIFY, f"checkpoint={run_dir / 'last.pt'}",
                           f"hydra.run.dir={tmp_path / 'certify'}", "progress=false",
                           "device=cpu"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    peak = int(proc.stdout.strip().splitlines()[-1])
    summary = json.loads((tmp_path / "certify" / "certify.json").read_text())
    assert summary["n_test"] == 360 and summary["verifiers"][-1] == "alpha_crown"
    assert peak < 2e9, peak / 1e9
