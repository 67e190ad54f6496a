"""The real conf/ tree composes for every option of every group, and bad input fails early
with a message that says what to do."""
from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException

from fastcert.config import ConfigError
from fastcert.data import DATASETS
from fastcert.initializers import INITIALIZERS
from fastcert.methods import METHODS
from fastcert.models import MODELS
from fastcert.pipeline import build

from conftest import CONF, TINY

GROUPS = ["data", "model", "method", "init", "schedule", "optim", "eval", "logger", "debug"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_group_option_composes(compose, group, option):
    cfg = compose([f"{group}={option}"])
    if group in ("data", "model", "method", "init", "logger"):
        assert cfg[group].name == option


@pytest.mark.parametrize("group,registry", [("data", DATASETS), ("model", MODELS),
                                            ("method", METHODS), ("init", INITIALIZERS)])
def test_registries_and_config_groups_agree(group, registry):
    """One registry feeds the CLI choices: every registered name has a config and vice versa."""
    assert {p.stem for p in (CONF / group).glob("*.yaml")} == set(registry)


def test_default_config_is_the_embedded_default(compose):
    cfg = compose()
    assert (cfg.data.name, cfg.method.name, cfg.logger.name) == ("digits", "ibp", "none")
    assert cfg.eps == pytest.approx(0.1)


def test_fast_method_selects_ibp_init_unless_overridden(compose):
    assert compose(["method=fast"]).init.name == "ibp"
    assert compose(["method=fast", "init=default"]).init.name == "default"
    assert compose(["method=ibp"]).init.name == "default"


def test_unknown_names_and_keys_are_rejected(compose):
    with pytest.raises((MissingConfigException, ConfigCompositionException), match="resnet999"):
        compose(["model=resnet999"])
    with pytest.raises(ConfigCompositionException):
        compose(["no_such_key=1"])
    with pytest.raises(ConfigCompositionException):
        compose(["optim.no_such_key=1"])


@pytest.mark.parametrize("override,match", [
    ("eps=-0.1", "must be >= 0"),
    ("eps=1.5", "exceeds the data range"),
    ("epochs=0", "at least one epoch"),
    ("+method.gamma=3", "no option"),
    ("schedule.kind=cosine", "linear"),
    ("optim.lr=-1", "lr"),
])
def test_bad_values_fail_before_training(compose, tmp_path, override, match):
    cfg = compose(TINY + [override])
    with pytest.raises((ConfigError, ValueError), match=match):
        build(cfg)


def test_short_run_warns_that_eps_target_is_not_reached(compose):
    cfg = compose(TINY + ["epochs=1", "schedule.start=1", "schedule.length=5"])
    with pytest.warns(UserWarning, match="never reached"):
        build(cfg)
