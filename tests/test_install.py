"""The package installs and runs on its own: a wheel built from the repository, installed into a
fresh virtual environment, runs ``fastcert-train debug=smoke`` and ``fastcert-certify`` from an
empty directory (the configs travel inside the package; no checkout is importable)."""
from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import CONF, ROOT

#: What a wheel is built from (everything pyproject.toml packages or reads).
SOURCES = ("pyproject.toml", "README.md", "fastcert", "experiments", "hydra_plugins")


def _sh(cmd, cwd, env, timeout=600):
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """A fresh venv holding only the wheel of this repository; the installed dependencies
    (torch, auto_LiRPA, Hydra ...) are seen through a .pth file listing this interpreter's
    site-packages, whose own .pth files (an editable fastcert among them) are not run."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        kwargs = ({"ignore": shutil.ignore_patterns("__pycache__")}
                  if copy is shutil.copytree else {})
        copy(ROOT / name, src / name, **kwargs)
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    _sh([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "-q", ".", "-w", tmp / "dist"], src, env)
    wheel, = (tmp / "dist").glob("fastcert-*.whl")
    root = tmp / "venv"
    _sh([sys.executable, "-m", "venv", "--without-pip", root], tmp, env)
    python = root / "bin" / "python"
    own = Path(_sh([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                   tmp, env).strip())
    parents = [p for p in site.getsitepackages() if Path(p).resolve() != own.resolve()]
    (own / "_parent_site_packages.pth").write_text("\n".join(parents) + "\n")
    _sh([python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "-q",
         wheel], tmp, env)
    env = {**env, "PATH": f"{root / 'bin'}{os.pathsep}{env.get('PATH', '')}",
           "OMP_NUM_THREADS": "1"}
    return root, env, wheel


def test_the_wheel_carries_every_config(venv):
    names = set(zipfile.ZipFile(venv[2]).namelist())
    configs = {f"fastcert/conf/{p.relative_to(CONF).as_posix()}" for p in CONF.rglob("*.yaml")}
    assert configs <= names


def test_the_wheel_carries_the_sweeper_plugin(venv):
    """Hydra discovers sweepers only in the ``hydra_plugins`` namespace package (no
    ``hydra_plugins/__init__.py``, which would hide the other plugins' modules)."""
    names = set(zipfile.ZipFile(venv[2]).namelist())
    assert {"hydra_plugins/fastcert_sweeper/__init__.py",
            "hydra_plugins/fastcert_sweeper/sweeper.py"} <= names
    assert "hydra_plugins/__init__.py" not in names


def test_the_wheel_trains_and_certifies_from_an_empty_directory(venv, tmp_path):
    root, env, _ = venv
    work = tmp_path / "empty"
    work.mkdir()
    where = _sh([root / "bin" / "python", "-c", "import fastcert; print(fastcert.__file__)"],
                work, env)
    assert Path(where.strip()).is_relative_to(root), where   # the installed copy, not a checkout
    _sh([root / "bin" / "fastcert-train", "debug=smoke", "device=cpu", "hydra.run.dir=run"],
        work, env)
    results = json.loads((work / "run" / "results.json").read_text())
    assert results["epochs"] == 2 and 0 <= results["clean_acc"] <= 1
    _sh([root / "bin" / "fastcert-certify", f"checkpoint={work / 'run' / 'last.pt'}",
         "limit_test=8", "progress=false", "device=cpu"], work, env)
    assert json.loads((work / "run" / "certify" / "certify.json").read_text())["n_test"] == 8
    assert not (work / "conf").exists()
    assert sorted(p.name for p in work.iterdir()) == ["run"]


def test_console_scripts_refuse_a_missing_checkpoint_in_one_line(venv, tmp_path):
    root, env, _ = venv
    for script in ("fastcert-certify", "fastcert-export"):
        proc = subprocess.run([root / "bin" / script, "checkpoint=nope.pt"], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2
        assert proc.stderr.strip() == "error: checkpoint nope.pt does not exist"
