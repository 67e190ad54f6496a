"""Every refused command of ``python -m fastcert.run`` prints one line ``error: ...``, exits
with status 2 and leaves the directory it was started in exactly as it was: no run dir, no
sweep dir, no changed file (run in-process: one interpreter for the whole list)."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from fastcert.pipeline import run

from conftest import TINY, compose_config

SMOKE = ["debug=smoke", "device=cpu"]
REFUSED = [
    # Hydra's own errors, as one line
    (["epoch=3"], "error: unknown key epoch; did you mean epochs?"),
    (["optim.lrr=0.1"], "error: unknown key optim.lrr; did you mean optim.lr?"),
    (["method=fats"], "error: method=fats: no such option; choose from cc_ibp, crown, "),
    (["-m", "method=ibp,fats"], "(did you mean fast?)"),
    (["+method=fast"], "error: +method=...: method is chosen already; write method=<option>"),
    (["eps=[0.1"], "error: cannot read the override eps=[0.1"),
    (["seed=0,1"], "error: seed=0,1 sweeps over several values: add -m"),
    # values
    (["device=mps"], "error: ConfigError: device=mps: fastcert runs on the CPU or on CUDA"),
    (["eps=-0.1"], "error: ConfigError: eps=-0.1: the perturbation radius must be >= 0"),
    (["+epoch=3"], "error: ConfigError: epoch is not a top-level key; did you mean epochs"),
    (["optim.lr=abc"], "error: ConfigError: optim.lr='abc': expected a number"),
    (["resume=true"], "error: ConfigError: resume=True: resume is a group of keys"),
    # the objective of a sweep, before its first trial
    (["hparams_search=fast_optuna", "optimized_metric=ibp_verifed_acc"],
     "error: ConfigError: optimized_metric=ibp_verifed_acc is not a metric this run produces: "
     "did you mean ibp_verified_acc?"),
    (["hparams_search=fast_optuna", "eval.verifiers=[crown]"],
     "error: ConfigError: optimized_metric=ibp_verified_acc: eval.verifiers=[crown] does not "
     "run ibp"),
    # run dirs and checkpoints
    (["resume.checkpoint=last"], "error: CheckpointError: resume: no checkpoint at"),
    (["hydra.run.dir=done"], "error: CheckpointError: done already holds a run (last.pt)"),
    (["hydra.run.dir=done", "resume.checkpoint=last", "epochs=1"],
     "error: ConfigError: epochs=1 is below the 2 epochs done/last.pt has trained"),
    (["hydra.run.dir=done", "resume.checkpoint=last", "resume.allow_changes=true",
      "model.widths=[8,8]"],
     "error: CheckpointError: the checkpoint's weights do not fit this model"),
    (["hydra.run.dir=blocker/run"], "error: cannot create run dir blocker/run: Not a directory"),
    (["-m", "seed=0,1", "hydra.sweep.dir=blocker/sweep"], "error: cannot create sweep dir"),
    (["data=mnist", "data.root=data/empty"], "error: DatasetNotFoundError: "),
]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("finished") / "done"
    run(compose_config("config", TINY), run_dir)
    return run_dir


def _tree(root: Path) -> dict:
    """Every path under ``root`` with, for files, its bytes and modification time."""
    return {p.relative_to(root).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            if p.is_file() else None for p in sorted(root.rglob("*"))}


@pytest.fixture
def workdir(tmp_path, finished, monkeypatch):
    """A launch directory with a finished run (done/), a file in the way (blocker), an empty
    data root and a note."""
    shutil.copytree(finished, tmp_path / "done")
    (tmp_path / "blocker").write_text("a file, not a directory")
    (tmp_path / "data" / "empty").mkdir(parents=True)
    (tmp_path / "notes.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _refused(args: list[str], monkeypatch, capsys) -> str:
    """Run ``python -m fastcert.run <args>`` in this process; its stderr (exit status 2)."""
    from fastcert import run as run_module

    flags = [a for a in args if a.startswith("-")]  # before the overrides, as argparse wants
    monkeypatch.setattr(sys, "argv", ["fastcert.run", *flags, *SMOKE,
                                      *[a for a in args if a not in flags]])
    with pytest.raises(SystemExit) as e:
        run_module.cli()
    err = capsys.readouterr().err
    assert e.value.code == 2, err[-3000:]
    return err


@pytest.mark.parametrize("args,message", REFUSED, ids=[" ".join(a) for a, _ in REFUSED])
def test_a_refused_command_says_one_line_and_writes_nothing(workdir, monkeypatch, capsys,
                                                            args, message):
    before = _tree(workdir)
    err = _refused(args, monkeypatch, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], err[-3000:]
    assert _tree(workdir) == before


def test_outputs_in_the_way_is_refused_and_left_alone(workdir, monkeypatch, capsys):
    """The default run dir cannot be made (``outputs`` is a file): one line, nothing
    changed."""
    (workdir / "outputs").write_text("not a directory")
    before = _tree(workdir)
    err = _refused([], monkeypatch, capsys)
    assert err.startswith("error: cannot create run dir outputs/"), err
    assert "Not a directory" in err and _tree(workdir) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="refused only without CUDA")
def test_cuda_without_cuda_leaves_no_run_dir(workdir, monkeypatch, capsys):
    before = _tree(workdir)
    err = _refused(["device=cuda"], monkeypatch, capsys)
    assert "error: ConfigError: device=cuda but CUDA is not available" in err
    assert _tree(workdir) == before and not (workdir / "outputs").exists()


def test_no_empty_dirs_are_left_by_refusals(workdir, monkeypatch, capsys):
    """The reporter's trial: refused runs left 43 empty timestamped dirs."""
    for args, _ in REFUSED[:4]:
        _refused(args, monkeypatch, capsys)
    assert not (workdir / "outputs").exists() and not (workdir / "multirun").exists()
    assert not [p for p in os.scandir(workdir) if p.is_dir() and not any(os.scandir(p.path))
                and p.name != "data"]
