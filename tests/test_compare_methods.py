"""experiments.compare_methods: a 1-epoch, 1-method subset end to end (fast), the --quick
comparison of every method (slow)."""
from __future__ import annotations

import json

import pytest

from experiments import EXPENSIVE_METHODS, compare_methods
from fastcert.config import options


def _table_rows(text: str) -> dict[str, list[str]]:
    return {cells[0]: cells[1:] for line in text.splitlines() if line.startswith("| ")
            for cells in [[c.strip() for c in line.strip("|").split("|")]]}


def test_one_epoch_one_method_subset(tmp_path, capsys):
    summary = compare_methods.main(["--methods", "sabr", "--seeds", "0", "--epochs", "1",
                                    "--eps", "0.1", "--out", str(tmp_path),
                                    "data.limit_train=128", "data.limit_test=32"])
    (run,) = summary["eps"]["0.1"]["sabr"]
    results = json.loads((tmp_path / "eps0.1" / "sabr-s0" / "results.json").read_text())
    assert results["method"] == "sabr" and results["model"] == "cnn_small"
    assert results["data"] == "digits" and results["epochs"] == 1 and results["eps"] == 0.1
    assert run["clean_acc"] == results["clean_acc"] and run["crown_verified_acc"] is not None
    assert 0 < run["tightness"] <= 1 and run["s_per_epoch"] > 0
    row = _table_rows(capsys.readouterr().out)["sabr"]
    assert row[0] == f"{100 * results['clean_acc']:.1f}" and row[4] == f"{run['tightness']:.3f}"
    assert json.loads((tmp_path / "summary.json").read_text())["epochs"] == 1
    # a second invocation with the same --out reads the finished run instead of retraining
    mtime = (tmp_path / "eps0.1" / "sabr-s0" / "last.pt").stat().st_mtime
    again = compare_methods.main(["--methods", "sabr", "--seeds", "0", "--epochs", "1",
                                  "--eps", "0.1", "--out", str(tmp_path),
                                  "data.limit_train=128", "data.limit_test=32"])
    assert again["eps"]["0.1"]["sabr"][0]["clean_acc"] == run["clean_acc"]
    assert (tmp_path / "eps0.1" / "sabr-s0" / "last.pt").stat().st_mtime == mtime


def test_unknown_method_is_refused():
    with pytest.raises(SystemExit):
        compare_methods.main(["--methods", "sabre", "--out", "/nonexistent"])


def test_schedule_is_shared_and_short():
    assert compare_methods.schedule(36) == [
        "epochs=36", "schedule=smoothed", "schedule.start=1", "schedule.length=11",
        "optim.milestones=[27,32]"]


@pytest.mark.slow
def test_quick_compares_every_method_at_both_radii(tmp_path, capsys):
    summary = compare_methods.main(["--quick", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert summary["epochs"] == 3 and summary["seeds"] == [0]
    for eps in ("0.1", "0.2"):
        assert set(summary["eps"][eps]) == set(options("method")) - set(EXPENSIVE_METHODS)
    assert set(_table_rows(out)) >= set(options("method")) - set(EXPENSIVE_METHODS)
