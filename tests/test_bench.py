"""``make bench`` (experiments/bench.py) in its --quick form: every row and every column the
issue asks for, on a tiny CNN-7 (speed goals are read in the full run, never asserted here)."""
from __future__ import annotations

import csv
import json

import pytest

from experiments import EXPENSIVE_METHODS, bench
from fastcert.config import options


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    result = bench.main(["--quick", "--phases", "--fit-check", "--out", str(out),
                         "--csv", str(out / "bench.csv")])
    return result, json.loads((out / "bench.json").read_text()), out / "bench.csv"


def test_every_method_option_is_a_row_beside_natural_and_the_floors(quick):
    result, saved, _ = quick
    want = ["torch natural", "floor ibp", "floor loss fusion",
            *(f"fit {m}" for m in options("method") if m not in EXPENSIVE_METHODS)]
    assert list(saved["rows"]) == want
    assert saved["reps"] == 2 and saved["batch"] == 4 and saved["threads"] == 1


def test_rows_have_median_min_ratios_and_peak_memory(quick):
    rows = quick[1]["rows"]
    for name, r in rows.items():
        assert 0 < r["min_s"] <= r["median_s"], name
        assert r["cpu_median_s"] > 0 and r["peak_mib"] > 100, name  # CPU: RSS of its process
        assert r["x_natural"] == pytest.approx(r["median_s"] / rows["torch natural"]["median_s"])
    assert rows["fit ibp"]["floor"] == rows["fit fast"]["floor"] == "floor ibp"
    assert rows["fit crown_ibp"]["floor"] == "floor loss fusion"
    assert rows["fit natural"]["floor"] == "torch natural"
    for name, goal in (("fit natural", 1.05), ("fit ibp", 1.05), ("fit crown_ibp", 1.10)):
        assert rows[name]["goal"] == goal and isinstance(rows[name]["meets_goal"], bool)


def test_phase_table_and_fit_check(quick):
    saved = quick[1]
    assert set(saved["phases"]) == {"ibp", "crown_ibp", "fast"}
    for _method, phases in saved["phases"].items():
        assert set(phases) == {"eps0", "ramp", "final"} and all(v > 0 for v in phases.values())
    assert saved["fit_check"]["fits"] is True and saved["fit_check"]["model"] == "resnext"


def test_csv_has_every_row_and_the_setting(quick):
    saved, path = quick[1], quick[2]
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert [r["row"] for r in rows] == list(saved["rows"])
    fit = {r["row"]: r for r in rows}["fit mtl_ibp"]
    assert float(fit["x_floor_cpu"]) == pytest.approx(saved["rows"]["fit mtl_ibp"]["x_floor_cpu"],
                                                      rel=1e-3)
    assert fit["floor"] == "floor ibp" and fit["batch"] == "4" and fit["device"] == "cpu"
    assert " -> " in fit["load"]


def test_default_run_settings():
    args = bench.parse([])
    assert args.reps >= 7 and args.cpu_threads == 1 and args.keep_freed_memory == 1
    import torch

    cpu = bench.setting(args, torch.device("cpu"))
    assert (cpu.model, cpu.batch, cpu.model_options) == ("cnn7", 32, {})
    assert bench.setting(args, torch.device("cuda")).batch == 128
