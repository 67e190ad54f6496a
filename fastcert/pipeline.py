"""One readable path from a composed config to results:

    config → data → model (+ init) → BoundedNet → method → fit (loss, logger) → evaluate

:func:`run` is what ``python -m fastcert.run`` calls; it takes a plain config and a run
directory, so tests and other front ends call it without Hydra's decorator.
"""
from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from fastcert.bounds import BoundedNet
from fastcert.checkpoint import write_text_atomic
from fastcert.config import (CONF_DIR, ConfigError, check_keys, check_node, coerce, instantiate,
                             parse_number)
from fastcert.data import DataBundle
from fastcert.devices import acquire_device, release_device
from fastcert.evaluate import EvalConfig, EvalResult, evaluate
from fastcert.methods import Method
from fastcert.optim import Optimizer
from fastcert.schedules import EpsSchedule
from fastcert.tightness import TightnessProbe
from fastcert.train import TrainSetup, epoch_times_by_phase, fit, seed_everything

#: What the code supplies to each group's target (not settable from the config).
RUNTIME = {
    "model": ("input_shape", "num_classes"),
    "schedule": ("eps_target", "steps_per_epoch"),
    "logger": ("run_dir", "run_name", "config", "resume_id", "group_default"),
}


def resolve_device(name: str | None, devices=None) -> torch.device:
    """The device of a run: ``cpu`` / ``cuda`` / ``cuda:1`` as given; ``auto`` / ``pool``: a free
    GPU of this node's pool (locked until :func:`fastcert.devices.release_device`), or the CPU."""
    return acquire_device(name, devices)


def run_name(cfg: DictConfig) -> str:
    """A readable name from the choices, e.g. ``fast-cnn7-cifar10-s1``."""
    return f"{cfg.method.name}-{cfg.model.name}-{cfg.data.name}-s{cfg.seed}"


def top_level_keys() -> list[str]:
    """The keys a run config may have: conf/config.yaml's own keys and its groups."""
    primary = OmegaConf.load(CONF_DIR / "config.yaml")
    groups = [next(iter(d)) for d in primary.defaults if isinstance(d, DictConfig)]
    return sorted({k for k in primary if k not in ("defaults", "hydra")} |
                  {g for g in groups if not g.startswith(("hydra", "experiment", "debug",
                                                           "hparams_search"))})


def check_eps(eps: float, eps_max: float, key: str = "eps") -> None:
    """ε must lie in [0, eps_max], eps_max being the data range in pixel units."""
    if eps < 0:
        raise ConfigError(f"{key}={eps}: the perturbation radius must be >= 0 (pixel units)")
    if eps > eps_max:
        raise ConfigError(f"{key}={eps} exceeds the data range [0, {eps_max}]: every input "
                          f"would be perturbable to every other; use {key} <= {eps_max}")


def check_epochs(epochs: int, start: int, length: int) -> None:
    if epochs < 1:
        raise ConfigError(f"epochs={epochs}: train for at least one epoch")
    if epochs < start + length:
        warnings.warn(f"epochs={epochs} is shorter than the warmup ({start}+{length} epochs): "
                      f"eps_target is never reached during training", stacklevel=2)


@dataclass
class Settings:
    """The run's checked top-level values and the small objects built from its config."""

    seed: int
    epochs: int
    eps: float          # training radius (pixel units)
    eval_eps: float     # test radius
    method: Method
    optim: Optimizer
    eval: EvalConfig
    data: Any           # a fastcert.data.DataSource
    init: Any           # a fastcert.initializers.Init


def validate(cfg: DictConfig) -> Settings:
    """Every check that needs no data or model: unknown keys anywhere (top level included),
    each value against its type, ε against the data range, the epochs against the warmup."""
    check_keys([k for k in cfg if k != "hydra"], top_level_keys(), "top-level")
    seed = coerce(cfg.seed, int, "seed")
    epochs = coerce(cfg.epochs, int, "epochs")
    threads = coerce(cfg.get("cpu_threads", 0), int, "cpu_threads")
    if threads < 0:
        raise ConfigError(f"cpu_threads={threads}: use 0 (torch's default) or a positive count")
    data = instantiate(cfg.data, "data")
    eps = parse_number(cfg.eps, "eps")
    check_eps(eps, data.eps_max)
    eval_cfg = instantiate(cfg.eval, "eval")
    eval_eps = eps if eval_cfg.eps is None else eval_cfg.eps
    check_eps(eval_eps, data.eps_max, "eval.eps")
    for group, runtime in RUNTIME.items():
        check_node(cfg[group], group, runtime)
    sched = check_node(cfg.schedule, "schedule", RUNTIME["schedule"])
    check_epochs(epochs, sched.get("start", 0), sched.get("length", 0))
    return Settings(seed=seed, epochs=epochs, eps=eps, eval_eps=eval_eps,
                    method=instantiate(cfg.method, "method"),
                    optim=instantiate(cfg.optim, "optim"), eval=eval_cfg, data=data,
                    init=instantiate(cfg.init, "init"))


@dataclass
class Built:
    """Everything a run needs, built and checked before the first batch."""

    settings: Settings
    data: DataBundle
    net: BoundedNet
    schedule: EpsSchedule
    device: torch.device

    @property
    def method(self) -> Method:
        return self.settings.method


def build(cfg: DictConfig, device: torch.device | None = None) -> Built:
    """Validate ``cfg`` and build data, model, bounded network, method and schedule."""
    s = validate(cfg)
    device = device or resolve_device(cfg.device, cfg.get("devices"))
    threads = int(cfg.get("cpu_threads", 0))  # configs saved before this key existed: torch's default
    if threads > 0:
        torch.set_num_threads(threads)  # process-wide: a run owns its process

    seed_everything(s.seed)
    data = s.data.load(seed=s.seed)
    model = instantiate(cfg.model, "model", input_shape=data.input_shape,
                        num_classes=data.num_classes)
    s.init(model, seed=s.seed)
    model.to(device)
    # two test images to trace the graph (not a whole loader batch: no workers, no 512 images)
    test_set = data.test.dataset
    example = torch.stack([test_set[i][0] for i in range(min(2, len(test_set)))]).to(device)
    net = BoundedNet(model, example, data.num_classes)
    schedule = instantiate(cfg.schedule, "schedule", eps_target=s.eps,
                           steps_per_epoch=len(data.train))
    return Built(s, data, net, schedule, device)


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
        "eps": result.eps,
        "train_eps": parse_number(cfg.eps, "eps"),
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
    logger = instantiate(cfg.logger, "logger", run_dir=run_dir, run_name=run_name(cfg),
                         config=OmegaConf.to_container(cfg, resolve=True),
                         resume_id=(resume_state or {}).get("logger_run_id"),
                         group_default=group)
    try:
        setup = TrainSetup(
            net=built.net, method=built.method, train_loader=built.data.train,
            box_fn=built.data.eps_box, schedule=built.schedule, optim=built.settings.optim,
            epochs=built.settings.epochs, seed=built.settings.seed, device=built.device,
            run_dir=run_dir, logger=logger,
            checkpoint_extra=lambda: {"config": OmegaConf.to_container(cfg, resolve=True),
                                      "logger_run_id": logger.run_id},
            epoch_metrics=tightness_probe(built))
        history = fit(setup, resume_state=resume_state)
        ev = built.settings.eval
        result = evaluate(built.net, built.data.test, built.data.eps_box, built.settings.eval_eps,
                          verifiers=ev.bounds, pgd=ev.pgd, device=built.device,
                          seed=built.settings.seed)
        results = results_dict(cfg, result, history, time.perf_counter() - t0)
        write_text_atomic(run_dir / "results.json", json.dumps(results, indent=2) + "\n")
        logger.log_summary(results)
        logger.log_checkpoint(str(run_dir / "last.pt"))
        print(format_table(results), flush=True)
        return results
    finally:
        logger.finish()


#: Test examples on which the propagation tightness is measured after each epoch.
TIGHTNESS_EXAMPLES = 64


def tightness_probe(built: Built) -> TightnessProbe:
    """Propagation tightness (Mao et al. 2024) after each epoch, on the first
    :data:`TIGHTNESS_EXAMPLES` test examples at the training radius."""
    test_set = built.data.test.dataset
    n = min(TIGHTNESS_EXAMPLES, len(test_set))
    x = torch.stack([test_set[i][0] for i in range(n)]).to(built.device)
    y = torch.tensor([int(test_set[i][1]) for i in range(n)], device=built.device)
    return TightnessProbe(x, y, *built.data.eps_box(x, built.settings.eps))


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
