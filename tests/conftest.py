"""Shared fixtures: Hydra composition of the real conf/ tree, and tiny settings for runs."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# Smallest settings that still go through every stage of a run.
TINY = ["debug=smoke", "device=cpu", "data.limit_train=96", "data.limit_test=48"]


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)  # one torch thread per xdist worker: no oversubscription


@pytest.fixture
def compose():
    """compose(overrides) -> DictConfig from conf/config.yaml, as `python -m fastcert.run` would."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    def _compose(overrides=(), return_hydra_config=False):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return hydra_compose("config", overrides=list(overrides),
                                 return_hydra_config=return_hydra_config)

    yield _compose
    GlobalHydra.instance().clear()
