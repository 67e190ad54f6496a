"""A verifier subprocess under a wall-time and a memory limit; an overrun kills the verifier
only, never the caller or the machine.

The child runs in its own session (process group) with

* ``RLIMIT_AS`` = memory limit + ``address_space_slack_gb`` (set in ``preexec_fn``): an
  allocation beyond it fails inside the child (the slack covers the address space that
  torch's CUDA wheel reserves at import, ~3.3 GB measured with NeuralSAT's environment, which
  is not resident memory);
* ``oom_score_adj`` 1000, so that the kernel's OOM killer picks the verifier first;
* ``PR_SET_PDEATHSIG`` = SIGKILL: it dies with its parent (a SIGKILLed certify leaves no
  verifier behind).

The parent samples the resident memory of the whole process group every 0.1 s and kills the
group above the limit, or after the wall-time limit.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")
PR_SET_PDEATHSIG = 1


@dataclass
class Finished:
    """How the child ended: its exit status (None when killed), wall seconds, and
    ``killed`` = ``memory`` | ``timeout`` | ``""``, with the peak resident GB seen."""

    returncode: int | None
    wall_s: float
    killed: str
    peak_gb: float


def group_rss(pgid: int) -> int:
    """Resident bytes of every process in process group ``pgid`` (from /proc)."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
            if int(stat[stat.rindex(")") + 2:].split()[2]) != pgid:  # field 5: pgrp
                continue
            with open(f"/proc/{entry.name}/statm") as f:
                total += int(f.read().split()[1]) * PAGE
        except (OSError, ValueError, IndexError):
            continue
    return total


def _preexec(address_space: int):
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)  # loaded before fork

    def limit():
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        try:
            Path("/proc/self/oom_score_adj").write_text("1000")
        except OSError:
            pass
        resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
    return limit


def run_limited(cmd: list[str], cwd: Path, wall_s: float, memory_gb: float, log: Path,
                address_space_slack_gb: float = 4.0, env: dict | None = None) -> Finished:
    """Run ``cmd`` in ``cwd`` (stdout and stderr into ``log``) under the limits above; one
    torch/BLAS thread, no GPU unless ``env`` says otherwise."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    env.pop("PYTHONPATH", None)  # fastcert's own modules stay out of the verifier
    address_space = int((memory_gb + address_space_slack_gb) * 2**30)
    t0 = time.monotonic()
    peak, killed = 0, ""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=_preexec(address_space))
        try:
            while proc.poll() is None:
                rss = group_rss(proc.pid)
                peak = max(peak, rss)
                if rss > memory_gb * 2**30:
                    killed = "memory"
                elif time.monotonic() - t0 > wall_s:
                    killed = "timeout"
                if killed:
                    break
                time.sleep(0.1)
        finally:
            try:  # the whole group: a grandchild must not outlive the run
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
    return Finished(None if killed else proc.returncode, time.monotonic() - t0, killed,
                    peak / 2**30)
