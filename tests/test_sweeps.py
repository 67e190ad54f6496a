"""Experiments at scale: launcher / sweeper configs, a real joblib multirun and Optuna search
through ``python -m fastcert.run``, and the results table (experiments.table)."""
from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from experiments import table as T
from fastcert import resolvers
from fastcert.resolvers import default_n_jobs

ROOT = Path(__file__).resolve().parents[1]
TINY_RUN = ["debug=smoke", "device=cpu", "data.limit_train=96", "data.limit_test=48"]


def _fastcert(args, tmp_path, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", WANDB_MODE="disabled",
               HYDRA_FULL_ERROR="1", FASTCERT_LOCK_DIR=str(tmp_path / "locks"))
    proc = subprocess.run([sys.executable, "-m", "fastcert.run", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (f"fastcert.run failed:\n{proc.stdout[-3000:]}\n"
                                  f"{proc.stderr[-5000:]}")
    return proc


# --------------------------------------------------------------------------- configs


@pytest.fixture
def no_cuda(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.filterwarnings(r"ignore:\s*'hydra/launcher/joblib' is validated")  # joblib.yaml
def test_joblib_launcher_defaults_to_pool_size(compose, no_cuda):
    resolvers.register()  # as fastcert.run does: ${fastcert.n_jobs:...}
    cfg = compose(["hydra/launcher=joblib"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("JoblibLauncher")
    assert launcher.n_jobs == default_n_jobs() == 2  # CPU-only: 2 jobs
    cfg = compose(["hydra/launcher=joblib", "++devices=[0,2,3]"], return_hydra_config=True)
    assert cfg.hydra.launcher.n_jobs == 3
    cfg = compose(["hydra/launcher=joblib", "hydra.launcher.n_jobs=5"], return_hydra_config=True)
    assert cfg.hydra.launcher.n_jobs == 5


def test_sweep_dirs_are_named_by_job_num_and_overrides(compose):
    cfg = compose([], return_hydra_config=True)
    sweep = OmegaConf.to_container(cfg.hydra.sweep, resolve=False)
    assert sweep["subdir"] == "${hydra.job.num}_${hydra.job.override_dirname}"
    assert sweep["dir"].startswith("multirun/")
    exclude = set(cfg.hydra.job.config.override_dirname.exclude_keys)
    assert {"device", "devices", "resume.checkpoint", "resume.allow_changes"} <= exclude


def test_slurm_launcher_config(compose):
    cfg = compose(["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
                  return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.partition == "gpu"
    assert launcher.gpus_per_node == 1 and launcher.gpus_per_task is None
    for key in ("timeout_min", "cpus_per_task", "mem_gb"):
        assert isinstance(launcher[key], int) and launcher[key] > 0


def test_fast_optuna_search_composes(compose):
    cfg = compose(["hparams_search=fast_optuna"], return_hydra_config=True)
    assert cfg.method.name == "fast" and cfg.init.name == "ibp"
    assert cfg.optimized_metric == "ibp_verified_acc"
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper")
    assert sweeper.direction == "maximize" and sweeper.n_trials > 0
    assert set(sweeper.params) == {"schedule.length", "method.warmup.lambda0"}
    assert sweeper.params["schedule.length"].startswith("range(")
    assert sweeper.params["method.warmup.lambda0"].startswith("interval(")


# --------------------------------------------------------------------------- real sweeps


def test_joblib_multirun_and_table(tmp_path, capsys):
    """Acceptance: 2 methods × 2 seeds of the digits default through the joblib launcher, one
    `<job num>_<overrides>` dir with results.json per job, and a 2-row table with n=2."""
    sweep = tmp_path / "sweep"
    t0 = time.perf_counter()
    _fastcert(["-m", "method=ibp,fast", "seed=0,1", "hydra/launcher=joblib",
               "hydra.launcher.n_jobs=2", "epochs=2", *TINY_RUN, f"hydra.sweep.dir={sweep}"],
              tmp_path)
    print(f"joblib multirun: {time.perf_counter() - t0:.1f}s")
    job_dirs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(job_dirs) == 4
    seen = set()
    for d in job_dirs:
        m = re.fullmatch(r"(\d)_(.*)", d.name)
        assert m, d.name
        hydra_cfg = yaml.safe_load((d / ".hydra" / "hydra.yaml").read_text())["hydra"]
        assert m.group(1) == str(hydra_cfg["job"]["num"])
        assert m.group(2) == hydra_cfg["job"]["override_dirname"]
        assert "device=" not in d.name and "epochs=2" in d.name
        assert hydra_cfg["launcher"]["_target_"].endswith("JoblibLauncher")
        results = json.loads((d / "results.json").read_text())
        assert f"method={results['method']}" in d.name and f"seed={results['seed']}" in d.name
        assert results["clean_acc"] >= results["ibp_verified_acc"]
        seen.add((results["method"], results["seed"]))
    assert seen == {("ibp", 0), ("ibp", 1), ("fast", 0), ("fast", 1)}

    out_csv = tmp_path / "table.csv"
    assert T.main([str(sweep), "--csv", str(out_csv)]) == 0
    text = capsys.readouterr().out
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    header, rows = lines[0], lines[2:]
    assert len(rows) == 2, text
    assert header.startswith("| method | n | Standard error (%) | Verified error IBP (%)")
    assert {r.split("|")[1].strip() for r in rows} == {"ibp", "fast"}
    assert all(r.split("|")[2].strip() == "2" for r in rows)
    assert all("±" in r for r in rows)
    with open(out_csv) as f:
        got = list(csv.DictReader(f))
    assert [(r["method"], r["n"], r["seeds"]) for r in got] == [("fast", "2", "0 1"),
                                                                ("ibp", "2", "0 1")]


def test_optuna_two_trials(tmp_path):
    sweep = tmp_path / "optuna"
    t0 = time.perf_counter()
    _fastcert(["hparams_search=fast_optuna", "hydra.sweeper.n_trials=2", *TINY_RUN,
               "schedule.length=range(1,2)", f"hydra.sweep.dir={sweep}"], tmp_path)
    print(f"optuna 2 trials: {time.perf_counter() - t0:.1f}s")
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["name"] == "optuna"
    assert 0.0 <= float(best["best_value"]) <= 1.0
    assert set(best["best_params"]) == {"schedule.length", "method.warmup.lambda0"}
    assert best["best_params"]["schedule.length"] in (1, 2)
    assert 0.0 <= best["best_params"]["method.warmup.lambda0"] <= 1.0
    trials = sorted(sweep.glob("*/results.json"))
    assert len(trials) == 2
    values = [json.loads(p.read_text())["ibp_verified_acc"] for p in trials]
    assert float(best["best_value"]) == pytest.approx(max(values))
    assert all(json.loads(p.read_text())["method"] == "fast" for p in trials)


# --------------------------------------------------------------------------- table, synthetic runs

BASE = {
    "data": {"name": "digits", "root": "./data", "eps": 0.1, "eps_max": 1.0, "batch_size": 64},
    "model": {"name": "mlp", "bn": "full", "widths": [256, 256]},
    "init": {"name": "default"},
    "schedule": {"kind": "linear", "start": 0, "length": 1},
    "logger": {"name": "none", "log_every": 0},
    "seed": 0, "device": "auto", "devices": None, "epochs": 2, "eps": "${data.eps}",
    "resume": None, "optimized_metric": None,
}


def _fake_run(root: Path, name: str, *, method: dict, seed: int, clean: float, ibp: float,
              crown=None, hydra=True, mtime=None, **top):
    cfg = json.loads(json.dumps(BASE))
    cfg["method"] = method
    if method["name"] == "fast":
        cfg["init"] = {"name": "ibp"}
    cfg.update(seed=seed, **top)
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    if hydra:
        (run / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
    results = {"clean_acc": clean, "pgd_acc": clean - 0.05, "ibp_verified_acc": ibp,
               "crown_verified_acc": crown, "method": method["name"], "model": "mlp",
               "data": "digits", "init": cfg["init"]["name"], "eps": 0.1, "epochs": cfg["epochs"],
               "seed": seed}
    (run / "results.json").write_text(json.dumps(results))
    if mtime is not None:
        os.utime(run / "results.json", (mtime, mtime))
    return run


IBP = {"name": "ibp", "kappa": {"start": 0.0, "end": 0.0}, "tau": 0.5}


def _fast(lam=0.5):
    return {"name": "fast", "warmup": {"lambda0": lam, "tau": 0.5, "tightness": True, "relu": True}}


def test_table_groups_by_differing_config_except_seed(tmp_path):
    for s, (c, v) in enumerate([(0.90, 0.70), (0.80, 0.60), (0.85, 0.65)]):
        _fake_run(tmp_path / "a", f"ibp{s}", method=IBP, seed=s, clean=c, ibp=v,
                  device=f"cuda:{s}", logger={"name": "wandb", "project": f"p{s}"})
    for s in range(2):
        _fake_run(tmp_path / "b", f"fast{s}", method=_fast(), seed=s, clean=0.95, ibp=0.75 + s / 10,
                  data={**BASE["data"], "root": f"/scratch/{s}"})
    runs = T.collect_runs([tmp_path / "a", tmp_path / "b"])
    assert len(runs) == 5
    assert runs[0].config["eps"] == 0.1  # ${data.eps} resolved
    keys, rows = T.group_runs(runs)
    # method decides lambda0, tightness and init: one column; device/logger/root/seed: none
    assert keys == ["method.name"]
    assert [(r.values["method.name"], r.n) for r in rows] == [("fast", 2), ("ibp", 3)]
    assert T.error_stats(rows[1], "clean_acc") == pytest.approx((15.0, 5.0, 3))
    mean, std, n = T.error_stats(rows[0], "ibp_verified_acc")
    assert (mean, n) == pytest.approx((20.0, 2)) and std == pytest.approx(7.0711, abs=1e-4)
    text, _, _, metrics = T.table(runs)
    assert "5 runs; data=digits, model=mlp, eps=0.1, epochs=2" in text
    assert "| fast | 2 | 5.00 ± 0.00 | 20.00 ± 7.07 |" in text
    assert "| ibp | 3 | 15.00 ± 5.00 | 35.00 ± 5.00 |" in text
    assert [m[1] for m in metrics] == ["clean_acc", "ibp_verified_acc", "pgd_acc"]  # no CROWN


def test_table_hyperparameter_columns_crown_and_csv(tmp_path):
    _fake_run(tmp_path, "f1", method=_fast(0.2), seed=0, clean=0.9, ibp=0.6, crown=0.62)
    _fake_run(tmp_path, "f2", method=_fast(0.2), seed=1, clean=0.9, ibp=0.6, crown=0.64)
    _fake_run(tmp_path, "f3", method=_fast(0.4), seed=0, clean=0.8, ibp=0.7)
    _fake_run(tmp_path, "i1", method=IBP, seed=0, clean=0.7, ibp=0.5, epochs=4)
    keys, rows = T.group_runs(T.collect_runs([tmp_path]))
    assert keys == ["method.name", "epochs", "method.warmup.lambda0"]
    assert [tuple(r.values.values()) for r in rows] == [
        ("fast", 2, 0.2), ("fast", 2, 0.4), ("ibp", 4, "–")]
    out = tmp_path / "t.csv"
    assert T.main([str(tmp_path), "--csv", str(out)]) == 0
    got = list(csv.DictReader(open(out)))
    assert got[0]["crown_verified_err_mean"] == "37.0000"
    assert got[0]["crown_verified_err_std"] == "1.4142"
    assert got[1]["crown_verified_err_mean"] == "" and got[1]["n"] == "1"
    assert got[1]["clean_err_std"] == ""  # one seed: no std


def test_table_keeps_newest_of_a_repeated_seed_and_reads_runs_without_config(tmp_path, capsys):
    now = time.time()
    _fake_run(tmp_path, "old", method=IBP, seed=0, clean=0.5, ibp=0.1, mtime=now - 100)
    _fake_run(tmp_path, "new", method=IBP, seed=0, clean=0.9, ibp=0.8, mtime=now)
    _fake_run(tmp_path, "bare", method=_fast(), seed=0, clean=0.9, ibp=0.8, hydra=False)
    runs = T.collect_runs([tmp_path, tmp_path / "new"])  # overlapping dirs count once
    assert len(runs) == 3
    keys, rows = T.group_runs(runs)
    assert keys == ["method.name"]
    ibp = next(r for r in rows if r.values["method.name"] == "ibp")
    assert ibp.n == 1 and ibp.runs[0].source.endswith("new")
    assert "repeats seed 0" in capsys.readouterr().err


def test_table_cli_errors(tmp_path, capsys, monkeypatch):
    assert T.main([str(tmp_path)]) == 1
    with pytest.raises(SystemExit):
        T.main([str(tmp_path / "missing")])
    monkeypatch.setenv("WANDB_MODE", "offline")
    with pytest.raises(SystemExit, match="online"):
        T.main(["--wandb", "someone/fastcert"])
