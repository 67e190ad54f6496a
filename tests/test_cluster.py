"""The cluster path with the real engines: hydra-submitit-launcher's ``submitit_local``
executor (submitit's own local processes, what ``hydra/launcher=slurm`` does on SLURM), a
2 × 2 sweep with ``resume.checkpoint=auto``. One job is preempted mid-training (SIGUSR2,
submitit's preemption / timeout signal) and submitit requeues it: it continues from its
last.pt. Another is SIGKILLed mid-training (not requeued: the sweep fails); the same command
with ``hydra.sweep.dir=<sweep dir>`` continues it and leaves the finished jobs alone. Then
``experiments.table`` gathers the four runs."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT

pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
EPOCHS = 3
SWEEP = ["-m", "hydra/launcher=submitit_local", "method=ibp,fast", "seed=0,1", "debug=smoke",
         "device=cpu", "cpu_threads=1", f"epochs={EPOCHS}", "data.limit_train=512",
         "data.batch_size=32", "resume.checkpoint=auto"]
PREEMPTED, KILLED = 1, 3    # job numbers (the launcher waits for the jobs in this order)
TIMEOUT_S = 600


def _launch(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fastcert.run", *args], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})


def _task_pid(sweep: Path, job_dir: Path) -> int | None:
    """The process running the job (the child of submitit's local controller, whose pid is
    the submitit job id and names the job's folder under .submitit/)."""
    for log in sweep.glob(".submitit/*/*_0_log.out"):
        if f"run dir: {job_dir}" in log.read_text(errors="replace"):
            ctrl = log.parent.name
            try:
                children = Path(f"/proc/{ctrl}/task/{ctrl}/children").read_text().split()
            except OSError:
                return None
            return int(children[0]) if children else None
    return None


def _stop_mid_training(cwd: Path, num: int) -> tuple[int, Path, int]:
    """SIGSTOP job ``num`` once it has written a checkpoint; its pid, run dir and the epoch
    of that checkpoint (checked to be before the last)."""
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        job_dir = next(cwd.glob(f"multirun/*/*/{num}_*"), None)
        if job_dir is not None and (job_dir / "last.pt").exists():
            pid = _task_pid(job_dir.parent, job_dir)
            if pid is not None:
                os.kill(pid, signal.SIGSTOP)
                epoch = torch.load(job_dir / "last.pt", weights_only=False)["epoch"]
                assert epoch < EPOCHS and not (job_dir / "results.json").exists(), \
                    "the job finished before it could be stopped"
                return pid, job_dir, epoch
        time.sleep(0.02)
    raise TimeoutError(f"job {num} wrote no checkpoint")


def test_submitit_local_sweep_requeues_resumes_and_gathers(tmp_path, capsys):
    from experiments import table

    sweep_proc = _launch(SWEEP, tmp_path)
    output = []
    reader = threading.Thread(target=lambda: output.extend(sweep_proc.stdout))
    reader.start()
    try:
        pid, preempted_dir, preempted_at = _stop_mid_training(tmp_path, PREEMPTED)
        os.kill(pid, signal.SIGUSR2)     # submitit: checkpoint the job and requeue it
        os.kill(pid, signal.SIGCONT)
        pid, killed_dir, killed_at = _stop_mid_training(tmp_path, KILLED)
        os.kill(pid, signal.SIGKILL)     # no requeue: the job fails, and with it the sweep
        assert sweep_proc.wait(timeout=TIMEOUT_S) != 0
    finally:
        if sweep_proc.poll() is None:
            sweep_proc.kill()
        reader.join()
    sweep = preempted_dir.parent
    # the requeued job continued from its checkpoint in its own dir
    results = json.loads((preempted_dir / "results.json").read_text())
    assert [r["from_epoch"] for r in results["resumed"]] == [preempted_at], "".join(output)
    assert results["epochs"] == EPOCHS
    assert not (killed_dir / "results.json").exists()
    finished = {d.name: (d / "results.json").read_bytes() for d in sweep.iterdir()
                if (d / "results.json").exists()}
    assert len(finished) == 3

    again = _launch([*SWEEP, f"hydra.sweep.dir={sweep}"], tmp_path)
    out = again.communicate(timeout=TIMEOUT_S)[0]
    assert again.returncode == 0, out[-3000:]
    assert "was taken" not in out
    results = json.loads((killed_dir / "results.json").read_text())
    assert [r["from_epoch"] for r in results["resumed"]] == [killed_at]
    for name, before in finished.items():   # the finished jobs: nothing to do, nothing changed
        assert (sweep / name / "results.json").read_bytes() == before, name

    capsys.readouterr()
    assert table.main([str(sweep)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")][2:]
    assert sorted((r.split("|")[1].strip(), r.split("|")[2].strip()) for r in rows) == [
        ("fast", "2"), ("ibp", "2")]
