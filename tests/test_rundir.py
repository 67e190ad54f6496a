"""Run-dir claims: concurrent launches never share a dir, and a claim leaves no trace when the
run is refused."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastcert.rundir import claim, release

from conftest import ROOT

#: A claimer: imports only fastcert.rundir (no torch), waits for the go file, claims, prints.
CLAIMER = """
import os, sys, time
from pathlib import Path
from fastcert.rundir import claim
go = Path(sys.argv[1])
while not go.exists():
    time.sleep(0.001)
got, _ = claim(sys.argv[2])
print(got, "torch" in sys.modules, flush=True)
"""


def test_claim_takes_the_first_free_suffix(tmp_path):
    natural = tmp_path / "outputs" / "day" / "time"
    first, created = claim(natural)
    assert first == natural and created == [tmp_path / "outputs", natural.parent, natural]
    second, created = claim(natural)
    assert second == natural.with_name("time_1") and created == [second]
    natural.with_name("time_2").mkdir()
    assert claim(natural)[0] == natural.with_name("time_3")


def test_release_removes_only_empty_dirs_it_created(tmp_path):
    (tmp_path / "outputs").mkdir()
    got, created = claim(tmp_path / "outputs" / "day" / "time")
    release(created)
    assert list((tmp_path / "outputs").iterdir()) == []
    got, created = claim(tmp_path / "outputs" / "day" / "time")
    (got / "kept.txt").write_text("mine")
    release(created)
    assert (got / "kept.txt").read_text() == "mine"


def test_forty_concurrent_claimers_get_forty_dirs(tmp_path):
    go, natural = tmp_path / "go", tmp_path / "outputs" / "day" / "time"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", CLAIMER, str(go), str(natural)],
                              stdout=subprocess.PIPE, text=True, env=env) for _ in range(40)]
    time.sleep(1.0)  # let the interpreters start and wait on the go file
    go.touch()
    lines = [p.communicate(timeout=120)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    dirs = [line[0] for line in lines]
    assert len(set(dirs)) == 40, sorted(dirs)
    assert {Path(d).name for d in dirs} == {"time"} | {f"time_{k}" for k in range(1, 40)}
    assert {line[1] for line in lines} == {"False"}  # no claimer imported torch


@pytest.mark.parametrize("n", [2, pytest.param(8, marks=pytest.mark.slow)])
def test_runs_with_one_natural_name_get_a_dir_each(tmp_path, n):
    """``n`` ``fastcert.run`` processes whose run dirs have the same timestamped name (what
    launches in the same second get): each claims its own dir and writes a complete run
    there."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = ["debug=smoke", "device=cpu", "cpu_threads=1", "data.limit_train=64",
            "data.limit_test=32", "hydra.run.dir=outputs/${now:%Y-%m-%d}/same"]
    procs = [subprocess.Popen([sys.executable, "-m", "fastcert.run", *args, f"seed={s}"],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for s in range(n)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    dirs = sorted((tmp_path / "outputs").glob("*/same*"))
    assert len(dirs) == n, dirs
    seeds = set()
    for d in dirs:
        results = json.loads((d / "results.json").read_text())
        seeds.add(results["seed"])
        assert [json.loads(r)["epoch"] for r in (d / "metrics.jsonl").read_text().splitlines()] \
            == [1, 2]
    assert seeds == set(range(n))
    taken = [out for out, _ in outs if "was taken" in out]
    assert len(taken) == n - 1, [out[:300] for out, _ in outs]


@pytest.mark.parametrize("key,args", [("hydra.run.dir", []),
                                      ("hydra.sweep.dir", ["-m", "seed=0,1"])])
def test_launches_in_the_same_second_claim_two_dirs_and_explicit_dirs_are_kept(
        tmp_path, monkeypatch, capsys, key, args):
    """What ``fastcert.run`` hands Hydra: a timestamped name taken by an earlier launch is
    replaced by the next free one (said in one line); an explicit dir is used as given."""
    from fastcert.preflight import prepare

    monkeypatch.chdir(tmp_path)
    natural = f"{key}=out/${{now:%Y}}/same"
    first = prepare([*args, "debug=smoke", natural])
    second = prepare([*args, "debug=smoke", natural])
    year = time.strftime("%Y")
    assert first.argv[-1] == f"{key}=out/{year}/same"
    assert second.argv[-1] == f"{key}=out/{year}/same_1"
    what = "sweep" if "sweep" in key else "run"
    assert (f"out/{year}/same was taken (another launch in the same second): this {what} is "
            f"in out/{year}/same_1") in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "out" / year).iterdir()) == ["same", "same_1"]
    for _ in range(2):
        explicit = prepare([*args, "debug=smoke", f"{key}=mine"])
        assert explicit.argv == [*args, "debug=smoke", f"{key}=mine"]
    assert (tmp_path / "mine").is_dir() and not (tmp_path / "mine_1").exists()
