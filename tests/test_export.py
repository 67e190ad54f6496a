"""``python -m fastcert.export``: the ONNX model computes the same logits as the trained
model (reloaded with onnxruntime), each VNN-LIB file parses back to the exact eps box and the
negated robustness property, and only_undecided exports exactly certify's undecided
examples."""
from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, compose_config
from test_certify import TRAIN, trained  # noqa: F401  (the module's trained run)

onnxruntime = pytest.importorskip("onnxruntime", reason="dev extra: pip install -e '.[dev]'")

from fastcert import checkpoint as ckpt  # noqa: E402
from fastcert.export import export  # noqa: E402
from fastcert.pipeline import build  # noqa: E402
from fastcert.settings import validate  # noqa: E402

EPS = 0.05


def export_cfg(checkpoint, *overrides):
    return compose_config("export", [f"checkpoint={checkpoint}", *overrides])


def parse_vnnlib(text: str):
    """(lower, upper, disjuncts) of a VNN-LIB property as fastcert writes it: a box on the
    X_i and a disjunction of (>= Y_a Y_b) terms."""
    n = len(re.findall(r"\(declare-const X_(\d+) Real\)", text))
    lower, upper = np.full(n, np.nan), np.full(n, np.nan)
    for op, i, v in re.findall(r"\(assert \((<=|>=) X_(\d+) (\S+)\)\)", text):
        (upper if op == "<=" else lower)[int(i)] = float(v)
    disjuncts = [(int(a), int(b)) for a, b in re.findall(r"\(and \(>= Y_(\d+) Y_(\d+)\)\)", text)]
    k = len(re.findall(r"\(declare-const Y_(\d+) Real\)", text))
    return lower, upper, disjuncts, k


@pytest.fixture(scope="module")
def model_and_data(trained):  # noqa: F811
    run_dir, _ = trained
    state = ckpt.load(run_dir / "last.pt")
    from omegaconf import OmegaConf
    cfg = OmegaConf.create(state["config"])
    built = build(validate(cfg), torch.device("cpu"))
    built.net.model.load_state_dict(state["model"])
    return built.net.model.eval(), built.data


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):  # noqa: F811
    run_dir, _ = trained
    out = tmp_path_factory.mktemp("export")
    summary = export(export_cfg(run_dir / "last.pt", f"eps={EPS}"), out)
    return out, summary


def test_onnx_logits_equal_the_models(exported, model_and_data):
    out, summary = exported
    model, data = model_and_data
    session = onnxruntime.InferenceSession(str(out / "model.onnx"))
    assert [i.name for i in session.get_inputs()] == ["input"]
    x, _ = next(iter(data.test))
    with torch.no_grad():
        want = model(x).numpy()
    got = np.concatenate([session.run(["logits"], {"input": x[i:i + 1].numpy()})[0]
                          for i in range(len(x))])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert summary["input_shape"] == [1, 8, 8] and summary["num_classes"] == 10


def test_vnnlib_parses_back_to_the_box_and_the_negated_property(exported, model_and_data):
    out, summary = exported
    _, data = model_and_data
    assert len(summary["properties"]) == 48                     # every test example
    lines = (out / "instances.csv").read_text().splitlines()
    assert lines == [f"model.onnx,{p['vnnlib']},300" for p in summary["properties"]]
    x_all, y_all = map(torch.cat, zip(*data.test))
    indices = list(data.test.dataset.indices)
    for p in summary["properties"][:10]:
        pos = indices.index(p["index"])
        x, y = x_all[pos], int(y_all[pos])
        lower, upper, disjuncts, k = parse_vnnlib((out / p["vnnlib"]).read_text())
        lo, hi = data.eps_box(x[None], EPS)
        # the float32 box, exactly, in C-order; it contains the exact pixel box and x
        assert np.array_equal(lower, lo.flatten().numpy().astype(np.float64))
        assert np.array_equal(upper, hi.flatten().numpy().astype(np.float64))
        exact = x.double().flatten().numpy()
        assert ((lower <= np.maximum(exact - EPS, 0)).all()
                and (upper >= np.minimum(exact + EPS, 1)).all())
        assert k == 10 and p["label"] == y
        assert sorted(disjuncts) == [(j, y) for j in range(10) if j != y]


def test_only_undecided_reads_certify_csv(trained, tmp_path):  # noqa: F811
    from fastcert.certify import certify

    from test_certify import certify_cfg

    run_dir, _ = trained
    certify(certify_cfg(run_dir / "last.pt", f"eps=[{EPS},0.2]", "alpha_crown.iterations=2"),
            tmp_path / "certify")
    with open(tmp_path / "certify" / "certify.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if float(r["eps"]) == EPS]
    undecided = sorted(int(r["index"]) for r in rows if r["verdict"] == "unknown")
    assert 0 < len(undecided) < len(rows), "the test needs some undecided examples"
    summary = export(export_cfg(run_dir / "last.pt", f"eps={EPS}", "only_undecided=true",
                                f"certify_csv={tmp_path / 'certify' / 'certify.csv'}"),
                     tmp_path / "out")
    assert sorted(p["index"] for p in summary["properties"]) == undecided
    assert sorted(p.name for p in (tmp_path / "out" / "vnnlib").iterdir()) == sorted(
        f"{i}.vnnlib" for i in undecided)
    from fastcert.config import ConfigError
    with pytest.raises(ConfigError, match=r"no rows at eps=0.1"):
        export(export_cfg(run_dir / "last.pt", "eps=0.1", "only_undecided=true",
                          f"certify_csv={tmp_path / 'certify' / 'certify.csv'}"), tmp_path / "x")


def test_command_line_writes_into_the_checkpoint_dir(trained):  # noqa: F811
    run_dir, _ = trained
    proc = subprocess.run([sys.executable, "-m", "fastcert.export",
                           f"checkpoint={run_dir / 'last.pt'}", "limit_test=4"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = run_dir / "export"
    summary = json.loads((out / "export.json").read_text())
    assert summary["eps"] == pytest.approx(0.05) and len(summary["properties"]) == 4
    assert (out / "model.onnx").is_file() and len(list((out / "vnnlib").iterdir())) == 4
    assert "Traceback" not in proc.stderr and "Warning" not in proc.stderr, proc.stderr


def test_default_radius_is_the_runs_test_radius(trained, tmp_path):  # noqa: F811
    """Like certify: without eps= the export uses the run's eval.eps (e.g. CROWN-IBP's MNIST
    train 0.4 / test 0.3), else its training eps."""
    run_dir, _ = trained
    state = ckpt.load(run_dir / "last.pt")
    state["config"]["eval"]["eps"] = 0.04
    torch.save(state, tmp_path / "last.pt")
    summary = export(export_cfg(tmp_path / "last.pt", "limit_test=2"), tmp_path / "export")
    assert summary["eps"] == pytest.approx(0.04)
