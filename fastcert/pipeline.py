"""One readable path from a composed config to results:

    config → data → model (+ init) → BoundedNet → method → fit (loss, logger) → evaluate

:func:`run` is what ``python -m fastcert.run`` calls; it takes a plain config and a run
directory, so tests and other front ends call it without Hydra's decorator.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from fastcert.bounds import BoundedNet
from fastcert.checkpoint import write_text_atomic
from fastcert.config import (EvalConfig, OptimConfig, ScheduleConfig, check_epochs,
                             check_eps, typed)
from fastcert.data import DataBundle, create_data
from fastcert.devices import acquire_device, release_device
from fastcert.evaluate import EvalResult, evaluate
from fastcert.initializers import initialize
from fastcert.loggers import create_logger
from fastcert.methods import create_method
from fastcert.models import create_model
from fastcert.schedules import EpsSchedule
from fastcert.train import TrainSetup, epoch_times_by_phase, fit, seed_everything

DATA_ONLY_KEYS = ("eps", "eps_max")


def resolve_device(name: str | None, devices=None) -> torch.device:
    """The device of a run: ``cpu`` / ``cuda`` / ``cuda:1`` as given; ``auto`` / ``pool``: a free
    GPU of this node's pool (locked until :func:`fastcert.devices.release_device`), or the CPU."""
    return acquire_device(name, devices)


def run_name(cfg: DictConfig) -> str:
    """A readable name from the choices, e.g. ``fast-cnn7-cifar10-s1``."""
    return f"{cfg.method.name}-{cfg.model.name}-{cfg.data.name}-s{cfg.seed}"


@dataclass
class Built:
    """Everything a run needs, built and checked before the first batch."""

    data: DataBundle
    net: BoundedNet
    method: Any
    schedule: EpsSchedule
    optim: OptimConfig
    eval: EvalConfig
    device: torch.device


def build(cfg: DictConfig, device: torch.device | None = None) -> Built:
    """Validate ``cfg`` and build data, model, bounded network, method and schedule."""
    eps = float(cfg.eps)
    check_eps(eps, float(cfg.data.eps_max))
    sched_cfg = typed(ScheduleConfig, cfg.schedule, "schedule")
    check_epochs(int(cfg.epochs), sched_cfg)
    optim = typed(OptimConfig, cfg.optim, "optim")
    eval_cfg = typed(EvalConfig, cfg.eval, "eval")
    method = create_method(OmegaConf.to_container(cfg.method, resolve=True))
    device = device or resolve_device(cfg.device, cfg.get("devices"))
    threads = int(cfg.get("cpu_threads", 0))  # configs saved before this key existed: torch's default
    if threads > 0:
        torch.set_num_threads(threads)  # process-wide: a run owns its process

    seed_everything(int(cfg.seed))
    data_kwargs = {k: v for k, v in OmegaConf.to_container(cfg.data, resolve=True).items()
                   if k not in DATA_ONLY_KEYS}
    data = create_data(seed=int(cfg.seed), **data_kwargs)
    model_kwargs = OmegaConf.to_container(cfg.model, resolve=True)
    model = create_model(model_kwargs.pop("name"), data.input_shape, data.num_classes,
                         **model_kwargs)
    initialize(model, cfg.init.name, seed=int(cfg.seed))
    model.to(device)
    # two test images to trace the graph (not a whole loader batch: no workers, no 512 images)
    test_set = data.test.dataset
    example = torch.stack([test_set[i][0] for i in range(min(2, len(test_set)))]).to(device)
    net = BoundedNet(model, example, data.num_classes)

    schedule = EpsSchedule(eps_target=eps, steps_per_epoch=len(data.train),
                           **{k: getattr(sched_cfg, k) for k in
                              ("kind", "start", "length", "mid", "exponent")})
    return Built(data, net, method, schedule, optim, eval_cfg, device)


def format_table(results: dict) -> str:
    """The final metrics as a small fixed-width table."""
    rows = [("clean accuracy", results["clean_acc"]), ("PGD accuracy", results["pgd_acc"]),
            ("IBP-verified accuracy", results["ibp_verified_acc"]),
            ("CROWN-verified accuracy", results["crown_verified_acc"])]
    width = max(len(r[0]) for r in rows)
    head = (f"{results['method']} | {results['model']} | {results['data']} | "
            f"eps={results['eps']:.4g} | {results['epochs']} epochs | "
            f"{results['wall_time_s']:.1f}s")
    lines = [head, "-" * len(head)]
    for name, value in rows:
        shown = "skipped" if value is None else f"{100 * value:6.2f} %"
        lines.append(f"{name:<{width}}  {shown}")
    return "\n".join(lines)


def results_dict(cfg: DictConfig, result: EvalResult, history: list[dict],
                 wall_time_s: float) -> dict:
    summary = result.summary()
    return {
        "clean_acc": summary["clean_acc"],
        "pgd_acc": summary["pgd_acc"],
        "ibp_verified_acc": summary.get("ibp_verified_acc"),
        "crown_verified_acc": summary.get("crown_verified_acc"),
        "any_verified_acc": summary.get("any_verified_acc"),
        "eps": float(cfg.eps),
        "epochs": int(cfg.epochs),
        "method": cfg.method.name,
        "model": cfg.model.name,
        "data": cfg.data.name,
        "init": cfg.init.name,
        "seed": int(cfg.seed),
        "n_test": len(result.label),
        "phase_epoch_time_s": epoch_times_by_phase(history),
        "wall_time_s": wall_time_s,
    }


def run(cfg: DictConfig, run_dir: str | os.PathLike, resume: str | os.PathLike | None = None,
        device: torch.device | None = None, group: str | None = None) -> dict:
    """Train and evaluate as ``cfg`` says, writing metrics.jsonl, last.pt and results.json
    into ``run_dir``. ``group`` names the sweep/preset for loggers. Returns the results dict."""
    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    owns_device = device is None
    if owns_device:
        device = resolve_device(cfg.device, cfg.get("devices"))
    try:
        return _run(cfg, run_dir, resume, device, group, t0)
    finally:
        if owns_device:
            release_device()  # a reused worker process's next job may take another GPU


def _run(cfg: DictConfig, run_dir: Path, resume, device: torch.device, group: str | None,
         t0: float) -> dict:
    built = build(cfg, device)
    resume_state = _resume_state(run_dir, resume, built.device)
    logger = create_logger(OmegaConf.to_container(cfg.logger, resolve=True), run_dir=run_dir,
                           run_name=run_name(cfg), config=OmegaConf.to_container(cfg, resolve=True),
                           resume_id=(resume_state or {}).get("logger_run_id"),
                           group_default=group)
    try:
        setup = TrainSetup(
            net=built.net, method=built.method, train_loader=built.data.train,
            box_fn=built.data.eps_box, schedule=built.schedule, optim=built.optim,
            epochs=int(cfg.epochs), seed=int(cfg.seed), device=built.device, run_dir=run_dir,
            logger=logger, log_every=int(cfg.logger.get("log_every", 50) or 0),
            checkpoint_extra=lambda: {"config": OmegaConf.to_container(cfg, resolve=True),
                                      "logger_run_id": logger.run_id})
        history = fit(setup, resume_state=resume_state)
        result = evaluate(built.net, built.data.test, built.data.eps_box, float(cfg.eps),
                          verifiers=built.eval.verifiers, pgd=built.eval.pgd,
                          device=built.device, seed=int(cfg.seed))
        results = results_dict(cfg, result, history, time.perf_counter() - t0)
        write_text_atomic(run_dir / "results.json", json.dumps(results, indent=2) + "\n")
        logger.log_summary(results)
        logger.log_checkpoint(str(run_dir / "last.pt"))
        print(format_table(results), flush=True)
        return results
    finally:
        logger.finish()


def _resume_state(run_dir: Path, resume, device: torch.device) -> dict | None:
    """The checkpoint to continue from. ``resume``: None/false (a fresh run), true (this run
    dir's last.pt) or a path. A fresh run never overwrites a run dir that holds a checkpoint."""
    from fastcert import checkpoint

    if resume in (None, False, "false", "False"):
        if (run_dir / "last.pt").exists():
            raise checkpoint.CheckpointError(
                f"{run_dir} already holds a run (last.pt); nothing was changed. Continue it with "
                f"resume=true, or start a new run in another hydra.run.dir")
        return None
    path = run_dir / "last.pt" if resume in (True, "true", "True") else Path(resume)
    if not path.exists():
        raise checkpoint.CheckpointError(
            f"resume: no checkpoint at {path}. Run with hydra.run.dir=<the old run dir> "
            f"resume=true, or resume=<path to last.pt>")
    return checkpoint.load(path, map_location=device)
