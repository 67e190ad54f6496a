"""Tests of fastcert.plots / fastcert.diagnostics: every figure is a valid PNG, the data each
figure plots is exactly what metrics.jsonl / results.json / certify.json hold, and the bound
explosion of Fig. 1 of Shi et al. 2021 shows (IBP init stays flat, the others grow)."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import matplotlib.image as mpimg
import pytest

from fastcert import plots
from fastcert.config import options
from fastcert.diagnostics import bound_explosion, find_runs, read_metrics, read_run
from fastcert.pipeline import run

from conftest import TINY, compose_config

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two TINY runs in one sweep-like folder: fast (λ, regularisers optimised) and ibp (the
    regularisers only logged), with an ε=0 epoch first so some records lack the ReLU stats."""
    root = tmp_path_factory.mktemp("sweep")
    common = TINY + ["epochs=3", "schedule.start=1", "schedule.length=1"]
    out = {}
    for i, method in enumerate(("fast", "ibp")):
        run(compose_config("config", common + [f"method={method}"]), root / str(i))
        out[method] = root / str(i)
    return root, out


def assert_png(path: Path):
    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def assert_series_match(data: dict, metrics: list[dict]):
    """Each plotted series equals the records that hold the key, epoch by epoch."""
    for key, s in data.items():
        expect = [(r["epoch"], r[key]) for r in metrics if r.get(key) is not None]
        assert list(zip(s["epoch"], s["value"])) == expect, key


CERTIFY_SUMMARY = {"results": [
    {"eps": 0.1, "clean": 0.5, "pgd": 0.3, "ibp": 0.1, "crown_ibp": 0.2, "crown": None,
     "any": 0.2},
    {"eps": 0.05, "clean": 0.5, "pgd": 0.4, "ibp": 0.2, "crown_ibp": 0.3, "crown": None,
     "any": 0.3}]}


def test_run_figures_are_pngs_with_the_metrics_data(runs):
    _, by_method = runs
    # a certify.json (as fastcert.certify writes it) beside the fast run adds certify.png
    (by_method["fast"] / "certify").mkdir(exist_ok=True)
    (by_method["fast"] / "certify" / "certify.json").write_text(json.dumps(CERTIFY_SUMMARY))
    for method, run_dir in by_method.items():
        metrics = read_metrics(run_dir / "metrics.jsonl")
        assert len(metrics) == 3
        figs = plots.plot_run(run_dir)
        expected = {"training_curves", "relu_states", "regularizers", "tightness"}
        assert set(figs) == expected | ({"certify"} if method == "fast" else set()), method
        for name, (path, data) in figs.items():
            assert path == run_dir / "plots" / f"{name}.png"
            assert_png(path)
            if name != "certify":
                assert_series_match(data, metrics)
        curves = figs["training_curves"][1]
        assert {"loss", "eps", "train_clean_acc", "train_verified_acc"} <= set(curves)
        assert curves["eps"]["epoch"] == [1, 2, 3]
        relu = figs["relu_states"][1]
        assert set(relu) == {"relu_active", "relu_inactive", "relu_unstable"}
        for row in relu["relu_active"]["value"]:
            assert len(row) == 2  # one fraction per ReLU layer of the default MLP
        reg = figs["regularizers"][1]
        assert {"reg/tightness", "reg/relu"} <= set(reg)
        assert ("lambda" in reg) == (method == "fast")
    # certify.png plots certify.json sorted by eps, skipped verifiers (null) left out
    assert figs_certify_data(by_method["fast"]) == {
        "eps": [0.05, 0.1], "clean": [0.5, 0.5], "pgd": [0.4, 0.3], "ibp": [0.2, 0.1],
        "crown_ibp": [0.3, 0.2], "any": [0.3, 0.2]}


def figs_certify_data(run_dir):
    return plots.plot_certify(run_dir / "certify" / "certify.json",
                              run_dir / "plots" / "certify.png")[1]


def test_ibp_run_skips_relu_stats_in_its_eps0_epoch(runs, tmp_path):
    _, by_method = runs
    metrics = read_metrics(by_method["ibp"] / "metrics.jsonl")
    # IBP trains naturally at eps=0 (no bounds): epoch 1 has no ReLU statistics
    _, data = plots.plot_relu_states(metrics, tmp_path / "relu.png")
    assert data["relu_active"]["epoch"] == [2, 3]
    assert plots.plot_regularizers(metrics, tmp_path / "reg.png")[1][
        "reg/tightness"]["epoch"] == [2, 3]


def test_nothing_to_plot_gives_none(tmp_path):
    natural = [{"epoch": 1, "phase": "eps0", "eps": 0.0, "loss": 2.3, "loss/natural": 2.3,
                "train_clean_acc": 0.1, "epoch_time_s": 0.1}]
    assert plots.plot_relu_states(natural, tmp_path / "a.png") is None
    assert plots.plot_regularizers(natural, tmp_path / "b.png") is None
    assert plots.plot_training_curves([], tmp_path / "c.png") is None
    path, data = plots.plot_training_curves(natural, tmp_path / "d.png")
    assert_png(path)
    assert_series_match(data, natural)
    assert not (tmp_path / "a.png").exists() and not (tmp_path / "b.png").exists()


def test_scatter_of_several_runs_and_cli(runs, tmp_path):
    root, by_method = runs
    assert find_runs(root) == sorted(by_method.values())
    written = plots.main([str(root), "--out", str(tmp_path)])  # a sweep folder expands
    assert set(written["runs"]) == {str(p) for p in by_method.values()}
    path, data = written["scatter"]
    assert path == tmp_path / "clean_vs_verified.png"
    assert_png(path)
    results = {str(p): json.loads((p / "results.json").read_text())
               for p in by_method.values()}
    assert len(data["points"]) == 2
    for point in data["points"]:
        r = results[point["path"]]
        assert point["clean"] == r["clean_acc"]
        assert point["verified"] == r["any_verified_acc"]
        assert point["method"] == r["method"] and point["eps"] == r["eps"]
    # --out: a directory, or a .png path taken as the file name; default the current dir
    assert plots._scatter_path(str(tmp_path / "s.png"), [root]) == tmp_path / "s.png"
    assert (plots._scatter_path(None, list(by_method.values()))
            == root.resolve() / "plots" / "clean_vs_verified.png")


def test_bound_explosion_data_and_figure(tmp_path):
    """Fig. 1 in miniature: under the IBP init the mean width stays within a small factor of
    the input's (difference gain 1, Sec. 3.3.1); under every other init it grows by orders of
    magnitude over six layers (the gains √n/4 ... of Table 5 exceed 1)."""
    data = bound_explosion(model="cnn7", width=0.125, input_shape=(3, 16, 16), batch=2)
    assert set(data["mean_width"]) == set(options("init"))
    assert data["layers"] == ["input"] + [f"layer {i}" for i in range(1, 7)]
    assert data["fan_in"] == [None, 27, 72, 72, 144, 144, 16 * 8 * 8]
    d0 = data["mean_width"]["ibp"][0]
    assert d0 == pytest.approx(2 * 8 / 255, rel=0.1)  # the input box, a little clipped
    ibp = data["mean_width"]["ibp"]
    assert max(ibp) < 4 * d0 and min(ibp[1:]) > d0 / 4
    for name, widths in data["mean_width"].items():
        assert data["log_mean_width"][name] == pytest.approx([math.log(w) for w in widths])
        assert data["gain"][name] == pytest.approx([b / a for a, b in zip(widths, widths[1:])])
        if name != "ibp":
            assert widths[-1] > 50 * d0, name
    path, plotted = plots.plot_bound_explosion(tmp_path / "be.png", data=data)
    assert plotted is data
    assert_png(path)


def test_bound_explosion_cli(tmp_path):
    written = plots.main(["--bound-explosion", str(tmp_path / "fig1.png"), "--be-width",
                          "0.125", "--be-size", "8", "--be-batch", "2"])
    path, data = written["bound_explosion"]
    assert_png(path)
    assert data["settings"]["input_shape"] == [3, 8, 8]
    assert set(data["mean_width"]) == set(options("init"))


def test_cli_needs_something_to_do(capsys):
    with pytest.raises(SystemExit):
        plots.main([])
    assert "RUN_DIR" in capsys.readouterr().err


def test_read_run_label(runs):
    _, by_method = runs
    rec = read_run(by_method["fast"])
    assert rec.label == "fast-mlp-digits-s0"
    assert rec.results is not None and len(rec.metrics) == 3
    assert os.fspath(rec.path) == os.fspath(by_method["fast"])


def test_cli_never_writes_into_the_current_directory(runs, tmp_path, monkeypatch):
    """Without --out the scatter goes to plots/ in the runs' common folder."""
    root, by_method = runs
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    written = plots.main([str(root)])
    assert written["scatter"][0] == root.resolve() / "plots" / "clean_vs_verified.png"
    assert list(cwd.iterdir()) == []
