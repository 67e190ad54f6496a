"""``fastcert-train [overrides]`` (or ``python -m fastcert.run``): train and certify one model
(a Hydra app).

With no overrides it runs the embedded default (digits, IBP, ε=0.1) on the CPU. ``-m``
sweeps, e.g. ``python -m fastcert.run -m method=ibp,fast seed=0,1,2``.

Before Hydra starts, the command line and every job's config are checked and the output dir
is claimed (:mod:`fastcert.preflight`): a mistake prints one line and exits with status 2
having written nothing; two launches in the same second get two dirs. The run dir is printed
at the start and the end. Hydra's ``.hydra/`` (config.yaml, hydra.yaml, overrides.yaml) is
written by this app, not by Hydra (``hydra.output_subdir: null``), and only for a fresh start
(or a requeued trial of a search continuing another dir's checkpoint) that was accepted: a
refused run (its dir holds a checkpoint) or a resume leaves the config that trained the
checkpoint in place. SIGTERM / SIGINT stop the run cleanly (the last
checkpoint stays, W&B marks the run preempting) with status 128 + the signal's number.
"""
from __future__ import annotations

from fastcert import resolvers
from fastcert.cli import RUN_STOPPED, exit_on_known_errors, preemptible, quiet_known_warnings

quiet_known_warnings()
resolvers.register()  # also in a joblib worker, which imports this module to run a job

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from fastcert import distributed, preflight, rundir  # noqa: E402
from fastcert.pipeline import run  # noqa: E402
from fastcert.settings import objective_metrics  # noqa: E402

HYDRA_DIR = ".hydra"


def write_hydra_dir(run_dir: Path, cfg: DictConfig) -> None:
    """The three files Hydra writes into ``<run dir>/.hydra`` at launch."""
    hydra_cfg = HydraConfig.get()
    out = run_dir / HYDRA_DIR
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    (out / "hydra.yaml").write_text(OmegaConf.to_yaml({"hydra": hydra_cfg}))
    (out / "overrides.yaml").write_text(OmegaConf.to_yaml(hydra_cfg.overrides.task))


def experiment_name(choices) -> str | None:
    """The preset a run was launched with (its W&B group by default), e.g. ``shi2021/table4/row3``
    from ``experiment=shi2021/table4/row3`` or from ``+experiment/shi2021/table4=row3``, the form
    a sweep over a folder of presets takes (``-m '+experiment/shi2021/table4=glob(*)'``)."""
    if choices.get("experiment"):
        return choices["experiment"]
    return next((f"{group.removeprefix('experiment/')}/{option}"
                 for group, option in choices.items()
                 if group.startswith("experiment/") and option), None)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig):
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    print(f"run dir: {run_dir}", flush=True)
    try:
        with exit_on_known_errors(RUN_STOPPED), preemptible():
            ctx = distributed.current()
            # a fresh start (or a requeued trial of a search continuing another dir's
            # checkpoint) writes .hydra/ once accepted; under torchrun rank 0 alone
            writes = ctx is None or ctx.main
            group = OmegaConf.select(cfg, "search.study") or experiment_name(
                hydra_cfg.runtime.choices)
            results = run(cfg, run_dir, group=group,
                          started=(lambda: write_hydra_dir(run_dir, cfg)) if writes else None)
    finally:
        print(f"run dir: {run_dir}", flush=True)
    objective = cfg.get("optimized_metric")
    if objective is None:
        return None
    values = [results[m] for m in objective_metrics(objective)]
    return values[0] if isinstance(objective, str) else values


def _join_torchrun() -> None:
    """Under ``torchrun``: join the process group before the run dir is claimed (rank 0
    claims it and the other ranks take it); ranks > 0 leave Hydra's own files (.hydra/, log
    lines) to rank 0."""
    ctx = distributed.init_from_env()
    if ctx is not None and not ctx.main:
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=disabled"]


def cli() -> None:
    """``fastcert-train`` (the console script) and ``python -m fastcert.run``: the command
    line checked and the output dir claimed before Hydra starts
    (:func:`fastcert.preflight.prepare`), then the Hydra app. A job refused after that (e.g.
    missing data) leaves none of the directories the check created."""
    _join_torchrun()
    try:
        with exit_on_known_errors(RUN_STOPPED), preemptible():
            prepared = preflight.prepare(sys.argv[1:])
        sys.argv[1:] = prepared.argv
        try:
            main()
        except SystemExit as e:
            if e.code == 2:
                rundir.release(prepared.created)
            raise
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    cli()
