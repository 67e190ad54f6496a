"""experiments.box_reconstruction (Mao et al. 2024, box reconstruction error of PCA weights):
the PCA autoencoder is exact and a tiny sweep end to end shows a layer-wise box linear and an
optimal box ~√ in the intrinsic dimension."""
from __future__ import annotations

import csv

import pytest
import torch

from experiments import box_reconstruction


def test_pca_weights_reconstruct_the_subspace_exactly():
    x, w1, w2 = box_reconstruction.pca_autoencoder(40, 5, seed=0)
    assert w1.shape == (5, 40) and w2.shape == (40, 5)
    torch.testing.assert_close(w1 @ w2, torch.eye(5, dtype=torch.float64))
    centre = x.mean(0)
    torch.testing.assert_close((x - centre) @ w1.T @ w2.T + centre, x)


def test_tiny_sweep_writes_csv_and_png(tmp_path):
    result = box_reconstruction.main(["--ambient", "128", "--dims", "1", "2", "4", "8", "16",
                                      "--draws", "2", "--out", str(tmp_path)])
    rows = list(csv.DictReader(open(tmp_path / "box_reconstruction.csv")))
    assert [int(r["intrinsic_dim"]) for r in rows] == [1, 2, 4, 8, 16]
    assert all(float(r["max_reconstruction_error"]) < 1e-9 for r in rows)
    assert all(float(r["optimal_mean"]) <= float(r["layerwise_mean"]) + 1e-9 for r in rows)
    slopes = result["slopes"]
    assert slopes["layerwise"] == pytest.approx(1.0, abs=0.15)
    assert slopes["optimal"] == pytest.approx(0.5, abs=0.15)
    assert (tmp_path / "box_reconstruction.png").stat().st_size > 10_000
    assert {r["quantity"] for r in csv.DictReader(open(tmp_path / "slopes.csv"))} == {
        "layerwise", "optimal", "tau"}


def test_intrinsic_dimension_above_the_ambient_one_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        box_reconstruction.main(["--ambient", "8", "--dims", "1", "2", "16",
                                 "--out", str(tmp_path)])
