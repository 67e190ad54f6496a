"""certify's complete stage with a scripted engine (no verifier installed): its verdicts reach
certify.csv and certify.json (decided_by ``complete``, engine and version, per-stage counts); a
tampered counterexample is caught by the replay (verdict ``error``); a complete-verified example
the attack broke is a SoundnessError (exit 3) after the outputs are written."""
from __future__ import annotations

import csv
import json
import re
import time
from pathlib import Path

import pytest
import torch

import fastcert.complete.engine as engine_module
from fastcert.certify import certify
from fastcert.complete.engine import Engine, Limits, Verdict
from fastcert.evaluate import SoundnessError

from test_certify import certify_cfg, trained  # noqa: F401  (the module's trained run)

pytest.importorskip("onnx", reason="dev extra: pip install -e '.[dev]'")
FAST = ["alpha_crown.iterations=2", "eps=0.1"]


def box_midpoint(vnnlib: Path) -> list[float]:
    lo, hi = {}, {}
    for op, i, v in re.findall(r"\(assert \((<=|>=) X_(\d+) (\S+)\)\)", vnnlib.read_text()):
        (hi if op == "<=" else lo)[int(i)] = float(v)
    return [(lo[i] + hi[i]) / 2 for i in sorted(lo)]


class Scripted(Engine):
    """Answers ``answer`` for every property; a ``falsified`` comes with the box's midpoint,
    which the attack did not break: a counterexample that is not one."""

    name = "scripted"

    def __init__(self, answer: str):
        self.answer = answer

    def version(self) -> str:
        return "1.0"

    def verify(self, onnx: Path, vnnlib: Path, limits: Limits, work_dir: Path) -> Verdict:
        assert onnx.is_file() and limits.timeout_s == 7
        cex = box_midpoint(vnnlib) if self.answer == "falsified" else None
        return Verdict(self.answer, 0.5, counterexample=cex)


@pytest.fixture
def scripted(monkeypatch):
    def use(answer: str):
        monkeypatch.setattr(engine_module, "make_engine",
                            lambda name, settings: Scripted(answer))
    return use


def rows(out: Path) -> list[dict]:
    with open(out / "certify.csv", newline="") as f:
        return list(csv.DictReader(f))


def complete_cfg(run_dir, *extra):
    return certify_cfg(run_dir / "last.pt", *FAST, "complete.engine=scripted",
                       "complete.timeout_s=7", *extra)


def test_complete_stage_decides_the_undecided(trained, scripted, tmp_path):  # noqa: F811
    run_dir, _ = trained
    scripted("verified")
    summary = certify(complete_cfg(run_dir), tmp_path)
    table = rows(tmp_path)
    ran = [r for r in table if r["complete_verdict"]]
    assert ran, "the test needs examples the cascade leaves undecided"
    assert all(r["decided_by"] == "complete" and r["verdict"] == "verified" for r in ran)
    assert all(r["complete_engine"] == "scripted 1.0" and r["alpha_crown_verified"] == "0"
               for r in ran)
    assert not [r for r in table if r["verdict"] == "unknown"]
    entry = summary["results"][0]
    stage = entry["stages"][-1]
    assert stage["stage"] == "complete" and stage["verified"] == stage["examples"] == len(ran)
    assert entry["complete"] == entry["any"] == entry["pgd"] and entry["undecided"] == 0
    assert summary["complete"]["engine"] == "scripted" and summary["complete"]["version"] == "1.0"


def test_tampered_counterexample_is_caught_by_the_replay(trained, scripted, tmp_path):  # noqa: F811
    run_dir, _ = trained
    scripted("falsified")
    certify(complete_cfg(run_dir), tmp_path)
    ran = [r for r in rows(tmp_path) if r["complete_verdict"]]
    assert ran and all(r["complete_verdict"] == "error" and r["verdict"] == "unknown"
                       for r in ran)
    assert all("does not violate" in r["complete_reason"] and float(r["complete_margin"]) > 0
               for r in ran)


def test_complete_verified_but_attack_broken_is_a_soundness_error(trained, scripted, tmp_path):  # noqa: F811
    run_dir, _ = trained
    scripted("verified")
    with pytest.raises(SoundnessError, match="scripted 1.0 verified it but the attack"):
        certify(complete_cfg(run_dir, "cascade=false"), tmp_path)
    saved = json.loads((tmp_path / "certify.json").read_text())
    broken = [r for r in rows(tmp_path) if r["verdict"] == "broken"]
    assert broken and len(saved["results"][0]["violations"]) == len(broken)


def test_alpha_crown_per_example_time_limit(trained, tmp_path):  # noqa: F811
    """``alpha_crown.timeout_s`` stops the slope optimisation early: the bounds stay sound
    (no violation) and verify no more than the full optimisation."""
    from fastcert.certify.command import AlphaDeadline

    deadline = AlphaDeadline(0.05)
    lower = torch.zeros(4, 9)
    assert deadline(lower) is False
    time.sleep(0.25)
    assert deadline(lower) is True
    deadline.reset()
    assert deadline(lower) is False
    run_dir, _ = trained
    full = certify(certify_cfg(run_dir / "last.pt", "eps=0.1", "alpha_crown.iterations=20"),
                   tmp_path / "full")["results"][0]
    cut = certify(certify_cfg(run_dir / "last.pt", "eps=0.1", "alpha_crown.iterations=20",
                              "alpha_crown.timeout_s=1e-9"), tmp_path / "cut")["results"][0]
    assert cut["violations"] == [] and cut["alpha_crown"] <= full["alpha_crown"]
    # the first iterate is common to both; the full run keeps its best iterate
    pairs = [(float(a["alpha_crown_margin_lb"]), float(b["alpha_crown_margin_lb"]))
             for a, b in zip(rows(tmp_path / "cut"), rows(tmp_path / "full"))
             if a["alpha_crown_margin_lb"]]
    assert pairs and all(c <= f + 1e-5 * max(1.0, abs(f)) for c, f in pairs)
