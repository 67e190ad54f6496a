"""NeuralSAT 0.2.17 as certify's complete engine, on a network built by hand (1 input, 2 ReLUs,
2 classes) whose margin is a tent: y_1 - y_0 = ReLU(x) - 2 ReLU(x - 0.5) - c on x ∈ [-1, 1],
maximal (0.5 - c) at x = 0.5. α-CROWN's best linear bound of it is 0.75 - c (the lower
relaxation a·(x - 0.5) of ReLU(x - 0.5) with a = 1/4 makes it constant), so for c = 0.6 the
example is robust but α-CROWN cannot show it; branch and bound on one neuron can. For c = 0.4 it
is not robust and the counterexample must replay. Needs the NeuralSAT environment (``make
neuralsat``; ``FASTCERT_NEURALSAT_VENV`` points elsewhere); skipped without it."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from fastcert.complete.engine import Limits
from fastcert.complete.neuralsat import NeuralSAT
from fastcert.complete.replay import replay
from fastcert.export import vnnlib_text, write_onnx

from conftest import ROOT
from test_certify import trained  # noqa: F401  (the TINY run)

VENV = Path(os.environ.get("FASTCERT_NEURALSAT_VENV", ROOT / ".venv-neuralsat"))
pytestmark = [
    pytest.mark.neuralsat,
    pytest.mark.skipif(not (VENV / "bin" / "python").is_file(),
                       reason=f"NeuralSAT venv missing at {VENV}: run `make neuralsat` or set "
                              f"FASTCERT_NEURALSAT_VENV"),
]
LIMITS = Limits(timeout_s=60, memory_gb=4, grace_s=90)


def tent(c: float) -> torch.nn.Sequential:
    net = torch.nn.Sequential(torch.nn.Linear(1, 2), torch.nn.ReLU(), torch.nn.Linear(2, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0], [1.0]]))
        net[0].bias.copy_(torch.tensor([0.0, -0.5]))
        net[2].weight.copy_(torch.tensor([[0.0, 0.0], [1.0, -2.0]]))
        net[2].bias.copy_(torch.tensor([c, 0.0]))
    return net.eval()


LOWER, UPPER = torch.tensor([-1.0]), torch.tensor([1.0])


def alpha_crown_margin(net) -> float:
    from fastcert.bounds.lirpa import auto_lirpa

    lirpa = auto_lirpa()
    bounded = lirpa.BoundedModule(net, torch.zeros(1, 1))
    x = lirpa.BoundedTensor(torch.zeros(1, 1),
                            lirpa.PerturbationLpNorm(x_L=LOWER[None], x_U=UPPER[None]))
    spec = torch.tensor([[[1.0, -1.0]]])  # y_0 - y_1
    bounded.set_bound_opts({"optimize_bound_args": {"iteration": 100, "lr_alpha": 0.5}})
    lb, _ = bounded.compute_bounds(x=(x,), method="CROWN-Optimized", C=spec, bound_upper=False)
    return lb.item()


def decide(net, tmp_path: Path):
    write_onnx(net, (1,), tmp_path / "model.onnx", opset=13)
    (tmp_path / "p.vnnlib").write_text(vnnlib_text(LOWER, UPPER, 0, 2))
    return NeuralSAT(str(VENV)).verify(tmp_path / "model.onnx", tmp_path / "p.vnnlib", LIMITS,
                                       tmp_path / "work")


def test_neuralsat_verifies_what_alpha_crown_cannot(tmp_path):
    net = tent(0.6)
    assert alpha_crown_margin(net) < 0  # α-CROWN: undecided
    verdict = decide(net, tmp_path)
    assert verdict.verdict == "verified", (verdict, (tmp_path / "work" / "neuralsat.log")
                                           .read_text()[-2000:])


def test_neuralsat_counterexample_replays(tmp_path):
    net = tent(0.4)
    verdict = decide(net, tmp_path)
    assert verdict.verdict == "falsified", verdict
    r = replay(net, verdict.counterexample, LOWER, UPPER, label=0)
    assert r.violates and r.margin <= 0
    assert NeuralSAT(str(VENV)).version() == "0.2.17"


def test_certify_with_neuralsat_falsifies_what_a_weak_attack_missed(trained, tmp_path):  # noqa: F811
    """Through certify on the TINY run: a 5-step PGD leaves examples that α-CROWN cannot
    verify; NeuralSAT finds counterexamples for them, each replayed (negative margin)."""
    import csv

    from fastcert.certify import certify

    from test_certify import certify_cfg

    run_dir, _ = trained
    cfg = certify_cfg(run_dir / "last.pt", "eps=0.05", "attack.steps=5", "attack.step_size=0.0125",
                      "batch_size=8",
                      "limit_test=16", "alpha_crown.iterations=2", "complete.engine=neuralsat",
                      f"complete.neuralsat.venv={VENV}", "complete.timeout_s=30")
    summary = certify(cfg, tmp_path)
    with open(tmp_path / "certify.csv", newline="") as f:
        ran = [r for r in csv.DictReader(f) if r["complete_verdict"]]
    assert ran and all(r["alpha_crown_verified"] == "0" for r in ran)
    falsified = [r for r in ran if r["complete_verdict"] == "falsified"]
    assert falsified and all(float(r["complete_margin"]) < 0 and r["verdict"] == "broken"
                             for r in falsified)
    assert summary["complete"]["version"] == "0.2.17"
