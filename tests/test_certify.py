"""Tests of ``python -m fastcert.certify``: end to end on a briefly trained TINY run, the
verifier cascade (each stage only on undecided examples, verdicts, stage times), α-CROWN,
determinism, per-example invariants in certify.csv, the CROWN memory rule, the choice of run
config (the checkpoint's own, even after a refused run), soundness violations recorded before
failing, and clear errors for corrupt or mismatched checkpoints."""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from fastcert.certify import certify
from fastcert.checkpoint import CheckpointError
from fastcert.diagnostics import crown_cost, relu_sizes
from fastcert.pipeline import run
from fastcert.rebuild import precheck

from conftest import ROOT, TINY, build_model, compose_config

# A run that verifies some test examples in seconds: small MLP, ε=0.05, a few epochs.
TRAIN = TINY + ["model.widths=[32,32]", "epochs=4", "eps=0.05", "data.limit_train=256",
                "optim.lr=5e-3"]
EPS = [0.05, 0.1, 0.2]
FAST_PGD = ["attack=pgd", "attack.steps=10", "attack.step_size=0.25", "progress=false"]
CASCADE = ("ibp", "crown_ibp", "crown", "alpha_crown")


def certify_cfg(checkpoint, *overrides):
    return compose_config("certify", [f"checkpoint={checkpoint}", *FAST_PGD, *overrides])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A TINY IBP run trained for 4 epochs: its run dir (last.pt, metrics.jsonl, results)."""
    run_dir = tmp_path_factory.mktemp("run")
    results = run(compose_config("config", TRAIN), run_dir)
    return run_dir, results


@pytest.fixture(scope="module")
def certified(trained, tmp_path_factory):
    run_dir, _ = trained
    out = tmp_path_factory.mktemp("certify")
    summary = certify(certify_cfg(run_dir / "last.pt", f"eps=[{','.join(map(str, EPS))}]",
                                  "alpha_crown.iterations=5"), out)
    return out, summary


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_end_to_end_outputs(trained, certified):
    run_dir, results = trained
    out, summary = certified
    assert (out / "certify.json").is_file() and (out / "certify.csv").is_file()
    saved = json.loads((out / "certify.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    assert [r["eps"] for r in saved["results"]] == EPS
    assert saved["n_test"] == 48 and saved["config_source"] == "checkpoint"
    assert saved["verifiers"] == list(CASCADE) and saved["skipped"] == {}
    assert saved["cascade"] is True
    assert saved["attack"]["steps"] == 10 and saved["attack"]["step_size"] == pytest.approx(0.25)
    for r in saved["results"]:
        assert set(r) >= {"eps", "clean", "pgd", *CASCADE, "any", "stages", "time_s"}
        # cumulative: verified by a stage or an earlier one
        cumulative = [r[v] for v in CASCADE]
        assert cumulative == sorted(cumulative) and cumulative[-1] == r["any"]
        assert r["any"] <= r["pgd"] <= r["clean"]
        assert r["violations"] == []
    # the clean accuracy does not depend on eps and equals the training run's own evaluation
    assert len({r["clean"] for r in saved["results"]}) == 1
    assert saved["results"][0]["clean"] == pytest.approx(results["clean_acc"])
    # the model learned something certifiable at its training eps (guards a vacuous test)
    assert saved["results"][0]["any"] > 0


def test_cascade_runs_each_stage_only_on_undecided_examples(certified):
    """Per example: exactly one of misclassified / broken / verified-by-one-stage / unknown;
    a stage ran on an example iff every earlier stage left it undecided; stage counts and
    times in certify.json agree with certify.csv."""
    out, summary = certified
    rows = read_csv(out / "certify.csv")
    assert len(rows) == len(EPS) * summary["n_test"]
    for row in rows:
        clean, robust = int(row["clean_correct"]), int(row["pgd_robust"])
        assert clean == int(int(row["label"]) == int(row["prediction"]))
        assert robust <= clean, row                                    # attack-robust ⇒ correct
        ran = [row[f"{v}_verified"] != "" for v in CASCADE]
        if not clean:
            assert (row["verdict"], row["decided_by"]) == ("misclassified", "clean")
            assert not any(ran), row
            continue
        if not robust:
            assert (row["verdict"], row["decided_by"]) == ("broken", "attack")
            assert float(row["attack_margin"]) <= 0 and not any(ran), row
            continue
        assert float(row["attack_margin"]) > 0
        # the stages that ran are a prefix of the cascade, ending where one verified it
        k = sum(ran)
        assert ran == [True] * k + [False] * (len(CASCADE) - k), row
        verdicts = [int(row[f"{v}_verified"]) for v in CASCADE[:k]]
        for v in CASCADE[:k]:
            assert int(row[f"{v}_verified"]) == int(float(row[f"{v}_margin_lb"]) > 0), row
        if row["verdict"] == "verified":
            assert verdicts == [0] * (k - 1) + [1] and row["decided_by"] == CASCADE[k - 1]
        else:
            assert row["verdict"] == "unknown" and row["decided_by"] == ""
            assert verdicts == [0] * len(CASCADE), row          # every stage ran and failed
        for v in CASCADE[k:]:
            assert row[f"{v}_margin_lb"] == "", row             # skipped: decided earlier
    for r in summary["results"]:
        mine = [row for row in rows if float(row["eps"]) == r["eps"]]
        n = len(mine)
        assert sum(int(x["pgd_robust"]) for x in mine) / n == pytest.approx(r["pgd"])
        stages = {s["stage"]: s for s in r["stages"]}
        assert list(stages) == ["attack", *CASCADE]
        for i, v in enumerate(CASCADE):
            ran = [x for x in mine if x[f"{v}_verified"] != ""]
            assert stages[v]["examples"] == len(ran)
            assert stages[v]["decided"] == sum(x["decided_by"] == v for x in mine)
            assert stages[v]["time_s"] >= 0
            so_far = sum(x["decided_by"] in CASCADE[:i + 1] for x in mine) / n
            assert r[v] == pytest.approx(so_far)
        assert stages["attack"]["decided"] == sum(x["verdict"] == "broken" for x in mine)
        assert r["undecided"] == sum(x["verdict"] == "unknown" for x in mine)
        assert r["any"] == pytest.approx(sum(x["verdict"] == "verified" for x in mine) / n)
    # indices are the examples' positions in the full test set, the same at every eps
    by_eps = {}
    for row in rows:
        by_eps.setdefault(row["eps"], []).append(int(row["index"]))
    assert len({tuple(v) for v in by_eps.values()}) == 1


def test_cascade_verifies_what_every_verifier_alone_verifies(trained, certified, tmp_path):
    """cascade=false runs every verifier on every example: each one's own accuracy.
    The cascade verifies exactly the union, and α-CROWN adds examples CROWN alone misses
    (the compat fix at work)."""
    run_dir, _ = trained
    _, cascaded = certified
    alone = certify(certify_cfg(run_dir / "last.pt", f"eps=[{','.join(map(str, EPS))}]",
                                "alpha_crown.iterations=5", "cascade=false"), tmp_path)
    rows = read_csv(tmp_path / "certify.csv")
    assert alone["cascade"] is False
    for a, c in zip(alone["results"], cascaded["results"]):
        assert a["any"] == pytest.approx(c["any"]) and a["pgd"] == c["pgd"]
        for v in CASCADE:   # alone, each verifier ran on every example
            assert {s["stage"]: s["examples"] for s in a["stages"]}[v] == 48
        assert a["alpha_crown"] >= a["crown"]
    mine = [r for r in rows if float(r["eps"]) == 0.2 and r["pgd_robust"] == "1"]
    gains = [float(r["alpha_crown_margin_lb"]) - float(r["crown_margin_lb"]) for r in mine]
    assert min(gains) >= -1e-4 and max(gains) > 1e-3, gains


def test_verified_accuracy_non_increasing_in_eps(certified):
    out, summary = certified
    res = summary["results"]
    for key in ("ibp", "any"):
        values = [r[key] for r in res]
        assert all(a >= b for a, b in zip(values, values[1:])), (key, values)
    # IBP is inclusion-monotone: per example, verified at a larger eps ⇒ verified at smaller
    rows = read_csv(out / "certify.csv")
    ibp = {}
    for row in rows:
        if row["ibp_margin_lb"]:
            ibp.setdefault(int(row["index"]), {})[float(row["eps"])] = float(row["ibp_margin_lb"])
    for idx, by_eps in ibp.items():
        lbs = [by_eps[e] for e in EPS if e in by_eps]
        assert all(a >= b - 1e-5 for a, b in zip(lbs, lbs[1:])), (idx, lbs)


def test_certify_is_deterministic(trained, certified, tmp_path):
    run_dir, _ = trained
    out1, first = certified
    second = certify(certify_cfg(run_dir / "last.pt", f"eps=[{','.join(map(str, EPS))}]",
                                 "alpha_crown.iterations=5"), tmp_path)
    def strip(results):
        return [{k: ([{**st, "time_s": 0} for st in v] if k == "stages" else v)
                 for k, v in r.items() if k != "time_s"} for r in results]

    assert strip(second["results"]) == strip(first["results"])
    assert (tmp_path / "certify.csv").read_bytes() == (out1 / "certify.csv").read_bytes()


def test_default_eps_is_the_training_eps(trained, tmp_path):
    run_dir, _ = trained
    summary = certify(certify_cfg(run_dir / "last.pt", "limit_test=8", "verifiers=[ibp]",
                                  "attack.steps=2"), tmp_path)
    assert [r["eps"] for r in summary["results"]] == [0.05]
    assert summary["n_test"] == 8 and summary["results"][0]["crown"] is None


def test_crown_and_alpha_crown_run_within_the_memory_budget(trained, tmp_path):
    """No size rule skips CROWN or α-CROWN: ``memory_gb`` budgets them (chunks) instead."""
    run_dir, _ = trained
    summary = certify(certify_cfg(run_dir / "last.pt", "limit_test=8", "batch_size=4",
                                  "memory_gb=0.5", "attack.steps=2", "cascade=false"), tmp_path)
    assert summary["skipped"] == {} and summary["verifiers"] == list(CASCADE)
    assert all(summary["results"][0][v] is not None for v in CASCADE)
    rows = read_csv(tmp_path / "certify.csv")
    assert len(rows) == 8 and all(r["alpha_crown_margin_lb"] != "" for r in rows)


def test_crown_cost_rule():
    model = build_model("mlp", (1, 8, 8), 10, bn="none", widths=[32, 16])
    sizes = relu_sizes(model, (1, 8, 8))
    assert sizes == [32, 16]
    # B·(Σ n_i + K)·max(d_in, max n_i) = 4·(48+10)·64
    assert crown_cost(sizes, 64, 10, 4) == 4 * 58 * 64


def test_prefers_the_checkpoints_own_config(trained, tmp_path, capsys):
    """.hydra/config.yaml describes the last launch in the dir; the checkpoint's config is the
    one that trained it: certify uses it and says that the two differ."""
    run_dir, _ = trained
    ckpt = tmp_path / "last.pt"
    shutil.copy(run_dir / "last.pt", ckpt)
    cfg = compose_config("config", TRAIN + ["seed=5"])  # unresolved, as Hydra saves it
    (tmp_path / ".hydra").mkdir()
    OmegaConf.save(cfg, tmp_path / ".hydra" / "config.yaml")
    summary = certify(certify_cfg(ckpt, "verifiers=[ibp]", "attack.steps=2"), tmp_path / "out")
    assert summary["config_source"] == "checkpoint" and summary["run"]["seed"] == 0
    assert "differs from the config that trained last.pt in seed" in capsys.readouterr().out


def test_hydra_config_for_a_checkpoint_without_one(trained, tmp_path):
    import torch

    run_dir, _ = trained
    state = torch.load(run_dir / "last.pt", weights_only=False)
    del state["config"]
    torch.save(state, tmp_path / "last.pt")
    cfg = compose_config("config", TRAIN + ["data.limit_test=16"])  # unresolved, as Hydra saves it
    (tmp_path / ".hydra").mkdir()
    OmegaConf.save(cfg, tmp_path / ".hydra" / "config.yaml")
    assert "${" in (tmp_path / ".hydra" / "config.yaml").read_text()
    summary = certify(certify_cfg(tmp_path / "last.pt", "verifiers=[ibp]", "attack.steps=2"),
                      tmp_path / "out")
    assert summary["config_source"].endswith(os.path.join(".hydra", "config.yaml"))
    assert summary["n_test"] == 16


def test_a_checkpoint_saved_before_the_paths_group(trained, tmp_path):
    """A checkpoint whose config has no ``paths`` node (data.root stored resolved) certifies."""
    import torch

    run_dir, _ = trained
    state = torch.load(run_dir / "last.pt", weights_only=False)
    del state["config"]["paths"]
    state["config"]["data"]["root"] = "./data"
    torch.save(state, tmp_path / "last.pt")
    summary = certify(certify_cfg(tmp_path / "last.pt", "verifiers=[ibp]", "attack.steps=2",
                                  "limit_test=8"), tmp_path / "out")
    assert summary["config_source"] == "checkpoint" and summary["n_test"] == 8


def test_weights_not_matching_config(trained, tmp_path):
    import torch

    run_dir, _ = trained
    state = torch.load(run_dir / "last.pt", weights_only=False)
    state["config"]["model"]["widths"] = [8, 8]
    torch.save(state, tmp_path / "last.pt")
    with pytest.raises(CheckpointError, match="do not fit"):
        certify(certify_cfg(tmp_path / "last.pt", "verifiers=[ibp]"), tmp_path / "out")


def test_corrupt_checkpoint_names_the_file(trained, tmp_path):
    run_dir, _ = trained
    bad = tmp_path / "last.pt"
    data = (run_dir / "last.pt").read_bytes()
    bad.write_bytes(data[: len(data) // 3])  # truncated
    with pytest.raises(CheckpointError, match=str(bad)):
        certify(certify_cfg(bad), tmp_path / "out")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="garbage.pt"):
        certify(certify_cfg(garbage), tmp_path / "out")
    missing = tmp_path / "nope.pt"
    with pytest.raises(CheckpointError, match="nope.pt"):
        certify(certify_cfg(missing), tmp_path / "out")


def test_precheck_of_command_line(tmp_path):
    f = tmp_path / "last.pt"
    f.write_bytes(b"x")
    assert precheck([f"checkpoint={f}"], "fastcert.certify") is None
    assert "does not exist" in precheck([f"checkpoint={tmp_path / 'no.pt'}"], "fastcert.certify")
    assert "missing checkpoint" in precheck(["eps=0.1"], "fastcert.certify")
    assert precheck(["--help"], "fastcert.certify") is None
    assert precheck(["-m", "checkpoint=a.pt,b.pt"], "fastcert.certify") is None


def test_hydra_command_line(trained):
    """The real `python -m fastcert.certify`: outputs in <checkpoint dir>/certify/."""
    run_dir, _ = trained
    cmd = [sys.executable, "-m", "fastcert.certify", f"checkpoint={run_dir / 'last.pt'}",
           "eps=[0.05,0.1]", "limit_test=8", "verifiers=[ibp,crown_ibp]", "attack=pgd",
           "attack.steps=2", "progress=false", "device=cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = run_dir / "certify"
    summary = json.loads((out / "certify.json").read_text())
    assert [r["eps"] for r in summary["results"]] == [0.05, 0.1]
    assert (out / ".hydra" / "config.yaml").is_file()
    assert "CROWN-IBP" in proc.stdout and "IBP" in proc.stdout  # the printed table
    assert "Traceback" not in proc.stderr and "torch.jit" not in proc.stderr
    assert "No CUDA runtime" not in proc.stderr
    bad = subprocess.run([sys.executable, "-m", "fastcert.certify",
                          f"checkpoint={run_dir / 'missing.pt'}"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "missing.pt does not exist" in bad.stderr
    assert not (run_dir / "missing.pt").exists()


@pytest.mark.slow
@pytest.mark.parametrize("model", [
    ["model=resnext", "model.cardinality=2", "model.bottleneck_width=2", "model.stem_width=4",
     "model.fc_width=16"],
    ["model=wide_resnet", "model.widen_factor=1", "model.base_width=4", "model.fc_width=16"],
    ["model=cnn7", "model.width=0.125"],
], ids=["resnext", "wide_resnet", "cnn7"])
def test_certify_conv_and_residual_models(model, tmp_path):
    """Certify (all three verifiers) a briefly trained BN model with residual blocks /
    grouped convolutions; the clean accuracy matches the run's own evaluation."""
    results = run(compose_config("config", TINY + ["epochs=2", "eps=0.05"] + model),
                  tmp_path / "run")
    summary = certify(certify_cfg(tmp_path / "run" / "last.pt", "eps=[0.02,0.05]",
                                  "cascade=false", "alpha_crown.iterations=2"), tmp_path / "out")
    assert summary["skipped"] == {} and summary["n_test"] == 48
    res = summary["results"]
    assert res[0]["clean"] == pytest.approx(results["clean_acc"])
    for r in res:
        assert max(r[v] for v in CASCADE) <= r["any"] <= r["pgd"] <= r["clean"]


@pytest.mark.parametrize("override,match", [
    ("cascade=maybe", "cascade='maybe': expected true or false"),
    ("batch_size=0", "batch_size=0: must be a positive integer"),
    ("limit_test=abc", "limit_test='abc': expected an integer"),
    ("attack.steps=abc", "attack.steps='abc': expected an integer"),
    ("attack.loss=hinge", "attack.loss='hinge': choose one of margin, ce"),
    ("verifiers=[ibp,foo]", "unknown verifier 'foo'"),
    ("alpha_crown.lr=abc", "alpha_crown.lr='abc': expected a number"),
    ("memory_gb=lots", "memory_gb='lots': expected a number"),
    ("memory_gb=0", "memory_gb=0: expected a number > 0 (or null)"),
    ("workers=0", "workers=0: must be a positive integer"),
    ("shard=2/2", "shard=2/2: expected i/n with 0 <= i < n"),
    ("alpha_crown.timeout_s=-1", "alpha_crown.timeout_s=-1: expected a number > 0"),
    ("complete.engine=nope", "complete.engine=nope: unknown engine 'nope'"),
    ("eps=2", "eps=2.0 exceeds the data range"),
    ("eps=8/255", None),
])
def test_certify_checks_its_own_keys(trained, tmp_path, override, match):
    from fastcert.config import ConfigError

    run_dir, _ = trained
    cfg = certify_cfg(run_dir / "last.pt", "limit_test=4", "verifiers=[ibp]", override)
    if match is None:   # a fraction is a radius
        summary = certify(cfg, tmp_path)
        assert summary["results"][0]["eps"] == pytest.approx(8 / 255)
        return
    with pytest.raises(ConfigError, match=re.escape(match)):
        certify(cfg, tmp_path)
    assert not (tmp_path / "certify.json").exists()


def test_command_line_config_error_is_one_line(trained, tmp_path):
    run_dir, _ = trained
    proc = subprocess.run([sys.executable, "-m", "fastcert.certify",
                           f"checkpoint={run_dir / 'last.pt'}", "cascade=maybe",
                           f"hydra.run.dir={tmp_path}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: ConfigError: cascade='maybe': expected true or false")
