"""certify never loses results and scales (issues 18 and 21): a second certify at other radii
keeps the first's; other settings are refused; a refused command writes nothing; a SIGKILLed
certify resumes to the same outputs; ``workers=2`` and ``shard=i/n`` give one process's
outputs; export claims a fresh dir per invocation."""
from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastcert.certify import TIMING_FIELDS, certify
from fastcert.config import ConfigError

from conftest import ROOT
from test_certify import certify_cfg, trained  # noqa: F401  (the module's trained run)

FAST = ["alpha_crown.iterations=3", "batch_size=8"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def without_timing(value):
    """certify.json with the timing fields (:data:`TIMING_FIELDS`) dropped, recursively."""
    if isinstance(value, dict):
        return {k: without_timing(v) for k, v in value.items() if k not in TIMING_FIELDS}
    if isinstance(value, list):
        return [without_timing(v) for v in value]
    return value


def outputs(out: Path) -> tuple[dict, str]:
    return (without_timing(json.loads((out / "certify.json").read_text())),
            (out / "certify.csv").read_text())


def tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


@pytest.fixture(scope="module")
def reference(trained, tmp_path_factory):  # noqa: F811
    """One uninterrupted in-process certify at two radii."""
    run_dir, _ = trained
    out = tmp_path_factory.mktemp("reference")
    certify(certify_cfg(run_dir / "last.pt", "eps=[0.05,0.1]", *FAST), out)
    return out


def test_a_certify_at_other_radii_keeps_the_earlier_results(trained, reference, tmp_path):  # noqa: F811
    run_dir, _ = trained
    certify(certify_cfg(run_dir / "last.pt", "eps=0.1", *FAST), tmp_path)
    first = (tmp_path / "certify.csv").read_text()
    summary = certify(certify_cfg(run_dir / "last.pt", "eps=0.05", *FAST), tmp_path)
    assert [r["eps"] for r in summary["results"]] == [0.05, 0.1]
    assert outputs(tmp_path) == outputs(reference)
    rows = list(csv.DictReader(io.StringIO((tmp_path / "certify.csv").read_text())))
    kept = [r for r in rows if float(r["eps"]) == 0.1]
    assert kept == list(csv.DictReader(io.StringIO(first)))
    # a rerun of a finished certify recomputes nothing and changes nothing
    again = certify(certify_cfg(run_dir / "last.pt", "eps=0.1", *FAST), tmp_path)
    assert without_timing(again) == outputs(reference)[0]


def test_other_settings_into_the_same_dir_are_refused(trained, reference):  # noqa: F811
    run_dir, _ = trained
    before = {p: p.read_bytes() for p in reference.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match=r"other settings \(differing: attack\).*hydra.run.dir"):
        certify(certify_cfg(run_dir / "last.pt", "eps=0.2", *FAST, "attack.steps=3"), reference)
    assert {p: p.read_bytes() for p in reference.rglob("*") if p.is_file()} == before


def test_a_refused_command_writes_nothing(trained, tmp_path):  # noqa: F811
    run_dir, _ = trained
    out = tmp_path / "certify"
    for bad in (["eps=[0.05,O.1]"], ["shard=2/2"], ["complete.engine=nope"],
                ["complete.engine=neuralsat", f"complete.neuralsat.venv={tmp_path / 'none'}"]):
        proc = subprocess.run([sys.executable, "-m", "fastcert.certify",
                               f"checkpoint={run_dir / 'last.pt'}", f"hydra.run.dir={out}",
                               "progress=false", *bad], cwd=ROOT, env=ENV, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert proc.stderr.startswith("error: ") and len(proc.stderr.splitlines()) == 1
        assert not out.exists(), tree(out)


def _journal_lines(out: Path) -> int:
    return sum(len(p.read_text().splitlines()) for p in (out / "journal").glob("part-*.jsonl"))


def test_sigkill_then_rerun_gives_the_same_outputs(trained, reference, tmp_path):  # noqa: F811
    run_dir, _ = trained
    out = tmp_path / "certify"
    cmd = [sys.executable, "-m", "fastcert.certify", f"checkpoint={run_dir / 'last.pt'}",
           f"hydra.run.dir={out}", "eps=[0.05,0.1]", "attack=pgd", "attack.steps=10",
           "attack.step_size=0.25", "progress=false", "device=cpu", *FAST]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "journal").is_dir() and _journal_lines(out) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "certify finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 2 <= _journal_lines(out) < 12 and not (out / "certify.json").exists()
    done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert outputs(out) == outputs(reference)


def test_two_workers_and_two_shards_give_one_workers_outputs(trained, reference, tmp_path):  # noqa: F811
    run_dir, _ = trained
    certify(certify_cfg(run_dir / "last.pt", "eps=[0.05,0.1]", *FAST, "workers=2"),
            tmp_path / "workers")
    assert outputs(tmp_path / "workers") == outputs(reference)
    assert len(list((tmp_path / "workers" / "journal").glob("part-*.jsonl"))) == 2
    shards = tmp_path / "shards"
    first = certify(certify_cfg(run_dir / "last.pt", "eps=[0.05,0.1]", *FAST, "shard=1/2"),
                    shards)
    assert first is None and not (shards / "certify.json").exists()
    certify(certify_cfg(run_dir / "last.pt", "eps=[0.05,0.1]", *FAST, "shard=0/2"), shards)
    assert outputs(shards) == outputs(reference)


def test_each_export_gets_its_own_dir(trained, tmp_path):  # noqa: F811
    pytest.importorskip("onnxruntime", reason="dev extra: pip install -e '.[dev]'")
    run_dir, _ = trained
    ckpt = tmp_path / "run" / "last.pt"
    ckpt.parent.mkdir()
    ckpt.write_bytes((run_dir / "last.pt").read_bytes())
    base = [sys.executable, "-m", "fastcert.export", f"checkpoint={ckpt}", "limit_test=2"]
    for eps in ("0.05", "0.1"):
        proc = subprocess.run([*base, f"eps={eps}"], cwd=ROOT, env=ENV, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
    eps = [json.loads((ckpt.parent / d / "export.json").read_text())["eps"]
           for d in ("export", "export_1")]
    assert eps == [0.05, 0.1]
    refused = subprocess.run([*base, "eps=O.1"], cwd=ROOT, env=ENV, capture_output=True,
                             text=True, timeout=300)
    assert refused.returncode == 2 and refused.stderr.startswith("error: ")
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["export", "export_1", "last.pt"]


def test_a_hydra_multirun_over_shards_merges_into_one_output(trained, reference, tmp_path):  # noqa: F811
    run_dir, _ = trained
    ckpt = tmp_path / "last.pt"
    ckpt.write_bytes((run_dir / "last.pt").read_bytes())
    proc = subprocess.run([sys.executable, "-m", "fastcert.certify", "-m", f"checkpoint={ckpt}",
                           "shard=0/2,1/2", "eps=[0.05,0.1]", "attack=pgd", "attack.steps=10",
                           "attack.step_size=0.25", "progress=false", "device=cpu", *FAST],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (merged, table), (expected, expected_table) = outputs(tmp_path / "certify"), outputs(reference)
    assert merged.pop("checkpoint") == str(ckpt) and table == expected_table
    assert merged == {k: v for k, v in expected.items() if k != "checkpoint"}
