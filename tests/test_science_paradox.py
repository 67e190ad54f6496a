"""experiments.paradox (Jovanovic et al. 2022): the jump detector on functions with and without
jumps, the empirical margin range inside every relaxation's bounds, and a tiny run end to end."""
from __future__ import annotations

import csv
import math

import torch

from experiments import paradox
from experiments.science import compose


def _grid(n=51):
    return [0.25 * (2 * i / (n - 1) - 1) for i in range(n)]


def test_jump_detector_finds_a_jump_and_ignores_a_kink():
    ts = _grid()

    def jumpy(t):
        return 2.0 + math.sin(3 * t) + (0.01 if t > 0.0731 else 0.0)

    def kinked(t):
        return 2.0 + 5 * abs(t - 0.0731)

    def slope(f, t, h=1e-7):  # one-sided, as autograd gives at a kink
        return (f(t + h) - f(t)) / h

    jumps = paradox.count_jumps(jumpy, ts, [jumpy(t) for t in ts], [slope(jumpy, t) for t in ts])
    assert len(jumps) == 1 and abs(jumps[0] - 0.01) < 1e-3
    assert paradox.count_jumps(kinked, ts, [kinked(t) for t in ts],
                               [slope(kinked, t) for t in ts]) == []


def test_empirical_range_lies_inside_every_relaxation():
    args = paradox.overrides("ibp", 0.1, 0, 1, ["data.limit_train=64", "data.limit_test=32"])
    built = paradox.load_net(compose(args), None)
    x, y = paradox.batch_of(built.data.test, 32)
    tight = paradox.relaxation_tightness(built.net, x, y, *built.data.eps_box(x, 0.1))
    assert set(tight) == set(paradox.RELAXATIONS)
    assert all(0 < v <= 1 for v in tight.values())
    assert tight["CROWN"] > tight["IBP"]  # back-substitution is tighter than intervals at init


def test_tiny_run_writes_every_file(tmp_path):
    result = paradox.main(["--variants", "ibp", "crown", "--eps", "0.1", "--seeds", "0",
                           "--epochs", "1", "--grid", "11", "--directions", "1", "--out",
                           str(tmp_path), "data.limit_train=64", "data.limit_test=32"])
    for name in ("runs", "summary", "relaxations", "landscape", "lines", "claims"):
        assert (tmp_path / f"{name}.csv").is_file()
    assert (tmp_path / "paradox.png").stat().st_size > 10_000
    runs = list(csv.DictReader(open(tmp_path / "runs.csv")))
    assert [r["variant"] for r in runs] == ["ibp", "crown"]
    for r in runs:
        for v in paradox.VERIFIERS:
            assert 0 <= float(r[f"{v}_verified_acc"]) <= float(r["clean_acc"]) <= 1
    land = result["landscape"]
    assert {(r["point"], r["relaxation"]) for r in land} == {
        (p, k) for p in ("init", "ibp-trained") for k in paradox.RELAXATIONS}
    for r in land:
        assert r["jumps"] >= 0 and r["sensitivity_0.001"] >= 0 and r["loss"] > 0
        if r["relaxation"] in ("IBP", "CROWN same-slope"):
            assert r["jumps"] == 0  # continuous relaxations never show a jump
    lines = list(csv.DictReader(open(tmp_path / "lines.csv")))
    assert len(lines) == 2 * len(paradox.RELAXATIONS) * 11
    torch.testing.assert_close(  # the parameters are restored after the line search
        torch.tensor(float(next(r["loss"] for r in land if r["point"] == "ibp-trained"
                                and r["relaxation"] == "IBP"))),
        torch.tensor(float(next(r["loss"] for r in lines if r["point"] == "ibp-trained"
                                and r["relaxation"] == "IBP" and float(r["t"]) == 0.0))),
        rtol=1e-5, atol=1e-6)
