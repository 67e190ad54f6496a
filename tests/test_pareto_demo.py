"""``python -m experiments.pareto_demo``: the commands it launches pass fastcert's own checks
(every job's config composed and validated, as ``python -m fastcert.run`` does before Hydra
starts), the defaults share the searches' fixed settings, and the studies grow in rounds."""
from __future__ import annotations

import argparse

import pytest
from omegaconf import OmegaConf

from experiments import pareto_demo as D
from experiments.common import compose
from fastcert import resolvers
from fastcert.preflight import prepare
from fastcert.settings import validate


@pytest.fixture(autouse=True)
def _resolvers():
    resolvers.register()      # what importing fastcert.run does


def _args(tmp_path, **kw) -> argparse.Namespace:
    base = dict(out=str(tmp_path / "demo"), epochs=20, trials=20, step=10, jobs=2, eps=0.2,
                seed=0, methods=list(D.METHODS))
    return argparse.Namespace(**{**base, **kw})


def test_the_studies_grow_in_rounds_to_the_total():
    assert D.rounds(20, 10) == [10, 20]
    assert D.rounds(25, 10) == [10, 20, 25]
    assert D.rounds(5, 10) == [5]
    assert D.rounds(20, 0) == [20]


def test_the_default_schedule_is_the_digits_default_scaled_to_the_epochs():
    assert D.default_schedule(150) == (10, 60)
    assert D.default_schedule(20) == (1, 8)


@pytest.mark.parametrize("method", D.METHODS)
def test_every_search_command_passes_the_launch_checks(tmp_path, monkeypatch, method):
    monkeypatch.chdir(tmp_path)
    command = D.search_command(method, _args(tmp_path), 10)
    assert prepare(command).argv == command      # an explicit sweep dir is kept as given
    assert (tmp_path / "demo" / method).is_dir()


def test_the_defaults_run_each_preset_with_the_searches_fixed_settings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = _args(tmp_path)
    command = D.defaults_command(args)
    prepare(command)
    overrides = [o for o in command[1:] if not o.startswith(("hydra", "method="))]
    for method in D.METHODS:
        default = compose([f"method={method}", *overrides])
        search = compose([f"hparams_search=pareto/{method}", "data.eps=0.2", "epochs=20"])
        assert default.method.name == search.method.name == method
        for key in ("data.val_size", "data.val_seed", "epochs", "eval.verifiers",
                    "optimized_metric", "data.batch_size"):
            assert OmegaConf.select(default, key) == OmegaConf.select(search, key), key
        settings = validate(default)
        assert settings.eps == settings.eval_eps == pytest.approx(0.2)
        assert (default.schedule.start, default.schedule.length) == (1, 8)
