"""A resume never rewrites the run's record: a finished training is evaluated, not trained
again; ``epochs`` below the checkpoint's is refused; every resume is appended to
``resumed``; a run whose evaluation failed gets its results.json by a resume; and
``resume.checkpoint=auto`` continues where there is a checkpoint, starts where there is none,
and leaves a finished run alone."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from fastcert.config import ConfigError
from fastcert.pipeline import run

from conftest import TINY, compose_config

ACC_KEYS = ("clean_acc", "pgd_acc", "ibp_verified_acc", "any_verified_acc")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished TINY run (2 epochs), made once; tests work on copies."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    run(compose_config("config", TINY), run_dir)
    return run_dir


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _files(run_dir: Path) -> dict:
    return {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}


def test_resuming_a_finished_run_evaluates_and_appends_to_the_record(finished, tmp_path,
                                                                     capsys):
    run_dir = _copy(finished, tmp_path / "run")
    before = _files(run_dir)
    first = run(compose_config("config", TINY), run_dir, resume="last")
    assert f"resuming {run_dir / 'last.pt'} at epoch 2/2" in capsys.readouterr().out
    # nothing trained: the checkpoint and the epoch records are the finished run's
    assert _files(run_dir)["last.pt"] == before["last.pt"]
    assert _files(run_dir)["metrics.jsonl"] == before["metrics.jsonl"]
    want = json.loads(before["results.json"])
    assert first["epochs"] == 2 and [first[k] for k in ACC_KEYS] == [want[k] for k in ACC_KEYS]
    assert [(r["from_epoch"], r["changes"]) for r in first["resumed"]] == [(2, {})]
    second = run(compose_config("config", TINY + ["eval.verifiers=[ibp,crown]"]), run_dir,
                 resume="last")
    assert second["resumed"][0] == first["resumed"][0]      # kept as it was, not rewritten
    assert [r["from_epoch"] for r in second["resumed"]] == [2, 2]
    assert json.loads((run_dir / "results.json").read_text())["resumed"] == second["resumed"]


def test_epochs_below_the_checkpoint_are_refused_and_change_nothing(finished, tmp_path):
    run_dir = _copy(finished, tmp_path / "run")
    before = _files(run_dir)
    with pytest.raises(ConfigError, match=r"epochs=1 is below the 2 epochs .* epochs=2"):
        run(compose_config("config", TINY + ["epochs=1"]), run_dir, resume="last")
    assert _files(run_dir) == before


def test_training_on_records_the_real_epochs_and_every_resume(finished, tmp_path):
    run_dir = _copy(finished, tmp_path / "run")
    run(compose_config("config", TINY), run_dir, resume="last")  # evaluate only
    more = run(compose_config("config", TINY + ["epochs=3"]), run_dir, resume="last")
    assert more["epochs"] == 3
    assert torch.load(run_dir / "last.pt", weights_only=False)["epoch"] == 3
    assert [r["from_epoch"] for r in more["resumed"]] == [2, 2]
    # the checkpoint carries the record too (a run killed before results.json keeps it)
    saved = torch.load(run_dir / "last.pt", weights_only=False)["resumed"]
    assert saved == more["resumed"]


def test_a_failed_evaluation_is_redone_by_a_resume_without_training(finished, tmp_path,
                                                                    monkeypatch):
    import fastcert.pipeline as pipeline

    run_dir = tmp_path / "run"
    with monkeypatch.context() as m:
        def dies(built):
            raise MemoryError("killed during the final evaluation")
        m.setattr(pipeline, "_evaluate", dies)
        with pytest.raises(MemoryError):
            run(compose_config("config", TINY), run_dir)
    assert not (run_dir / "results.json").exists()
    trained = _files(run_dir)
    results = run(compose_config("config", TINY), run_dir, resume="last")
    assert _files(run_dir)["last.pt"] == trained["last.pt"]
    want = json.loads((finished / "results.json").read_text())
    assert [results[k] for k in ACC_KEYS] == [want[k] for k in ACC_KEYS]
    assert json.loads((run_dir / "results.json").read_text())["resumed"][0]["from_epoch"] == 2


def test_auto_starts_continues_and_leaves_a_finished_run_alone(finished, tmp_path, capsys):
    fresh = run(compose_config("config", TINY + ["resume.checkpoint=auto"]), tmp_path / "new")
    assert "resumed" not in fresh and (tmp_path / "new" / "results.json").is_file()
    run_dir = _copy(finished, tmp_path / "run")
    before = _files(run_dir)
    capsys.readouterr()
    again = run(compose_config("config", TINY + ["resume.checkpoint=auto"]), run_dir)
    assert "holds the finished run (2 epochs); nothing to do" in capsys.readouterr().out
    assert _files(run_dir) == before and again == json.loads(before["results.json"])
    (run_dir / "results.json").unlink()  # e.g. the evaluation failed: auto evaluates
    results = run(compose_config("config", TINY + ["resume.checkpoint=auto"]), run_dir)
    assert [r["from_epoch"] for r in results["resumed"]] == [2]
