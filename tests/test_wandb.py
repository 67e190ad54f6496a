"""``logger=wandb`` with the real ``wandb`` library in offline mode, checked by reading what it
wrote: each run's ``.wandb`` transaction log, decoded by the reader wandb ships
(``wandb leet inspect --json``: one JSON object per record, run by wandb-core). No mocks.

Everything W&B writes goes under the test's tmp_path (``WANDB_DIR``, ``WANDB_CACHE_DIR``,
``WANDB_DATA_DIR``, ``WANDB_CONFIG_DIR``), and runs are offline, so no network is needed.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, TINY, once_per_session

SCALAR_EPOCH_KEYS = ("loss", "loss/natural", "loss/robust", "kappa", "lambda", "reg/tightness",
                     "reg/relu", "train_clean_acc", "train_verified_acc", "eps", "lr",
                     "epoch_time_s")


# ---- reading offline runs ----------------------------------------------------------------
def wandb_env(root: Path) -> dict[str, str]:
    """Environment that keeps every W&B file under ``root`` and the run offline."""
    return {"WANDB_MODE": "offline", "WANDB_DIR": str(root), "WANDB_CACHE_DIR": str(root / "cache"),
            "WANDB_DATA_DIR": str(root / "data"), "WANDB_CONFIG_DIR": str(root / "config"),
            "WANDB_SILENT": "true", "WANDB_CONSOLE": "off"}


def offline_runs(run_dir: Path) -> list[Path]:
    """The ``.wandb`` files under ``<run_dir>/wandb``, oldest first (one per process)."""
    return sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"),
                  key=lambda p: p.parent.name.split("-")[2])


def read_records(wandb_file: Path) -> list[dict]:
    """Every record of a ``.wandb`` transaction log as a dict (``type`` says which kind)."""
    proc = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json",
                           str(wandb_file)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert not records or records[0]["type"] == "header", proc.stdout[:500]
    return records  # empty for a log that holds only its file header


class OfflineRun:
    """What one process logged to one W&B run, decoded from its ``.wandb`` file.

    ``complete=False`` accepts the log of a killed process, which holds only what W&B had
    flushed (possibly nothing but the file header: then ``run`` and ``id`` are None)."""

    def __init__(self, wandb_file: Path, complete: bool = True):
        self.file = wandb_file
        self.records = read_records(wandb_file)
        runs = [r["run"] for r in self.records if r["type"] == "run"]
        assert len(runs) == 1 or (not complete and not runs), [r["type"] for r in self.records]
        self.run = runs[0] if runs else None
        self.id = self.run["run_id"] if runs else None
        self.config: dict = {}
        for r in self.records:  # the run record's config, then any later updates
            if r["type"] in ("run", "config"):
                self.config.update(_config_update(r[r["type"]]))
        self.config.pop("_wandb", None)
        self.history = [r["history"]["item"] for r in self.records if r["type"] == "history"]
        self.summary: dict = {}
        for r in self.records:
            if r["type"] == "summary":
                self.summary.update(r["summary"].get("update", {}))
        self.exit_code = next((r["exit"].get("exit_code", 0) for r in self.records
                               if r["type"] == "exit"), None)

    def rows(self, key: str) -> list[dict]:
        return [row for row in self.history if key in row]


def _config_update(rec: dict) -> dict:
    """``run`` records carry ``{"config": {"update": ...}}``, ``config`` records
    ``{"update": ...}``."""
    return (rec["config"] if "config" in rec else rec).get("update", {})


def _cli(args, cwd, env, timeout=600):
    return subprocess.run([sys.executable, "-m", "fastcert.run", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env})


# ---- a real CLI run ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """``python -m fastcert.run`` with logger=wandb under an experiment preset, offline via
    ``WANDB_MODE`` (the config's default mode), then ``resume.checkpoint=last`` in the same run
    dir."""
    def make(root):
        run_dir = root / "run"
        args = ["experiment=digits_ablation", *TINY, "logger=wandb", "logger.log_every=2",
                "logger.tags=[smoke,ci]", "eval.verifiers=[ibp]", f"hydra.run.dir={run_dir}"]
        env = wandb_env(root)
        first = _cli(args, root, env)
        assert first.returncode == 0, first.stderr[-3000:]
        files_after_first = offline_runs(run_dir)
        second = _cli(args + ["resume.checkpoint=last"], root, env)  # finished: evaluates only
        assert second.returncode == 0, second.stderr[-3000:]
        return str(run_dir), [str(f) for f in files_after_first]

    run_dir, files_after_first = once_per_session(tmp_path_factory, "wandb_cli", make)
    return Path(run_dir), [Path(f) for f in files_after_first]


def test_cli_run_logs_config_history_and_summary(cli_run):
    run_dir, files = cli_run
    assert len(files) == 1, files
    run = OfflineRun(files[0])
    results = json.loads((run_dir / "results.json").read_text())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    # identity: readable name, group = the experiment preset, tags, id kept in the run dir
    assert run.id == (run_dir / "wandb_run_id").read_text().strip()
    assert run.run["display_name"] == "fast-cnn_small-digits-s0"
    assert run.run["run_group"] == "digits_ablation"
    assert set(run.run["tags"]) == {"smoke", "ci"}
    assert run.exit_code == 0

    # the resolved config: interpolations resolved, preset and overrides applied
    assert run.config["method"]["name"] == "fast" and run.config["model"]["name"] == "cnn_small"
    assert run.config["eps"] == pytest.approx(0.2)        # ${data.eps} overridden by the preset
    assert run.config["data"]["limit_train"] == 96
    assert run.config["logger"]["mode"] == "offline"      # ${oc.env:WANDB_MODE,online}

    # per-step scalars every log_every=2 batches, against global_step
    steps = run.rows("train/loss")
    steps_per_epoch = math.ceil(96 / 64)
    total = 2 * steps_per_epoch
    assert [r["global_step"] for r in steps] == list(range(0, total, 2))
    for key in ("train/eps", "train/lr", "train/grad_norm", "train/loss/natural",
                "train/loss/robust", "train/kappa", "train/lambda", "train/reg/tightness",
                "train/reg/relu"):
        assert all(key in r for r in steps), (key, steps[0])
    assert steps[0]["train/lr"] == pytest.approx(1e-3)
    assert all(r["train/grad_norm"] >= 0 for r in steps)

    # per-epoch records against epoch, equal to metrics.jsonl
    epochs = run.rows("epoch/loss")
    assert [r["epoch"] for r in epochs] == [1, 2] == [m["epoch"] for m in metrics]
    for row, rec in zip(epochs, metrics):
        for key in SCALAR_EPOCH_KEYS:
            assert row[f"epoch/{key}"] == pytest.approx(rec[key], rel=1e-12, abs=0), key
        assert row["epoch/phase"] == rec["phase"]
        assert row[f"epoch/phase_time_s/{rec['phase']}"] == pytest.approx(rec["epoch_time_s"])
        relu_keys = [k for k in rec if k.startswith("relu_")]
        assert relu_keys, rec.keys()                       # ReLU-state ratios, per layer
        for k in relu_keys:
            for i, v in enumerate(rec[k]):
                assert row[f"epoch/{k}/layer{i}"] == pytest.approx(v, rel=1e-12, abs=0)

    # the final results are the run summary (results.json is the resumed run's: same numbers)
    for key in ("clean_acc", "pgd_acc", "ibp_verified_acc", "eps", "method", "model", "data",
                "seed", "n_test"):
        assert run.summary[key] == results[key], key
    assert run.summary["wall_time_s"] > 0
    for phase, seconds in results["phase_epoch_time_s"].items():
        assert run.summary[f"phase_epoch_time_s/{phase}"] == pytest.approx(seconds)
    assert results["ibp_verified_acc"] <= results["pgd_acc"] <= results["clean_acc"]
    # the diagnostic PNGs of fastcert.plots, logged as images at the end of the run
    for name in ("training_curves", "relu_states", "regularizers"):
        assert run.rows(f"figures/{name}._type"), name
        assert (run_dir / "plots" / f"{name}.png").is_file()


def test_resume_continues_the_same_wandb_run(cli_run):
    run_dir, first_files = cli_run
    files = offline_runs(run_dir)
    assert len(files) == 2 and files[0] == first_files[0], files
    first, resumed = OfflineRun(files[0]), OfflineRun(files[1])
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    assert first.id == resumed.id == run_id
    assert resumed.run.get("resume") is True
    import torch
    assert torch.load(run_dir / "last.pt", weights_only=False)["logger_run_id"] == run_id
    # the finished run was not retrained: no step rows; its epochs logged again from
    # metrics.jsonl at the same explicit steps (W&B keeps the first row of a step on sync)
    assert not resumed.rows("train/loss")
    again, before = resumed.rows("epoch/loss"), first.rows("epoch/loss")
    assert [(r["_step"], r["epoch/loss"]) for r in again] == [
        (r["_step"], r["epoch/loss"]) for r in before] == [(2, before[0]["epoch/loss"]),
                                                           (4, before[1]["epoch/loss"])]
    results = json.loads((run_dir / "results.json").read_text())
    for key in ("clean_acc", "pgd_acc", "ibp_verified_acc", "wall_time_s"):
        assert resumed.summary[key] == results[key], key
    assert resumed.run["display_name"] == first.run["display_name"]


# ---- the logger itself, in-process ------------------------------------------------------
@pytest.fixture
def wandb_tmp(tmp_path, monkeypatch):
    for k, v in wandb_env(tmp_path).items():
        monkeypatch.setenv(k, v)
    yield tmp_path
    import wandb
    wandb.teardown()  # forget settings read from this test's environment


def _png(path: Path) -> Path:
    from PIL import Image
    Image.new("RGB", (6, 4), (200, 30, 30)).save(path)
    return path


def test_images_checkpoint_artifact_and_flattening(wandb_tmp):
    from fastcert.wandb_logger import WandbLogger

    run_dir = wandb_tmp / "run"
    ckpt = run_dir / "last.pt"
    lg = WandbLogger(run_dir=run_dir, run_name="ibp-mlp-digits-s3", config={"seed": 3},
                     mode=None, log_checkpoints=True, group_default="grp", tags="one")
    ckpt.write_bytes(b"checkpoint bytes")
    lg.log_step({"train/loss": 0.5, "train/eps": 0.0}, 7)
    lg.log_epoch({"epoch": 1, "phase": "eps0", "loss": float("nan"), "epoch_time_s": 2.0,
                  "relu_unstable": [0.25, 0.5]}, 1)
    lg.log_images({"relu_states": str(_png(wandb_tmp / "relu.png")),
                   "missing": str(wandb_tmp / "nope.png")})
    lg.log_summary({"clean_acc": 0.75, "phase_epoch_time_s": {"eps0": 2.0}})
    lg.log_checkpoint(str(ckpt))
    lg.finish()

    (file,) = offline_runs(run_dir)       # mode=None → $WANDB_MODE=offline
    run = OfflineRun(file)
    assert run.id == lg.run_id == (run_dir / "wandb_run_id").read_text()
    assert run.run["run_group"] == "grp" and run.run["tags"] == ["one"]
    assert run.config == {"seed": 3}
    (step,) = run.rows("train/loss")
    assert step["global_step"] == 7 and step["train/eps"] == 0
    (ep,) = run.rows("epoch/loss")
    assert ep["epoch"] == 1 and ep["epoch/loss"] == "NaN"   # kept (the reader shows it so)
    assert ep["epoch/relu_unstable/layer1"] == 0.5 and ep["epoch/phase_time_s/eps0"] == 2.0
    (img,) = run.rows("figures/relu_states._type")
    assert img["figures/relu_states._type"] == "image-file"
    assert not run.rows("figures/missing._type")
    assert (file.parent / "files" / img["figures/relu_states.path"]).is_file()
    assert run.summary["clean_acc"] == 0.75 and run.summary["phase_epoch_time_s/eps0"] == 2.0
    (art,) = [r["artifact"] for r in run.records if r["type"] == "artifact"]
    assert art["type"] == "model" and art["name"] == f"checkpoint-{run.id}"
    assert [c["path"] for c in art["manifest"]["contents"]] == ["last.pt"]
    steps = {r.get("metric", {}).get("glob_name"): r["metric"].get("step_metric")
             for r in run.records if r["type"] == "metric"}
    assert steps["train/*"] == "global_step" and steps["epoch/*"] == "epoch"


def test_diagnostic_plots_are_logged_as_images(cli_run, wandb_tmp):
    """The PNGs of fastcert.plots for a real run's metrics.jsonl, logged through the logger."""
    plots = pytest.importorskip("fastcert.plots")
    from fastcert.wandb_logger import WandbLogger

    run_dir, _ = cli_run
    figures = plots.plot_run(run_dir, out_dir=wandb_tmp / "plots")
    assert {"training_curves", "relu_states", "regularizers"} <= set(figures)
    lg = WandbLogger(run_dir=wandb_tmp / "run", run_name="r", config={}, mode="offline")
    lg.log_images({name: str(path) for name, (path, _) in figures.items()})
    lg.finish()
    (file,) = offline_runs(wandb_tmp / "run")
    (row,) = OfflineRun(file).rows("figures/training_curves._type")
    for name in figures:
        assert row[f"figures/{name}._type"] == "image-file", name
        assert (file.parent / "files" / row[f"figures/{name}.path"]).stat().st_size > 1000


def test_log_checkpoints_off_uploads_nothing(wandb_tmp):
    from fastcert.wandb_logger import WandbLogger

    run_dir = wandb_tmp / "run"
    lg = WandbLogger(run_dir=run_dir, run_name="r", config={}, mode="offline")
    (run_dir / "last.pt").write_bytes(b"x")
    lg.log_checkpoint(str(run_dir / "last.pt"))
    lg.finish()
    run = OfflineRun(offline_runs(run_dir)[0])
    assert not [r for r in run.records if r["type"] == "artifact"]


def test_mode_disabled_writes_nothing(wandb_tmp):
    from fastcert.wandb_logger import WandbLogger

    run_dir = wandb_tmp / "run"
    lg = WandbLogger(run_dir=run_dir, run_name="r", config={"a": 1}, mode="disabled")
    lg.log_step({"train/loss": 1.0}, 0)
    lg.log_epoch({"epoch": 1, "loss": 1.0}, 1)
    lg.log_summary({"clean_acc": 1.0})
    lg.finish()
    assert not (run_dir / "wandb").exists() and not (run_dir / "wandb_run_id").exists()


def test_modes_are_checked_and_wandb_mode_is_respected(monkeypatch):
    from fastcert.wandb_logger import resolve_mode

    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode(None) == "disabled"
    assert resolve_mode("offline") == "offline"            # an explicit setting wins
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert resolve_mode("") == "offline"                   # wandb's old name for offline
    monkeypatch.delenv("WANDB_MODE")
    assert resolve_mode(None) == "online"
    with pytest.raises(ValueError, match="online, offline, disabled"):
        resolve_mode("ofline")


def test_unknown_logger_option_is_an_error(wandb_tmp):
    from fastcert.config import ConfigError, build_option

    with pytest.raises(ConfigError, match="logger.projct is not a key.*did you mean "
                                          "logger.project"):
        build_option("logger", "wandb", {"projct": "x", "mode": "disabled"},
                     run_dir=wandb_tmp, run_name="r", config={}, resume_id=None,
                     group_default=None)


# ---- preemption and login ------------------------------------------------------------------
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_signal_ends_the_run_cleanly_and_marks_it_preempting(tmp_path, sig):
    """SIGTERM / SIGINT mid-training: no traceback, a message saying how to continue, exit
    status 128 + the signal, the last checkpoint kept, and the W&B run marked preempting."""
    import signal
    import time

    run_dir = tmp_path / "run"
    args = ["debug=smoke", "device=cpu", "epochs=40", "data.limit_train=null",
            "data.batch_size=32", "logger=wandb", f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen([sys.executable, "-m", "fastcert.run", *args], cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **wandb_env(tmp_path)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (run_dir / "last.pt").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    proc.send_signal(getattr(signal, sig))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + getattr(signal, sig), err[-3000:]
    assert "Traceback" not in err and "resume.checkpoint=last" in err, err[-3000:]
    assert out.strip().splitlines()[-1] == f"run dir: {run_dir}"
    assert (run_dir / "last.pt").is_file() and not (run_dir / "results.json").exists()
    (file,) = offline_runs(run_dir)
    run = OfflineRun(file)
    assert [r for r in run.records if r["type"] == "preempting"]
    assert run.exit_code == 1


def test_no_login_says_how_to_run_offline(tmp_path, monkeypatch):
    from fastcert.config import ConfigError
    from fastcert.wandb_logger import WandbLogger

    for k, v in wandb_env(tmp_path).items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))       # no ~/.netrc with a key
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    try:
        with pytest.raises(ConfigError, match=r"wandb login.*logger.mode=offline.*logger=none"):
            WandbLogger(run_dir=tmp_path / "run", run_name="r", config={}, mode="online")
    finally:
        import wandb
        wandb.teardown()
