"""Tests of fastcert.complete without any engine installed: VNN-COMP result files (hand-written
fixtures in tests/data/complete following the VNN-COMP format), the verdict of an engine run,
the wall-time and memory limits of the verifier subprocess, α,β-CROWN's YAML, and the replay of
counterexamples."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from fastcert.complete import vnncomp
from fastcert.complete.abcrown import ABCrown, merged
from fastcert.complete.engine import Limits, Verdict, verdict_of_run
from fastcert.complete.limits import Finished, run_limited
from fastcert.complete.replay import replay

DATA = Path(__file__).parent / "data" / "complete"


@pytest.mark.parametrize("name,status,verdict", [
    ("abcrown_unsat.txt", "unsat", "verified"), ("abcrown_timeout.txt", "timeout", "timeout"),
    ("abcrown_unknown.txt", "unknown", "error"), ("abcrown_sat.txt", "sat", "falsified"),
    ("neuralsat_sat.txt", "sat", "falsified"), ("neuralsat_unsat.txt", "unsat", "verified")])
def test_result_files(name, status, verdict):
    got, values = vnncomp.parse((DATA / name).read_text())
    assert got == status and vnncomp.STATUS[got] == verdict
    if verdict == "falsified":
        assert values["X"] == [0.25, -0.5, 0.75, 1.0] and values["Y"] == [0.1, 2.5, -1.0]
    else:
        assert values == {"X": [], "Y": []}


@pytest.mark.parametrize("text", ["", "maybe\n", (DATA / "gap_sat.txt").read_text(), "sat\n"])
def test_malformed_result_files(text):
    with pytest.raises(vnncomp.ResultFormatError):
        vnncomp.parse(text)


def test_verdict_of_run(tmp_path):
    limits = Limits(timeout_s=10, memory_gb=2)
    log = tmp_path / "log"
    log.write_text("loading\nAttributeError: 'NoneType' object has no attribute 'squeeze'\n")
    res = tmp_path / "result.txt"
    crashed = verdict_of_run(Finished(1, 3.0, "", 0.1), res, log, limits)
    assert crashed.verdict == "error" and "AttributeError" in crashed.reason
    assert verdict_of_run(Finished(None, 5.0, "memory", 2.1), res, log, limits).reason.startswith(
        "memory")
    oom = verdict_of_run(Finished(-9, 5.0, "", 1.9), res, log, limits)
    assert oom.verdict == "error" and oom.reason.startswith("SIGKILL at 1.9 GB")
    assert verdict_of_run(Finished(None, 70.0, "timeout", 0.1), res, log, limits).verdict == \
        "timeout"
    res.write_text((DATA / "neuralsat_sat.txt").read_text())
    sat = verdict_of_run(Finished(0, 4.0, "", 0.1), res, log, limits)
    assert sat.verdict == "falsified" and sat.counterexample == [0.25, -0.5, 0.75, 1.0]
    res.write_text("unknown\n")
    assert verdict_of_run(Finished(0, 4.0, "", 0.1), res, log, limits).verdict == "error"
    with pytest.raises(ValueError):
        Verdict("maybe", 1.0)


def test_wall_time_limit_kills_the_verifier(tmp_path):
    done = run_limited([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path, 1.0,
                       1.0, tmp_path / "log")
    assert done.killed == "timeout" and done.returncode is None and done.wall_s < 10


def test_memory_limits_kill_the_verifier_only(tmp_path):
    hog = [sys.executable, "-c", "b = b'x' * (800 << 20); import time; time.sleep(30)"]
    # the resident-memory watchdog (address space left wide open)
    done = run_limited(hog, tmp_path, 20.0, 0.2, tmp_path / "log", address_space_slack_gb=100)
    assert done.killed == "memory" and done.wall_s < 15
    # RLIMIT_AS: the allocation fails inside the verifier
    done = run_limited(hog, tmp_path, 20.0, 0.2, tmp_path / "log", address_space_slack_gb=0.1)
    assert done.returncode not in (0, None) and "MemoryError" in (tmp_path / "log").read_text()


def test_abcrown_yaml_has_ctbench_settings_and_the_paths(tmp_path):
    settings = {"general": {"seed": 100}, "bab": {"branching": {"method": "kfsb"}},
                "solver": {"batch_size": 100}}
    engine = ABCrown(str(tmp_path), "python", settings)
    cfg = engine.config(tmp_path / "m.onnx", tmp_path / "p.vnnlib", Limits(120, 4),
                        tmp_path / "r.txt")
    assert cfg["bab"] == {"branching": {"method": "kfsb"}, "timeout": 120.0}
    assert cfg["general"]["seed"] == 100 and cfg["general"]["device"] == "cpu"
    assert cfg["model"]["onnx_path"].endswith("m.onnx")
    assert cfg["specification"]["vnnlib_path"].endswith("p.vnnlib")
    assert settings == {"general": {"seed": 100}, "bab": {"branching": {"method": "kfsb"}},
                        "solver": {"batch_size": 100}}  # not modified
    assert merged({"a": {"b": 1, "c": 2}}, {"a": {"b": 3}}) == {"a": {"b": 3, "c": 2}}


def test_replay_checks_the_counterexample():
    model = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))  # f = x: class = argmax x
    lower, upper = torch.zeros(2), torch.ones(2)
    real = replay(model, [0.2, 0.9], lower, upper, label=0)
    assert real.violates and real.margin == pytest.approx(-0.7)
    fake = replay(model, [0.9, 0.2], lower, upper, label=0)
    assert not fake.violates and fake.margin == pytest.approx(0.7)
    outside = replay(model, [0.2, 1.5], lower, upper, label=0)
    assert not outside.violates and outside.outside == pytest.approx(0.5)
    assert not replay(model, [0.2], lower, upper, label=0).violates
