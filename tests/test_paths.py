"""The ``paths`` config group: one place (``paths.data_dir``, env ``FASTCERT_DATA``) says where
every data set lives; it changes no run's identity (sweep dir names, resume) and configs saved
before the group existed (``data.root`` resolved, no ``paths``) still rebuild."""
from __future__ import annotations

import pytest

from fastcert.config import build_option, option_node, options
from fastcert.resume import config_changes
from fastcert.settings import validate

from conftest import TINY

DATA = options("data")


@pytest.mark.parametrize("name", DATA)
def test_every_data_option_reads_its_root_from_paths(compose, name):
    cfg = compose([f"data={name}", "paths.data_dir=/datasets"])
    assert cfg.data.root == "/datasets"
    if "root" in cfg.data.get("source", {}):  # a two-class task of files: its source reads them
        assert cfg.data.source.root == "/datasets"
    one = compose([f"data={name}", "paths.data_dir=/datasets", "data.root=/one"])
    assert one.data.root == "/one"


def test_the_environment_sets_the_default(compose, monkeypatch):
    monkeypatch.delenv("FASTCERT_DATA", raising=False)
    assert compose(["data=mnist"]).data.root == "./data"
    monkeypatch.setenv("FASTCERT_DATA", "/scratch/data")
    assert compose(["data=mnist"]).data.root == "/scratch/data"
    assert option_node("data", "cifar10")["root"] == "/scratch/data"  # without Hydra too
    assert build_option("data", "mnist_2v5").source.root == "/scratch/data"


def test_paths_name_no_sweep_dir_and_are_no_resume_change(compose):
    cfg = compose(return_hydra_config=True)
    assert {"paths", "paths.data_dir"} <= set(cfg.hydra.job.config.override_dirname.exclude_keys)
    old = {"data": {"name": "mnist", "root": "./data", "batch_size": 16}, "seed": 0}
    new = {"paths": {"data_dir": "/b"}, "data": {**old["data"], "root": "/b"}, "seed": 0}
    assert config_changes(old, new) == {}


def test_a_config_saved_before_the_paths_group_validates(compose):
    """A checkpoint's config is stored resolved; one written before ``paths`` existed has
    ``data.root`` and no ``paths`` node, and rebuilds as it is."""
    from omegaconf import OmegaConf

    saved = OmegaConf.to_container(compose(TINY), resolve=True)
    del saved["paths"]
    saved["data"]["root"] = "/old/data"
    assert validate(OmegaConf.create(saved)).data.root == "/old/data"
