"""Every sweep over a folder of presets that the configs, the README and the docs document
launches that folder's presets, and each launched job composes the same config as
``experiment=<preset>``.

Hydra's ``glob`` lists one level of a config group, so a folder of presets is swept as its own
group: ``-m '+experiment/shi2021/table4=glob(*)'`` (``experiment=glob(shi2021/table4/*)`` matches
nothing). The jobs are expanded here as ``-m`` expands them: the override parser with the config
loader, then the basic sweeper's split into jobs."""
from __future__ import annotations

import re

import pytest
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra._internal.utils import create_config_search_path
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from fastcert.config import options
from fastcert.run import experiment_name

from conftest import CONF, ROOT

#: A documented sweep of presets: the quoted override after -m that globs a group.
DOCUMENTED = re.compile(r"-m '([^']*glob\([^']*\))'")
#: Folders of presets (a group path has no '.', so a folder such as mnist_dm_large_0.4 holds a
#: single preset, named in full instead).
FOLDERS = sorted({f for f in (p.rsplit("/", 1)[0] for p in options("experiment") if "/" in p)
                  if "." not in f})


def _documented() -> dict[str, list[str]]:
    """{documented sweep override: the files that document it}."""
    found: dict[str, list[str]] = {}
    pages = sorted(p for p in (ROOT / "docs").rglob("*.md") if not p.relative_to(ROOT / "docs")
                   .parts[0].startswith("_"))
    for f in [ROOT / "README.md", *pages, *sorted(CONF.rglob("*.yaml"))]:
        for override in DOCUMENTED.findall(f.read_text()):
            found.setdefault(override, []).append(str(f.relative_to(ROOT)))
    return found


def jobs(*overrides: str) -> list[list[str]]:
    """The jobs ``fastcert-train -m <overrides>`` launches, each as its list of overrides."""
    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(CONF)))
    parsed = OverridesParser.create(config_loader=loader).parse_overrides(list(overrides))
    (batch,) = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    return batch


def _folder(job: list[str]) -> tuple[str, str]:
    (group, option), = [o.lstrip("+").split("=", 1) for o in job if "experiment" in o]
    return group.removeprefix("experiment/"), option


@pytest.mark.parametrize("override", sorted(_documented()))
def test_every_documented_preset_sweep_launches_its_folder(override):
    launched = jobs(override)
    assert launched, f"{override} (documented in {_documented()[override]}) launches no job"
    folder = _folder(launched[0])[0]
    assert folder in FOLDERS, override
    assert sorted(_folder(j)[1] for j in launched) == sorted(
        p.rsplit("/", 1)[1] for p in options("experiment") if p.rsplit("/", 1)[0] == folder)


def test_the_folder_glob_form_is_what_launches_nothing():
    assert jobs("experiment=glob(shi2021/table4/*)") == []
    assert len(jobs("+experiment/shi2021/table4=glob(*)")) == 8


def test_every_multi_preset_family_documents_its_sweep():
    documented = {_folder(jobs(o)[0])[0] for o in _documented()}
    suites = ("ctbench/", "shi2021/", "crown_ibp/fashion_mnist")
    assert {f for f in FOLDERS if f.startswith(suites)} <= documented


@pytest.mark.parametrize("folder", FOLDERS)
def test_a_folder_sweep_job_is_the_preset(compose, folder):
    """One job of ``-m '+experiment/<folder>=glob(*)' seed=0,1`` per preset and seed; a job's
    config is the preset's, and its name (the W&B group) is the preset's full name."""
    launched = jobs(f"+experiment/{folder}=glob(*)", "seed=0,1")
    presets = [p for p in options("experiment") if p.rsplit("/", 1)[0] == folder]
    assert len(launched) == 2 * len(presets)
    job = launched[0]
    preset = "/".join(_folder(job))
    choices = compose(job, return_hydra_config=True).hydra.runtime.choices
    assert experiment_name(choices) == preset
    swept, direct = compose(job), compose([f"experiment={preset}", "seed=0"])
    assert OmegaConf.to_container(swept, resolve=True) == OmegaConf.to_container(direct,
                                                                                  resolve=True)


def test_the_experiment_name_of_either_form():
    assert experiment_name({"experiment": "ctbench/cifar10_2/sabr"}) == "ctbench/cifar10_2/sabr"
    assert experiment_name({"experiment": None, "experiment/ctbench/cifar10_2": "sabr",
                            "model": "cnn7"}) == "ctbench/cifar10_2/sabr"
    assert experiment_name({"experiment": None, "model": "cnn7"}) is None
