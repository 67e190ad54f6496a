"""experiments.tightness_training and experiments.width_rule end to end on tiny settings (one
epoch, 128 training digits): files written, numbers in range, finished runs read back."""
from __future__ import annotations

import csv

from experiments import tightness_training, width_rule

TINY = ["--epochs", "1", "--out"]  # then the out dir, then the overrides
OVERRIDES = ["data.limit_train=128", "data.limit_test=32"]


def test_tightness_training_tiny(tmp_path):
    result = tightness_training.main(["--variants", "natural", "ibp", "--eps", "0.1", "0.2",
                                      "--seeds", "0", *TINY, str(tmp_path), *OVERRIDES])
    curves = list(csv.DictReader(open(tmp_path / "curves.csv")))
    assert len(curves) == 2 * 2 * 2  # variants × eps × epochs 0..1
    assert all(0 < float(r["tau"]) <= 1 for r in curves)
    summary = {(r["variant"], float(r["eps"])): r
               for r in csv.DictReader(open(tmp_path / "summary.csv"))}
    assert set(summary) == {(v, e) for v in ("natural", "ibp") for e in (0.1, 0.2)}
    for r in summary.values():
        assert 0 <= float(r["ibp_verified_acc"]) <= float(r["clean_acc"]) <= 1
    assert summary[("natural", 0.1)]["ibp_verified_acc"] == "0.0"
    claims = list(csv.DictReader(open(tmp_path / "claims.csv")))
    assert [c["claim"] for c in claims] == ["ibp: tau(eps=0.2) > tau(eps=0.1)"]
    assert (tmp_path / "tightness_training.png").stat().st_size > 10_000
    # epoch 0 is the initialised network: the same for both radii (same seed), natural = ibp init
    inits = {r["curve"][0] for r in result["runs"]}
    assert len({round(t, 6) for t in inits}) <= 2
    mtime = (tmp_path / "eps0.1" / "ibp-s0" / "last.pt").stat().st_mtime
    tightness_training.main(["--variants", "ibp", "--eps", "0.1", "--seeds", "0", *TINY,
                             str(tmp_path), *OVERRIDES])
    assert (tmp_path / "eps0.1" / "ibp-s0" / "last.pt").stat().st_mtime == mtime


def test_width_rule_architectures_match_parameter_counts():
    archs = width_rule.architectures((0.5, 1.0, 2.0))
    for wide, deep in zip(archs[::2], archs[1::2]):
        assert wide["series"] == "width" and deep["series"] == "depth"
        assert abs(deep["params"] - wide["params"]) < 0.15 * wide["params"]
        assert deep["widths"] == [width_rule.BASE] * len(deep["widths"])
    assert archs[2]["widths"] == archs[3]["widths"] == [128, 128]  # 1×: the same network
    assert len(archs[5]["widths"]) > 2


def test_width_rule_tiny(tmp_path):
    result = width_rule.main(["--methods", "fast", "--multipliers", "0.5", "2", "--seeds",
                              "0", *TINY, str(tmp_path), *OVERRIDES])
    rows = list(csv.DictReader(open(tmp_path / "width_rule.csv")))
    assert {(r["series"], float(r["m"])) for r in rows} == {
        (s, m) for s in ("width", "depth") for m in (0.5, 2.0)}
    for r in rows:
        assert 0 < float(r["tau_init"]) <= 1 and 0 < float(r["tau_final"]) <= 1
        assert 0 <= float(r["any_verified_acc"]) <= float(r["clean_acc"]) <= 1
    assert len(result["claims"]) == 2 and (tmp_path / "claims.csv").is_file()
    assert (tmp_path / "width_rule.png").stat().st_size > 10_000
