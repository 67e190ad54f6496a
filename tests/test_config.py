"""The real conf/ tree composes for every option of every group, and bad input fails early
with a message that says what to do."""
from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException

from fastcert.config import ConfigError, instantiate, option_node
from fastcert.pipeline import build
from fastcert.settings import RUNTIME, validate

from conftest import CONF, TINY

GROUPS = ["data", "model", "method", "init", "schedule", "optim", "eval", "logger", "debug"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_group_option_composes(compose, group, option):
    cfg = compose([f"{group}={option}"])
    if group in ("data", "model", "method", "init", "logger"):
        assert cfg[group].name == option


@pytest.mark.parametrize("group,option", [(g, o) for g, o in OPTIONS if g != "debug"],
                         ids=[f"{g}={o}" for g, o in OPTIONS if g != "debug"])
def test_every_option_names_its_target_and_checks_against_it(compose, group, option):
    """The config groups are the registry: each option's node has ``name`` (= the option) and
    a ``_target_`` whose signature accepts every key of the node."""
    from fastcert.config import check_node

    node = compose([f"{group}={option}"])[group]
    assert node.name == option and "_target_" in node
    check_node(node, group, RUNTIME.get(group, ()))


def test_instantiate_refuses_unknown_keys_with_the_nearest_and_all_valid_keys():
    node = {"_target_": "fastcert.optim.Adam", "lr": 1e-3, "gama": 0.5}
    with pytest.raises(ConfigError, match=r"optim.gama is not a key of optim: did you mean "
                                          r"optim.gamma\? valid keys: .*grad_clip.*lr"):
        instantiate(node, "optim")


def test_default_config_is_the_embedded_default(compose):
    cfg = compose()
    assert (cfg.data.name, cfg.method.name, cfg.logger.name) == ("digits", "ibp", "none")
    assert cfg.eps == pytest.approx(0.1)


IBP_INIT_METHODS = ["fast", "sabr", "taps", "staps", "mtl_ibp", "cc_ibp", "exp_ibp"]


@pytest.mark.parametrize("name", IBP_INIT_METHODS)
def test_ibp_family_method_selects_ibp_init_unless_overridden(compose, name):
    """The method file selects the run's init group (``override /init@_global_.init``); a
    command-line ``init=`` wins wherever it stands, and the method node holds no init key."""
    cfg = compose([f"method={name}"])
    assert cfg.init.name == "ibp" and "init" not in cfg.method and "defaults" not in cfg.method
    assert compose([f"method={name}", "init=default"]).init.name == "default"
    assert compose(["init=orthogonal", f"method={name}"]).init.name == "orthogonal"
    assert "defaults" not in option_node("method", name)


def test_fast_method_selects_ibp_init_unless_overridden(compose):
    assert compose(["method=fast"]).init.name == "ibp"
    assert compose(["method=fast", "init=default"]).init.name == "default"
    assert compose(["method=ibp"]).init.name == "default"
    assert compose(["experiment=ctbench/cifar10_2/sabr", "init=default"]).init.name == "default"


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
    ("+method.gamma=3", "method.gamma is not a key of method"),
    ("+schedule.kind=cosine", "schedule.kind is not a key"),
    ("optim.lr=-1", "lr"),
    ("optim.lr=abc", "optim.lr='abc': expected a number"),
    ("schedule.length=abc", "schedule.length='abc': expected an integer"),
    ("eval.verifiers=[ibp,foo]", "unknown verifier 'foo'"),
    ("data.batch_size=0", "data.batch_size=0: must be a positive integer"),
    ("+epoch=3", "epoch is not a top-level key; did you mean epochs=...?"),
    ("method.kappa.start=true", "method.kappa.start=True: expected a number"),
    ("eval.eps=2", "eval.eps=2.0 exceeds the data range"),
])
def test_bad_values_fail_before_training(compose, tmp_path, override, match):
    cfg = compose(TINY + [override])
    with pytest.raises((ConfigError, ValueError), match=match):
        build(validate(cfg))


@pytest.mark.parametrize("text,value", [("8/255", 8 / 255), ("0.1", 0.1), ("1e-2", 0.01)])
def test_radii_are_read_as_numbers_or_fractions(compose, text, value):
    """Researchers write radii as fractions of the pixel range (eps=8/255)."""
    cfg = compose(TINY + [f"eps={text}", f"eval.eps={text}"])
    s = validate(cfg)
    assert s.eps == pytest.approx(value) and s.eval_eps == pytest.approx(value)


def test_eval_eps_is_the_test_radius_and_defaults_to_the_training_one(compose, tmp_path):
    """CROWN-IBP's MNIST setting trains at 0.4 and tests at 0.3 (Zhang et al. 2020)."""
    assert validate(compose(TINY + ["eps=0.2"])).eval_eps == pytest.approx(0.2)
    from fastcert.pipeline import run

    results = run(compose(TINY + ["eps=0.2", "eval.eps=0.05"]), tmp_path)
    assert results["eps"] == pytest.approx(0.05) and results["train_eps"] == pytest.approx(0.2)


def test_short_run_warns_that_eps_target_is_not_reached(compose):
    cfg = compose(TINY + ["epochs=1", "schedule.start=1", "schedule.length=5"])
    with pytest.warns(UserWarning, match="never reached"):
        build(validate(cfg))
