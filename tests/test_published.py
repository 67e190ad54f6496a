"""experiments.published (experiments.table --published): the CTBench table,
published numbers beside a fastcert column filled from finished runs (results.json written as
fastcert.pipeline does)."""
from __future__ import annotations

import json

import pytest

from experiments import published, table
from fastcert.config import options


def _write_run(path, data, eps, method, clean, ibp, any_=None, seed=0):
    path.mkdir(parents=True)
    (path / "results.json").write_text(json.dumps({
        "data": data, "eps": eps, "method": method, "model": "cnn7", "seed": seed,
        "epochs": 160, "clean_acc": clean, "pgd_acc": clean, "ibp_verified_acc": ibp,
        "crown_verified_acc": None, "any_verified_acc": any_}))


def _rows(text):
    out = {}
    for line in text.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        out[(cells[0], cells[1])] = cells[2:]
    return out


def test_every_ctbench_preset_has_a_row_with_its_published_numbers():
    rows = _rows(published.published_table([]))
    presets = {tuple(p.split("/")[1:]) for p in options("experiment") if p.startswith("ctbench/")}
    assert set(rows) == presets
    assert rows[("cifar10_2", "sabr")][:2] == ["77.86", "63.61"]
    assert rows[("mnist_0_3", "sabr")][:2] == ["98.75", "93.40"]
    assert rows[("cifar10_8", "pgd")][:2] == ["69.30", "–"]
    assert all(r[3:] == ["–", "–", "–"] for r in rows.values())  # no runs: empty fastcert column
    assert all(r[2] != "–" for r in rows.values() if r[0] != "–" or r[1] != "–")  # sourced


def test_fastcert_column_is_filled_from_matching_runs(tmp_path):
    _write_run(tmp_path / "a", "cifar10", 2 / 255, "sabr", 0.70, 0.55, any_=0.60, seed=0)
    _write_run(tmp_path / "b", "cifar10", 0.00784313725, "sabr", 0.80, 0.50, seed=1)
    _write_run(tmp_path / "c", "cifar10", 8 / 255, "sabr", 0.40, 0.30)       # another setting
    _write_run(tmp_path / "d", "mnist", 0.1, "taps", 0.99, 0.97)
    _write_run(tmp_path / "e", "digits", 0.1, "taps", 0.9, 0.8)              # no CTBench setting
    rows = _rows(published.published_table(table.collect_runs([tmp_path])))
    # verified: any_verified_acc where evaluated, else ibp_verified_acc
    assert rows[("cifar10_2", "sabr")][3:] == ["75.00 ± 7.07", "55.00 ± 7.07", "2"]
    assert rows[("cifar10_8", "sabr")][3:] == ["40.00", "30.00", "1"]
    assert rows[("mnist_0_1", "taps")][3:] == ["99.00", "97.00", "1"]
    assert rows[("mnist_0_3", "taps")][3:] == ["–", "–", "–"]


def test_cli_prints_the_table_without_runs(capsys):
    assert table.main(["--published", "ctbench"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| setting | method | published clean") and "tinyimagenet_1" in out
    with pytest.raises(SystemExit):
        table.main(["--published", "nope"])
