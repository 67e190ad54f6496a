"""Pareto dominance (fastcert.front) and ``python -m experiments.pareto``: exactly the
non-dominated trials are marked (ties kept), per method; the table, CSV, plot, published points
and the W&B front."""
from __future__ import annotations

import csv

import pytest

from experiments import pareto as P
from experiments.published import KAULEN_FRONTS, published_points
from fastcert.front import dominates, non_dominated

from test_wandb import OfflineRun, offline_runs, wandb_env

#: Hand-built (clean, certified) points and which are on the front: c ties b exactly, e is
#: dominated by b only in one objective by equality (≥ both, > one), f is equal in clean to a
#: but lower in certified, g is the single best certified.
POINTS = {"a": (0.90, 0.10), "b": (0.80, 0.40), "c": (0.80, 0.40), "d": (0.70, 0.30),
          "e": (0.80, 0.35), "f": (0.90, 0.05), "g": (0.20, 0.50), "h": (0.20, 0.45)}
FRONT = {"a", "b", "c", "g"}


def test_dominance_is_at_least_as_good_everywhere_and_better_somewhere():
    assert dominates((0.8, 0.4), (0.8, 0.35)) and not dominates((0.8, 0.4), (0.8, 0.4))
    assert not dominates((0.9, 0.1), (0.8, 0.4)) and not dominates((0.8, 0.4), (0.9, 0.1))
    assert dominates((0.1, 0.2), (0.2, 0.3), ["minimize", "minimize"])
    assert not dominates((0.1, 0.2), (0.2, 0.3))
    # a margin: a must beat b + margin in every objective
    assert dominates((0.9, 0.5), (0.8, 0.4), margin=0.05)
    assert not dominates((0.9, 0.42), (0.8, 0.4), margin=0.05)
    with pytest.raises(ValueError, match="objectives"):
        dominates((1.0,), (1.0, 2.0))


def test_non_dominated_keeps_exactly_the_front_ties_included():
    names = list(POINTS)
    keep = non_dominated([POINTS[n] for n in names])
    assert {n for n, k in zip(names, keep) if k} == FRONT
    assert non_dominated([(0.5, 0.5)] * 3) == [True] * 3   # equal points: all on the front
    assert non_dominated([]) == []


def _point(name, method="sabr", state="COMPLETE", feasible=None, number=None):
    values = list(POINTS[name])
    return P.Point(source="hand", number=number if number is not None else ord(name) - 97,
                   method=method, state=state, keys=["val_clean_acc", "val_any_verified_acc"],
                   values=values, test=[v - 0.01 for v in values], params={"method.lam": 0.1},
                   feasible=feasible)


def test_fronts_are_per_method_complete_and_feasible():
    points = [_point(n) for n in POINTS]
    # another method's better point does not remove a sabr point from sabr's front
    points.append(P.Point("hand", 99, "fast", "COMPLETE", points[0].keys, [1.0, 1.0]))
    # not COMPLETE: never on a front, whatever its values
    points.append(_point("a", state="PRUNED", number=50))
    points.append(P.Point("hand", 51, "sabr", "FAIL", points[0].keys, None))
    front = P.fronts(points)
    assert {p.number for p in front["sabr"]} == {ord(n) - 97 for n in FRONT}
    assert [p.number for p in front["fast"]] == [99]
    assert [p.values[0] for p in front["sabr"]] == sorted(
        (p.values[0] for p in front["sabr"]), reverse=True)
    # constraints: only feasible points compete (CTRAIN); none feasible → all of them
    constrained = [_point(n, feasible=n in ("d", "e", "h")) for n in POINTS]
    assert {p.number for p in P.fronts(constrained)["sabr"]} == {4, 7}   # e dominates d
    assert {p.number for p in P.fronts([_point(n, feasible=False) for n in POINTS])[
        "sabr"]} == {ord(n) - 97 for n in FRONT}


def test_table_csv_and_plot(tmp_path):
    points = [_point(n) for n in POINTS] + [_point("d", method="fast", number=20)]
    baseline = P.Point("runs", None, "sabr", "COMPLETE", points[0].keys, [0.5, 0.2], [0.4, 0.1])
    front = P.fronts(points)
    text = P.table(points, front, [baseline])
    assert "### sabr: 8 trials (8 complete); front of 4" in text
    assert "| 0 | 90.00 | 10.00 | 89.00 | 9.00 | lam=0.1 |" in text
    assert "| default | 50.00 | 20.00 | 40.00 | 10.00 | the method's preset |" in text
    assert "### fast: 1 trials (1 complete); front of 1" in text
    P.write_csv(tmp_path / "f.csv", front, [baseline])
    rows = list(csv.DictReader(open(tmp_path / "f.csv")))
    assert len(rows) == 4 + 1 + 1
    assert {r["trial"] for r in rows if r["method"] == "sabr"} == {"0", "1", "2", "6", "default"}
    png = P.plot(points, front, tmp_path / "f.png", [baseline], "kaulen2026")
    assert png.stat().st_size > 10_000


def test_published_points_name_their_source():
    pts = published_points("kaulen2026", "tinyimagenet_1")
    assert ("mtl_ibp", 39.75, 30.67) in [p[:3] for p in pts]
    assert all("Kaulen" in p[3] and "tinyimagenet_cnn7_eps0.0039" in p[3] for p in pts)
    assert (79.10, 64.61) in KAULEN_FRONTS["cifar10_2"][1]["mtl_ibp"]
    ctb = published_points("ctbench", "cifar10_2")
    assert ("sabr", 77.86, 63.61) in [p[:3] for p in ctb]
    assert all(p[2] is not None for p in ctb)                  # PGD's uncertified row left out
    assert published_points("ctbench", None) == []
    assert "no published points" in P.published_note("kaulen2026", None)
    with pytest.raises(ValueError, match="choose one of"):
        published_points("nope", "cifar10_2")


def test_front_is_logged_to_wandb_as_a_table_and_an_image(tmp_path, monkeypatch):
    for k, v in wandb_env(tmp_path).items():
        monkeypatch.setenv(k, v)
    points = [_point(n) for n in POINTS]
    front = P.fronts(points)
    png = P.plot(points, front, tmp_path / "f.png")
    run_id = P.log_wandb(front, png, project="fastcert", group="g", name="front-x",
                         mode="offline", directory=tmp_path)
    import wandb
    wandb.teardown()
    (file,) = offline_runs(tmp_path)
    run = OfflineRun(file)
    assert run.id == run_id and run.run["run_group"] == "g"
    (row,) = run.rows("front._type")
    assert row["front._type"] == "table-file" and row["front.nrows"] == 4
    assert row["front_plot._type"] == "image-file"
    assert (file.parent / "files" / row["front.path"]).is_file()
