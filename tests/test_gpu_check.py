"""``make gpu-check`` (experiments/gpu_check.py) without a GPU: the one-line refusal, the
commands a GPU run makes, the largest-batch search on a memory model, the report and CSV
assembled from every piece's output, and the pieces that run in this process on the CPU at
their --quick sizes. The whole ``--device cpu --quick`` run (bench, torchrun, the multirun) is
the slow test."""
from __future__ import annotations

import csv
import json
import shlex
import sys

import pytest
import torch

from experiments import bench, gpu_check


def test_without_cuda_one_error_line_exit_2_and_nothing_written(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "report"
    assert gpu_check.main(["--out", str(out)]) == 2
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --device cuda")
    assert not out.exists()


def test_an_earlier_report_is_never_overwritten(tmp_path, capsys):
    (tmp_path / "gpu_check.md").write_text("earlier\n")
    assert gpu_check.main(["--device", "cpu", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().out.startswith("error: --out")
    assert (tmp_path / "gpu_check.md").read_text() == "earlier\n"


def test_a_gpu_run_makes_the_issues_commands(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    ps = {p.name: p for p in gpu_check.pieces("cuda", False, tmp_path)}
    assert list(ps) == ["bench", "tiny", "data", "certify", "ddp", "pool"]
    args = bench.parse(ps["bench"].argv[3:])
    assert (args.device, args.batch, args.phases, args.quick, args.methods) == (
        "cuda", 256, True, False, None)  # every method, batch 256, Table 3's phases
    assert "--nproc_per_node=2" in ps["ddp"].argv and "torch.distributed.run" in ps["ddp"].argv
    assert "-m" in ps["pool"].argv[3:] and "seed=0,1" in ps["pool"].argv
    assert sum(p.limit_s for p in ps.values()) < 8 * 60


class _Memory:
    """A step's peak memory: 1000 + 10·b bytes; out of memory above ``capacity``."""

    def __init__(self, capacity):
        self.capacity, self.tried = capacity, []

    def __call__(self, b):
        self.tried.append(b)
        peak = 1000 + 10 * b
        return peak if peak <= self.capacity else None


@pytest.mark.parametrize("capacity,largest", [(100_000, 9600), (5_000, 384), (2_000, None)])
def test_largest_batch_from_two_peaks_confirmed_by_a_step(capacity, largest):
    step = _Memory(capacity)
    got = gpu_check.largest_batch(step, 128, capacity)
    assert got["largest"] == largest
    if largest:
        assert step(largest) is not None and (1000 + 10 * (largest + 8) > capacity
                                              or largest * 1.2 > (capacity - 1000) / 10)
    assert len(step.tried) <= 8


def _canned(out):
    """Every piece's output as a GPU run writes it."""
    (out / "bench").mkdir()
    row = {"median_s": 0.05, "min_s": 0.04, "cpu_median_s": None, "peak_mib": 900.0,
           "x_natural": 3.0, "floor": "floor ibp", "x_floor": 1.02}
    (out / "bench" / "bench.json").write_text(json.dumps({
        "batch": 256, "rows": {"fit ibp": row, "fit mtl_ibp": {**row, "x_floor": 1.4}},
        "phases": {m: {"eps0": 20.0, "ramp": 40.0, "final": 40.0}
                   for m in ("ibp", "crown_ibp", "fast")}, "phases_n_train": 50_000}))
    (out / "tiny.json").write_text(json.dumps([
        {"model": m, "method": k, "batch": 128, "s_per_step": 0.1, "largest": 4096,
         "predicted": 4200, "note": "confirmed by a step"}
        for m in gpu_check.TINY_MODELS for k in gpu_check.TINY_METHODS]))
    (out / "data.json").write_text(json.dumps([
        {"path": p, "images": 50_000, "batch": 256, "data_s_per_epoch": 1.0,
         "ibp_s_per_epoch": 9.0} for p in ("on device", "DataLoader")]))
    (out / "certify.json").write_text(json.dumps([
        {"verifier": v, "examples": 64, "batch": 32, "s_per_example": 0.01}
        for v in ("crown", "alpha_crown")]))
    (out / "ddp").mkdir()
    (out / "ddp" / "results.json").write_text("{}")
    for job in ("0_seed=0", "1_seed=1"):
        (out / "pool" / job).mkdir(parents=True)
        (out / "pool" / job / "results.json").write_text("{}")


def test_report_and_csv_hold_every_figure(tmp_path):
    _canned(tmp_path)
    status = {p.name: {"command": f"cmd {p.name}", "rc": 0, "wall_s": 1.0}
              for p in gpu_check.pieces("cpu", False, tmp_path)}
    rows = gpu_check.figures(tmp_path, status, "1 x NVIDIA H100")
    report = gpu_check.markdown(rows, "1 x NVIDIA H100")
    for section in ("bench", "table3", "tinyimagenet", "data path", "certify", "runs",
                    "commands"):
        assert f"## {section}" in report
    got = {(r["section"], r["subject"], r["metric"]): r for r in rows}
    assert got[("bench", "fit mtl_ibp", "x floor")]["value"] == 1.4
    assert "54.8" in got[("table3", "ibp", "s/epoch ramp")]["note"]  # Shi et al.'s 2080 Ti
    assert got[("table3", "crown_ibp", "s/epoch ramp")]["note"].endswith("78.5")
    assert got[("tinyimagenet", "resnext crown_ibp", "largest batch")]["value"] == 4096
    assert got[("runs", "pool", "jobs finished")]["value"] == 2
    assert got[("runs", "ddp", "finished")]["value"] == 1
    assert got[("commands", "ddp", "exit status")]["note"] == "cmd ddp"
    gpu_check.write_csv(rows, tmp_path / "gpu_check.csv")
    with open(tmp_path / "gpu_check.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)


def test_the_commands_are_printed_and_the_report_written(tmp_path, capsys, monkeypatch):
    """main runs each piece's command after printing it, then writes the report and CSV."""
    _canned(tmp_path)
    ran = []
    cheap = [gpu_check.Piece(n, [sys.executable, "-c", f"print({n!r})"], 30)
             for n in ("bench", "tiny")]
    monkeypatch.setattr(gpu_check, "pieces", lambda *a: ran.extend(cheap) or cheap)
    assert gpu_check.main(["--device", "cpu", "--quick", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    for p in cheap:
        assert f"$ {shlex.join(p.argv)}\n" in printed
    assert (tmp_path / "gpu_check.md").read_text().startswith("# make gpu-check: CPU")
    assert (tmp_path / "gpu_check.csv").is_file() and "## tinyimagenet" in printed


def test_the_in_process_pieces_run_on_the_cpu(tmp_path):
    """tiny, data and certify at their --quick sizes (the figures mean nothing here)."""
    gpu_check.run_own_piece("certify", "cpu", True, tmp_path)
    cert = json.loads((tmp_path / "certify.json").read_text())
    assert [r["verifier"] for r in cert] == ["crown", "alpha_crown"]
    assert all(r["s_per_example"] >= 0 for r in cert)
    data = gpu_check.data_piece(torch.device("cpu"), True, tmp_path)
    assert [r["path"] for r in data] == ["on device", "DataLoader"]
    assert all(r["data_s_per_epoch"] > 0 and r["ibp_s_per_epoch"] > 0 for r in data)


@pytest.mark.slow
def test_the_whole_quick_run_on_the_cpu(tmp_path, capsys):
    """Every piece as a command (bench --quick, tiny, data, certify, torchrun with world size
    1, the 2-job multirun) exits 0 and gives its figures."""
    assert gpu_check.main(["--device", "cpu", "--quick", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "gpu_check.csv") as f:
        rows = list(csv.DictReader(f))
    status = {r["subject"]: r["value"] for r in rows if r["metric"] == "exit status"}
    assert status == dict.fromkeys(("bench", "tiny", "data", "certify", "ddp", "pool"), "0")
    runs = {r["subject"]: r["value"] for r in rows if r["section"] == "runs"}
    assert runs == {"ddp": "1", "pool": "2"}
    assert {r["section"] for r in rows} >= {"bench", "table3", "tinyimagenet", "data path",
                                            "certify"}
