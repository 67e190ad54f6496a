"""experiments.tightness_init (Mao et al. 2024, tightness at initialisation): a tiny sweep end
to end (fast), and the two-layer exponent over d = 16 … 4096 (slow)."""
from __future__ import annotations

import csv

import pytest

from experiments import tightness_init


def test_tiny_sweep_writes_csv_and_png(tmp_path):
    result = tightness_init.main(["--widths", "16", "64", "256", "--depths", "2", "3", "4",
                                  "--depth-widths", "16", "--draws", "3",
                                  "--out", str(tmp_path)])
    rows = list(csv.DictReader(open(tmp_path / "tightness_init.csv")))
    assert {(r["family"], int(r["depth"]), int(r["width"])) for r in rows} == {
        (f, 2, w) for f in ("dln", "relu") for w in (16, 64, 256)} | {
        (f, L, 16) for f in ("dln", "relu") for L in (3, 4)}
    assert all(0 < float(r["tau_mean"]) <= 1 for r in rows)
    assert (tmp_path / "tightness_init.png").stat().st_size > 10_000
    slopes = {(s["family"], s["versus"]): s["exponent"] for s in result["slopes"]}
    assert -0.7 < slopes[("dln", "width")] < -0.3  # three widths, three draws: loose
    assert slopes[("dln", "depth")] < 0 and slopes[("relu", "depth")] < 0
    # τ falls with depth at a fixed width, for both families
    for family in ("dln", "relu"):
        taus = [float(r["tau_geomean"]) for r in rows
                if r["family"] == family and r["width"] == "16"]
        assert taus == sorted(taus, reverse=True)


def test_depth_one_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        tightness_init.main(["--depths", "1", "2", "--out", str(tmp_path)])


@pytest.mark.slow
def test_two_layer_exponent_is_minus_one_half():
    """Mao et al. 2024: τ = Θ(d^(-1/2)) for a two-layer Gaussian DLN; the fitted exponent over
    d = 16, 32, …, 4096 (20 draws each) lies within -0.5 ± 0.1."""
    exponent = tightness_init.two_layer_exponent([2 ** k for k in range(4, 13)], draws=20)
    assert exponent == pytest.approx(-0.5, abs=0.1)
