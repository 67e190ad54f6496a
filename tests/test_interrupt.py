"""Ctrl-C (SIGINT) and SIGTERM stop ``certify`` and ``export`` as they stop ``fastcert.run``:
one line, status 128 + the signal's number, no traceback, at any point of the command."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastcert.pipeline import run

from conftest import ROOT, TINY, compose_config


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    run(compose_config("config", TINY), run_dir)
    return run_dir / "last.pt"


def _torch_loaded(pid: int) -> bool:
    """Whether the process has begun importing torch (its library is mapped): it is past
    Python's start-up and inside the command's own code."""
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/<pid>/maps")
@pytest.mark.parametrize("command,sig", [("fastcert.certify", signal.SIGINT),
                                         ("fastcert.export", signal.SIGINT),
                                         ("fastcert.certify", signal.SIGTERM)])
def test_a_signal_stops_the_command_in_one_line(checkpoint, command, sig):
    proc = subprocess.Popen([sys.executable, "-m", command, f"checkpoint={checkpoint}"],
                            cwd=checkpoint.parent, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 120
    while not _torch_loaded(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, (out + err)[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == [f"stopped by {sig.name}"], err[-3000:]
