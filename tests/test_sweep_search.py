"""Searches through fastcert's sweeper (hydra/sweeper=fastcert): the search space, the study's
bookkeeping (budget, stale trials, what a job tells), the pareto presets composing real run
configs, early stopping of dominated trials with the test split unread, and real searches on
the digits: a kill and a resume with the trial count continuing, two launchers sharing one
journal file."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from experiments import pareto as P
from fastcert import resolvers
from fastcert.config import ConfigError
from fastcert.pipeline import run
from fastcert.settings import validate
from fastcert.study import open_study, storage_url
from fastcert.sweep import trials as T
from fastcert.sweep.space import Space, SpaceError
from hydra_plugins.fastcert_sweeper.sweeper import FastcertOptunaSweeper

from conftest import ROOT, TINY

METHODS = ("ibp", "fast", "crown_ibp", "sabr", "taps", "staps", "mtl_ibp", "cc_ibp",
           "exp_ibp", "pgd")


# --------------------------------------------------------------------------- the space


def test_hydra_sweeps_become_optuna_distributions():
    space = Space.from_config({"a": "range(1, 10)", "b": "tag(log, interval(1e-5, 0.1))",
                               "c": "choice(adam, adamw)", "d": "range(10, 100, step=10)",
                               "e": "interval(0, 1)", "f": 3, "g": "tag(log, range(1, 64))"},
                              None)
    got = {p.name: p.distribution for p in space.shared}
    assert got["a"] == IntDistribution(1, 10)                   # both ends included
    assert got["b"] == FloatDistribution(1e-5, 0.1, log=True)
    assert got["c"] == CategoricalDistribution(["adam", "adamw"])
    assert got["d"] == IntDistribution(10, 100, step=10)
    assert got["e"] == FloatDistribution(0.0, 1.0)
    assert got["f"] is None and space.shared[5].override() == "f=3"
    assert got["g"] == IntDistribution(1, 64, log=True)
    with pytest.raises(SpaceError, match="x="):
        Space.from_config({"x": "interval(0"}, None)
    with pytest.raises(SpaceError, match="needs a range or an interval"):
        Space.from_config({"x": "tag(log, choice(1, 2))"}, None)


def test_command_line_overrides_fold_into_the_space():
    space = Space.from_config({"lr": "interval(0, 1)", "k": "range(1, 3)"},
                              {"key": "method", "options": {"sabr": {"method.lam": 0.4},
                                                            "fast": {"k": "range(0, 1)"},
                                                            "ibp": {}}})
    fixed = space.apply_command_line(["lr=0.5", "method.lam=interval(0.1,0.2)",
                                      "k=range(5,6)", "epochs=3", "method=sabr,fast"])
    assert fixed == ["lr=0.5", "epochs=3"]
    assert [p.name for p in space.shared] == []                 # lr fixed, k only in branches
    assert list(space.branches) == ["sabr", "fast"]             # the branch key chooses
    (lam,) = space.branches["sabr"]
    assert lam.name == "sabr:method.lam" and lam.distribution == FloatDistribution(0.1, 0.2)
    (k,) = space.branches["fast"]
    assert k.distribution == IntDistribution(5, 6)
    with pytest.raises(SpaceError, match="choose among the branch's options"):
        space.apply_command_line(["method=taps"])


def test_a_branch_samples_the_option_first_then_its_own_parameters():
    space = Space.from_config({"optim.lr": "interval(0.1, 0.2)"},
                              {"key": "method", "options": {
                                  "sabr": {"method.lam": "interval(0.01, 0.5)",
                                           "method.attack.restarts": 1},
                                  "fast": {"method.warmup.lambda0": "interval(0, 1)"}}})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(8):
        trial = study.ask()
        overrides = space.sample(trial)
        method = trial.params["method"]
        seen.add(method)
        assert overrides[1] == f"method={method}"
        own = {k for k in trial.params if ":" in k}
        assert own == ({"sabr:method.lam"} if method == "sabr" else
                       {"fast:method.warmup.lambda0"})
        if method == "sabr":
            assert "method.attack.restarts=1" in overrides
        study.tell(trial, 0.0)
    assert seen == {"sabr", "fast"}


# --------------------------------------------------------------------------- bookkeeping


def test_budget_counts_every_trial_but_the_discarded():
    study = optuna.create_study()
    for state in (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED):
        t = study.ask()
        study.tell(t, 1.0 if state == TrialState.COMPLETE else None, state=state)
    stale = study.ask()
    stale.set_user_attr(T.DISCARDED, "stale")
    study.tell(stale, state=TrialState.FAIL)
    study.ask()                                       # running
    assert len(T.counted(study.trials)) == 4
    extra = study.ask()
    assert T.over_budget(study, extra, 4) and not T.over_budget(study, extra, 5)


def test_stale_trials_are_failed_and_requeued_with_their_checkpoint(tmp_path):
    study = optuna.create_study()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    gone, alive, silent = study.ask(), study.ask(), study.ask()
    for t in (gone, alive, silent):
        T.mark_mine(t, tmp_path / f"trial_{t.number}")
    (tmp_path / "trial_0").mkdir()
    (tmp_path / "trial_0" / "last.pt").write_bytes(b"x")
    gone.set_user_attr(T.PID, dead.pid)
    gone.suggest_float("x", 0, 1)
    silent.set_user_attr(T.HOST, "another-node")
    silent.set_user_attr(T.HEARTBEAT, time.time() - 3600)
    done = T.requeue_stale(study, stale_after_s=600)
    assert [n for n, _ in done] == [0, 2]
    assert "is gone" in done[0][1] and "no heartbeat" in done[1][1]
    states = {t.number: t.state for t in study.trials}
    assert states[0] == states[2] == TrialState.FAIL and states[1] == TrialState.RUNNING
    waiting = [t for t in study.trials if t.state == TrialState.WAITING]
    assert [t.user_attrs[T.REQUEUED_FROM] for t in waiting] == [0, 2]
    assert waiting[0].user_attrs[T.RESUME_FROM] == str(tmp_path / "trial_0" / "last.pt")
    assert T.RESUME_FROM not in waiting[1].user_attrs            # trial_2 wrote no checkpoint
    again = study.ask()                                          # the next ask runs it again
    assert again.number == waiting[0].number and again.suggest_float("x", 0, 1) == \
        gone.params["x"]
    assert len(T.counted(study.trials)) == 3         # trial 1, the two requeued (one asked)


def _job(tmp_path, name, results=None, value=None, error=None):
    run_dir = tmp_path / name
    run_dir.mkdir()
    if results is not None:
        (run_dir / "results.json").write_text(json.dumps(results))
    ret = JobReturn(hydra_cfg=OmegaConf.create({"hydra": {"runtime": {
        "output_dir": str(run_dir)}}}))
    ret.status = JobStatus.FAILED if error else JobStatus.COMPLETED
    ret.return_value = error or value
    return ret


def test_a_job_tells_its_trial_complete_pruned_or_failed(tmp_path):
    sweeper = FastcertOptunaSweeper(study_name="s", direction=["maximize", "maximize"],
                                    constraints={"val_clean_acc": 0.5})
    study = optuna.create_study(directions=["maximize", "maximize"])
    res = {"val_clean_acc": 0.6, "val_any_verified_acc": 0.2, "clean_acc": 0.55,
           "method": "sabr", "pgd_attack": "x"}
    jobs = [_job(tmp_path, "a", res, [0.6, 0.2]),
            _job(tmp_path, "b", {**res, "val_clean_acc": 0.3, "stopped_early": {"epoch": 2}},
                 [0.3, 0.2]),
            _job(tmp_path, "c", None, error=FloatingPointError("loss is nan")),
            _job(tmp_path, "d", res, 0.6)]                      # one value for two objectives
    told = [sweeper._tell(study, study.ask(), j) for j in jobs]
    assert told == ["COMPLETE", "PRUNED", "FAIL", "FAIL"]
    a, b, c, d = study.trials
    assert a.values == [0.6, 0.2] and a.user_attrs[T.METRICS]["clean_acc"] == 0.55
    assert "pgd_attack" not in a.user_attrs[T.METRICS]
    assert a.user_attrs[T.CONSTRAINTS] == pytest.approx([-0.1])
    assert b.user_attrs[T.CONSTRAINTS] == pytest.approx([0.2])  # infeasible
    assert a.user_attrs[T.RUN_DIR] == str(tmp_path / "a")
    assert "loss is nan" in c.user_attrs[T.ERROR]
    assert "2 objective value(s) expected" in d.user_attrs[T.ERROR]


def test_storage_names_and_a_study_of_other_directions(tmp_path):
    assert storage_url("sqlite", tmp_path) == f"sqlite:///{tmp_path / 'study.db'}"
    assert storage_url("journal", tmp_path) == str(tmp_path / "study.journal")
    assert storage_url(str(tmp_path / "x.journal")) == str(tmp_path / "x.journal")
    assert storage_url("sqlite:///rel.db").startswith("sqlite:////")
    assert storage_url(None) is None
    with pytest.raises(ValueError, match="storage=nope"):
        storage_url("nope")
    url = storage_url("journal", tmp_path)
    open_study("s", url, ["maximize"])
    assert open_study("s", url).directions[0].name == "MAXIMIZE"


# --------------------------------------------------------------------------- the presets


def _trial_config(compose, preset: str, extra=(), seed=0, sweeps=()):
    """The run config of one sampled trial of ``preset`` launched with the command line
    ``extra`` + ``sweeps``, as the sweeper composes it."""
    resolvers.register()
    master = compose([f"hparams_search={preset}", *extra], return_hydra_config=True)
    sw = master.hydra.sweeper
    space = Space.from_config(sw.params, sw.branch)
    fixed = space.apply_command_line([*extra, *sweeps])
    study = optuna.create_study(directions=list(sw.direction),
                                sampler=optuna.samplers.RandomSampler(seed=seed))
    trial = study.ask()
    overrides = [*fixed, *space.sample(trial)]
    return master, trial, compose([f"hparams_search={preset}", *overrides])


@pytest.mark.parametrize("method", METHODS)
def test_every_pareto_preset_composes_real_trial_configs(compose, method):
    master, trial, cfg = _trial_config(compose, f"pareto/{method}", ["epochs=40"])
    sw = master.hydra.sweeper
    assert sw._target_.endswith("FastcertOptunaSweeper") and list(sw.direction) == [
        "maximize", "maximize"]
    assert master.optimized_metric == ["val_clean_acc", "val_any_verified_acc"]
    assert sw.study_name == f"pareto-{method}-mlp-digits-0.1"
    s = validate(cfg)                                   # the trial's config is a valid run
    assert cfg.method.name == method and cfg.data.val_size == 0.2
    assert s.eval_eps == pytest.approx(0.1)            # tested at the searched radius
    f = trial.params["search.train_eps_factor"]
    assert s.eps == pytest.approx(0.1 * f) and 1 <= f <= 2
    start, length = trial.params["schedule.start"], trial.params["schedule.length"]
    assert 0 <= start <= 5 and 10 <= length <= 30      # ⌈0.75·40⌉ = 30
    d1, d2 = trial.params["search.lr_decay_1"], trial.params["search.lr_decay_2"]
    assert list(cfg.optim.milestones) == [m for m in (start + length + d1,
                                                      start + length + d1 + d2) if m <= 40]
    assert cfg.optim.name == trial.params["optim"] and cfg.aids.l1 == trial.params["aids.l1"]
    if "method.kappa.start" in trial.params:
        assert cfg.method.kappa.end == pytest.approx(
            trial.params["method.kappa.start"] * trial.params["search.kappa_end_factor"])
    assert cfg.init.name == ("default" if method in ("ibp", "pgd") else "ibp")


def test_the_methods_preset_samples_a_method_then_its_space(compose):
    seen = set()
    for seed in range(6):
        _, trial, cfg = _trial_config(compose, "pareto/methods", seed=seed,
                                      sweeps=["method=sabr,mtl_ibp"])
        method = trial.params["method"]
        seen.add(method)
        validate(cfg)
        assert cfg.method.name == method
        assert {k.split(":")[0] for k in trial.params if ":" in k} == {method}
        if method == "sabr":
            assert cfg.method.lam == trial.params["sabr:method.lam"]
        else:
            assert cfg.method.alpha == trial.params["mtl_ibp:method.alpha"]
    assert seen == {"sabr", "mtl_ibp"}


# --------------------------------------------------------------------------- early stopping


def _study_with(url, values):
    study = open_study("s", url, ["maximize", "maximize"])
    study.add_trial(optuna.trial.create_trial(values=list(values)))
    return study


STOP = [*TINY, "epochs=3", "schedule.start=0", "schedule.length=1", "data.val_size=40",
        "eval.verifiers=[ibp]", "optimized_metric=[val_clean_acc,val_ibp_verified_acc]",
        "search.study=s", "search.stop_dominated=1", "search.stop_margin=0.0"]


def test_a_dominated_trial_stops_at_the_end_of_the_ramp_without_reading_the_test_set(
        compose, tmp_path, loader_watch):
    url = storage_url("sqlite", tmp_path)
    _study_with(url, [1.0, 1.0])                  # a finished trial no run can reach
    results = run(compose([*STOP, f"search.storage='{url}'"]), tmp_path / "run")
    assert loader_watch.passes() == ["val", "fit"]   # the ramp's end; the test set never
    stop = results["stopped_early"]
    assert stop["epoch"] == 1 and stop["dominated_by"] == [0] and stop["needed"] == 1
    assert "clean_acc" not in results and results["n_val"] == 40
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["stopped_early"] == stop
    assert [json.loads(x)["epoch"] for x in (tmp_path / "run" / "metrics.jsonl").read_text()
            .splitlines()] == [1]


def test_a_trial_that_is_not_dominated_trains_on_and_reads_the_test_set_last(
        compose, tmp_path, loader_watch):
    url = storage_url("sqlite", tmp_path)
    _study_with(url, [0.0, 0.0])                  # dominates nothing
    results = run(compose([*STOP, f"search.storage='{url}'"]), tmp_path / "run")
    assert loader_watch.passes() == ["val", "fit", "val", "test"]
    assert "stopped_early" not in results and results["epochs"] == 3


@pytest.mark.parametrize("extra,message", [
    (["search.storage=null"], "run it through a search"),
    (["search.storage=x.db", "optimized_metric=[clean_acc,ibp_verified_acc]"],
     "objectives on the validation split"),
    (["search.storage=x.db", "search.stop_margin=-1"], "must be >= 0"),
])
def test_early_stopping_needs_a_study_and_validation_objectives(compose, extra, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose([*STOP, *extra]))


# --------------------------------------------------------------------------- real searches

SEARCH = ["hparams_search=pareto/methods", "method=fast,sabr", "device=cpu",
          "data.limit_train=96", "data.limit_test=48", "model.widths=[16,16]",
          "eval.verifiers=[ibp]", "eval.pgd.steps=2", "hydra.sweeper.n_jobs=1",
          "hydra/sweeper/optuna_sampler=random", "hydra.sweeper.sampler.seed=0",
          "schedule.start=range(0,1)", "schedule.length=range(1,2)",
          "search.lr_decay_1=range(0,1)", "search.lr_decay_2=range(0,1)"]


def _env(tmp_path):
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", WANDB_MODE="disabled",
                HYDRA_FULL_ERROR="1", FASTCERT_LOCK_DIR=str(tmp_path / "locks"),
                PYTHONPATH=str(ROOT))


def _search(args, tmp_path, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "fastcert.run", *args], cwd=ROOT,
                            env=_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def _wait_for(path: Path, proc, timeout=240):
    t0 = time.time()
    while not path.is_file():
        assert proc.poll() is None, proc.stdout.read()[-4000:]
        assert time.time() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.05)


def test_a_killed_search_resumes_with_the_trial_count_continuing(tmp_path):
    """Acceptance: two methods × 4 trials on the digits; the sweep is SIGKILLed while trial 1
    trains; the same command again fails trial 1 as stale, runs its configuration again from
    its last.pt as trial 2 and tops the study up to 4 counted trials (numbers 0, 2, 3, 4);
    experiments.pareto then reads the sweep dir."""
    sweep = tmp_path / "sweep"
    args = [*SEARCH, "epochs=15", "hydra.sweeper.n_trials=4", f"hydra.sweep.dir={sweep}"]
    first = _search(args, tmp_path)
    _wait_for(sweep / "trial_1" / "last.pt", first)     # written atomically after an epoch
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    url = storage_url("sqlite", sweep)
    name = "pareto-methods-mlp-digits-0.1"
    killed = {t.number: t.state for t in open_study(name, url).trials}
    assert killed == {0: TrialState.COMPLETE, 1: TrialState.RUNNING}

    second = _search(args, tmp_path)
    out, _ = second.communicate(timeout=600)
    assert second.returncode == 0, out[-5000:]
    assert "trial 1 was left running" in out
    study = open_study(name, url)
    trials = {t.number: t for t in study.trials}
    assert sorted(trials) == [0, 1, 2, 3, 4]
    assert trials[1].state == TrialState.FAIL and "stale" in trials[1].user_attrs[T.DISCARDED]
    assert trials[2].user_attrs[T.REQUEUED_FROM] == 1 and trials[2].params == trials[1].params
    assert [n for n, t in trials.items() if t.state == TrialState.COMPLETE] == [0, 2, 3, 4]
    resumed = json.loads((sweep / "trial_2" / "results.json").read_text())
    assert resumed["resumed"][-1]["from_epoch"] >= 1       # continued trial 1's last.pt
    methods = set()
    for n in (0, 2, 3, 4):
        cfg = OmegaConf.load(sweep / f"trial_{n}" / ".hydra" / "config.yaml")
        assert cfg.search.trial == n and cfg.search.study == name
        assert cfg.method.name == trials[n].params["method"]
        res = json.loads((sweep / f"trial_{n}" / "results.json").read_text())
        assert trials[n].values == [res["val_clean_acc"], res["val_any_verified_acc"]]
        methods.add(cfg.method.name)
    assert methods <= {"fast", "sabr"}
    assert (sweep / "front.md").is_file() and (sweep / "front.png").is_file()
    points = P.load_points([str(sweep)])
    assert sorted(p.number for p in points) == [0, 2, 3, 4]
    assert {p.method for p in points} == methods


@pytest.mark.slow
def test_two_launchers_share_one_journal_study(tmp_path):
    """Several launchers (nodes) on one journal file: together they run n_trials trials, each
    number once, and both exit cleanly."""
    journal = tmp_path / "shared" / "study.journal"
    procs = [_search([*SEARCH, "epochs=2", "hydra.sweeper.n_trials=4",
                      f"hydra.sweeper.storage={journal}", "hydra.sweeper.sampler.seed=null",
                      f"hydra.sweep.dir={tmp_path / f'launcher{i}'}"], tmp_path)
             for i in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out[-5000:]
    study = open_study("pareto-methods-mlp-digits-0.1", str(journal))
    counted = T.counted(study.trials)
    assert len(counted) == 4 and all(t.state == TrialState.COMPLETE for t in counted)
    assert len({t.number for t in study.trials}) == len(study.trials)
    dirs = {p.parent.name for p in tmp_path.glob("launcher*/trial_*/results.json")}
    assert dirs == {f"trial_{t.number}" for t in counted}
