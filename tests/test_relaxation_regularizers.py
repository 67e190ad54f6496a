"""experiments.relaxation_regularizers: CROWN-IBP with and without r (Table 3 of Zhu et al. 2020 in
miniature) through the real presets and pipeline."""
from __future__ import annotations

import csv
import json
import time

import pytest

from experiments import relaxation_regularizers as rr


def _check_outputs(out, eps_values, seeds):
    with open(out / "runs.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["variant"], float(r["eps"]), int(r["seed"])) for r in rows} == {
        (v, e, s) for v in rr.VARIANTS for e in eps_values for s in seeds}
    for r in rows:
        run_dir = out / f"eps{float(r['eps']):g}" / f"{r['variant']}-s{r['seed']}"
        results = json.loads((run_dir / "results.json").read_text())
        for key in ("clean_acc", "crown_verified_acc", "ibp_verified_acc"):
            assert float(r[key]) == pytest.approx(results[key])
        assert float(r["d"]) >= 0 and float(r["r"]) >= 0
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        metrics = [json.loads(line) for line in lines]
        regularised = any("reg/r" in m for m in metrics)
        assert regularised == (r["variant"] == "crown_ibp_r")  # r is trained only in "+ r"
    table = (out / "table.md").read_text()
    assert "| CROWN-IBP |" in table and "| CROWN-IBP + r |" in table
    return rows


def test_the_comparison_writes_its_table(tmp_path):
    """A subset (one ε, small data subsets) of ``--quick``."""
    rows = rr.main(["--quick", "--eps", "0.1", "--out", str(tmp_path), "--",
                    "data.limit_train=128", "data.limit_test=64", "eval.pgd.steps=2"])
    _check_outputs(tmp_path, [0.1], [0])
    assert len(rows) == 2


@pytest.mark.slow
def test_quick_runs_in_minutes(tmp_path):
    t0 = time.perf_counter()
    rr.main(["--quick", "--out", str(tmp_path)])
    assert time.perf_counter() - t0 < 300
    _check_outputs(tmp_path, [0.1, 0.2], [0])
