"""End to end: `python -m fastcert.run` as a user runs it, and the run-dir contract."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastcert.pipeline import run

from conftest import ROOT, TINY

RESULT_KEYS = {"clean_acc", "pgd_acc", "ibp_verified_acc", "crown_verified_acc", "eps", "epochs",
               "method", "model", "data", "wall_time_s"}


def _cli(args, cwd, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "fastcert.run", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def _check_invariant(results):
    assert results["ibp_verified_acc"] <= results["pgd_acc"] <= results["clean_acc"]
    if results["crown_verified_acc"] is not None:
        assert results["crown_verified_acc"] <= results["pgd_acc"]


def test_cli_run_writes_the_run_dir(tmp_path):
    run_dir = tmp_path / "run"
    proc = _cli(TINY + ["eval.verifiers=[ibp,crown]", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert RESULT_KEYS <= set(results)
    assert results["method"] == "ibp" and results["data"] == "digits" and results["epochs"] == 2
    _check_invariant(results)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [rec["epoch"] for rec in lines] == [1, 2]
    for key in ("eps", "loss", "train_clean_acc", "epoch_time_s", "phase"):
        assert key in lines[0]
    assert (run_dir / "last.pt").is_file() and (run_dir / ".hydra" / "config.yaml").is_file()
    assert {p.name for p in (run_dir / ".hydra").iterdir()} == {"config.yaml", "hydra.yaml",
                                                                "overrides.yaml"}
    # the final table: every accuracy, any-verified and the number of test examples
    assert "IBP-verified accuracy" in proc.stdout and "verified by any" in proc.stdout
    assert f"{results['n_test']} test examples" in proc.stdout
    assert results["any_verified_acc"] is not None and "pgd_attack" in results
    # the run dir, printed first and last
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == lines[-1] == f"run dir: {run_dir}"
    # no known-harmless warnings, no tracebacks
    for noise in ("torch.jit", "No CUDA runtime", "alembic", "Traceback"):
        assert noise not in proc.stdout + proc.stderr, noise


@pytest.mark.parametrize("method", ["natural", "ibp", "crown_ibp", "fast"])
def test_each_method_trains_and_keeps_the_invariant(compose, tmp_path, method):
    results = run(compose(TINY + [f"method={method}"]), tmp_path)
    assert results["method"] == method
    _check_invariant(results)


def test_crown_ibp_margin_form_runs(compose, tmp_path):
    results = run(compose(TINY + ["method=crown_ibp", "method.loss_fusion=false"]), tmp_path)
    _check_invariant(results)


def test_failing_run_deletes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    keep = run_dir / "notes.txt"
    keep.write_text("mine")
    proc = _cli(TINY + ["eps=-0.1", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert proc.returncode != 0
    assert "must be >= 0" in proc.stderr
    assert keep.read_text() == "mine"
    assert not (run_dir / "results.json").exists()


def test_unknown_model_names_the_options(tmp_path):
    proc = _cli(["model=resnet999"], cwd=tmp_path)
    assert proc.returncode != 0
    assert "resnet999" in proc.stderr and "cnn7" in proc.stderr


def test_wandb_offline_run_completes(tmp_path):
    run_dir = tmp_path / "run"
    proc = _cli(TINY + ["logger=wandb", "logger.log_every=1", f"hydra.run.dir={run_dir}"],
                cwd=tmp_path, env={"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path),
                                   "WANDB_SILENT": "true"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    offline = list(Path(run_dir).glob(f"wandb/offline-run-*-{run_id}"))
    assert offline, list(Path(run_dir).rglob("*"))[:20]
    assert list(offline[0].glob("run-*.wandb"))


@pytest.mark.parametrize("override,message", [
    ("optim.lr=abc", "error: ConfigError: optim.lr='abc': expected a number"),
    ("+epoch=3", "error: ConfigError: epoch is not a top-level key; did you mean epochs=...?"),
    ("resume=true", "error: ConfigError: resume=True: resume is a group of keys"),
    ("resume.checkpoint=last", "error: CheckpointError: resume: no checkpoint at"),
    ("epoch=3", "error: unknown key epoch; did you mean epochs?"),
    ("method=fats", "error: method=fats: no such option; choose from cc_ibp, crown,"),
    ("optim.lr=1e30", "error: TrainingDiverged: the training loss is nan at epoch 1"),
])
def test_config_errors_print_one_line_without_traceback(tmp_path, override, message):
    proc = _cli(TINY + [override, f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(message), proc.stderr[-3000:]


def test_a_refused_run_leaves_the_trained_config_and_certify_reads_it(tmp_path):
    """Train, then a fresh run with another seed in the same dir: refused, .hydra/ untouched
    (the refusal says "nothing was changed", and .hydra/ must agree), and certify reports the
    true numbers of the trained model (the new seed's digits split would give others)."""
    from fastcert.certify import certify

    from test_certify import certify_cfg

    run_dir = tmp_path / "run"
    trained = _cli(TINY + [f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    before = {p.name: p.read_bytes() for p in (run_dir / ".hydra").iterdir()}
    refused = _cli(TINY + ["seed=1", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert refused.returncode == 2 and "already holds a run" in refused.stderr
    assert {p.name: p.read_bytes() for p in (run_dir / ".hydra").iterdir()} == before
    summary = certify(certify_cfg(run_dir / "last.pt", "verifiers=[ibp]", "attack.steps=3",
                                  "attack.step_size=0.25"), tmp_path / "certify")
    assert summary["run"]["seed"] == 0 and summary["n_test"] == results["n_test"]
    assert summary["results"][0]["clean"] == pytest.approx(results["clean_acc"])
