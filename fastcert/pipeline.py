"""One readable path from a composed config to results:

    config → data → model (+ init) → BoundedNet → method → fit (loss, logger) → evaluate

:func:`run` is what ``python -m fastcert.run`` calls; it takes a plain config and a run
directory, so tests and other front ends call it without Hydra's decorator.

A run directory holds one run. A fresh run refuses a directory that holds a checkpoint; a
resumed run (``resume.checkpoint=last`` or a path) refuses a config that differs from the
checkpoint's in what it trains (:data:`RESUME_GUARDED`), listing the differences, unless
``resume.allow_changes=true`` (then the differences are recorded in results.json).
"""
from __future__ import annotations

import json
import os
import time
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from omegaconf import DictConfig, OmegaConf

from fastcert import distributed, memory
from fastcert.bounds import BoundedNet
from fastcert.checkpoint import write_text_atomic
from fastcert.config import (CONF_DIR, ConfigError, check_keys, check_node, coerce, instantiate,
                             parse_number)
from fastcert.data import DataBundle
from fastcert.devices import acquire_device, release_device
from fastcert.evaluate import EvalConfig, EvalResult, SoundnessError, evaluate
from fastcert.loggers import NullLogger
from fastcert.methods import Method
from fastcert.optim import Optimizer
from fastcert.schedules import EpsSchedule
from fastcert.tightness import TightnessProbe
from fastcert.train import TrainSetup, epoch_times_by_phase, fit, read_metrics, seed_everything

#: What the code supplies to each group's target (not settable from the config).
RUNTIME = {
    "model": ("input_shape", "num_classes"),
    "schedule": ("eps_target", "steps_per_epoch"),
    "logger": ("run_dir", "run_name", "config", "resume_id", "group_default", "steps_per_epoch"),
}

#: What a resumed run may not change without ``resume.allow_changes=true``: what is trained.
RESUME_GUARDED = ("model", "data", "method", "seed", "eps", "schedule", "optim")
#: Keys inside :data:`RESUME_GUARDED` that say only where data lives or how it is tested.
RESUME_FREE = ("data.root", "data.download", "data.num_workers", "data.test_batch_size",
               "data.limit_test", "data.on_device", "data.source.root", "data.source.download",
               "data.source.num_workers")
#: The keys of the ``resume`` node.
RESUME_KEYS = ("checkpoint", "allow_changes")


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
    speed: "Speed"


@dataclass(frozen=True)
class Speed:
    """How this machine runs the training (top-level keys; none changes what is computed)."""

    nproc: int = 1                           # data-parallel processes of the run
    keep_freed_memory: bool = True           # CPU: glibc keeps freed memory (fastcert.memory)
    channels_last: Literal["auto"] | bool = "auto"  # auto: on CUDA
    cudnn_benchmark: bool = True             # CUDA: cuDNN picks the fastest convolution


def speed_settings(cfg: DictConfig) -> Speed:
    """The checked :class:`Speed` keys of ``cfg`` (a config saved before a key existed gets
    its default). ``nproc`` under torchrun must be 1 or torchrun's process count."""
    hints = typing.get_type_hints(Speed)
    speed = Speed(**{key: coerce(cfg[key], hints[key], key) for key in hints if key in cfg})
    if speed.nproc < 1:
        raise ConfigError(f"nproc={speed.nproc}: use 1 (one process) or more")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and speed.nproc not in (1, world):
        raise ConfigError(f"nproc={speed.nproc} under torchrun with {world} processes: "
                          f"torchrun already runs the ranks; drop nproc (or nproc={world})")
    return speed


def validate(cfg: DictConfig) -> Settings:
    """Every check that needs no data or model: unknown keys anywhere (top level included),
    each value against its type, ε against the data range, the epochs against the warmup."""
    check_keys([k for k in cfg if k != "hydra"], top_level_keys(), "top-level")
    resume_options(cfg)
    seed = coerce(cfg.seed, int, "seed")
    epochs = coerce(cfg.epochs, int, "epochs")
    threads = coerce(cfg.get("cpu_threads", 0), int, "cpu_threads")
    if threads < 0:
        raise ConfigError(f"cpu_threads={threads}: use 0 (torch's default) or a positive count")
    speed = speed_settings(cfg)
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
                    init=instantiate(cfg.init, "init"), speed=speed)


@dataclass
class Built:
    """Everything a run needs, built and checked before the first batch."""

    settings: Settings
    data: DataBundle
    net: BoundedNet
    schedule: EpsSchedule
    device: torch.device
    channels_last: bool = False

    @property
    def method(self) -> Method:
        return self.settings.method


def build(cfg: DictConfig, device: torch.device | None = None) -> Built:
    """Validate ``cfg`` and build data, model, bounded network, method and schedule (in a
    data-parallel rank: this rank's shard of the data, BatchNorm on global statistics)."""
    s = validate(cfg)
    ctx = distributed.current()
    device = device or (ctx.device if ctx else resolve_device(cfg.device, cfg.get("devices")))
    set_process(cfg, s.speed, device)
    channels_last = (device.type == "cuda" if s.speed.channels_last == "auto"
                     else s.speed.channels_last)
    memory_format = torch.channels_last if channels_last else torch.preserve_format

    seed_everything(s.seed)
    data = s.data.load(seed=s.seed, device=device, shard=ctx.shard if ctx else None)
    model = instantiate(cfg.model, "model", input_shape=data.input_shape,
                        num_classes=data.num_classes)
    s.init(model, seed=s.seed)
    model.to(device, memory_format=memory_format)
    if ctx is not None:
        distributed.sync_batchnorm(model)
    # two test images to trace the graph (not a whole loader batch: no workers, no 512 images)
    test_set = data.test.dataset
    example = torch.stack([test_set[i][0] for i in range(min(2, len(test_set)))])
    net = BoundedNet(model, example.to(device, memory_format=memory_format), data.num_classes)
    schedule = instantiate(cfg.schedule, "schedule", eps_target=s.eps,
                           steps_per_epoch=len(data.train))
    return Built(s, data, net, schedule, device, channels_last)


def set_process(cfg: DictConfig, speed: Speed, device: torch.device) -> None:
    """Process-wide settings of a run (a run owns its process): torch's CPU threads
    (``cpu_threads``; 0 or absent: torch's default), the allocator on CPU
    (``keep_freed_memory``) and cuDNN's autotuner on CUDA (``cudnn_benchmark``)."""
    threads = int(cfg.get("cpu_threads", 0))
    if threads > 0:
        torch.set_num_threads(threads)
    if device.type == "cpu" and speed.keep_freed_memory:
        memory.keep_freed_memory()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = speed.cudnn_benchmark


def resume_options(cfg: DictConfig) -> tuple[str | None, bool]:
    """``resume.checkpoint`` (null: a fresh run; ``last``: the run dir's last.pt; or a path)
    and ``resume.allow_changes``, checked."""
    node = cfg.get("resume")
    if node is None:
        return None, False
    if not isinstance(node, DictConfig):
        raise ConfigError(f"resume={node}: resume is a group of keys; continue a run with "
                          f"resume.checkpoint=last (this run dir's last.pt) or "
                          f"resume.checkpoint=PATH")
    check_keys(list(node), RESUME_KEYS, "resume")
    checkpoint = node.get("checkpoint")
    return (None if checkpoint is None else str(checkpoint),
            coerce(node.get("allow_changes", False), bool, "resume.allow_changes"))


def _flat(node: Any, prefix: str) -> dict[str, Any]:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            out.update(_flat(v, f"{prefix}.{k}"))
        return out
    return {prefix: node}


def config_changes(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    """``{key: (old, new)}`` for the keys of :data:`RESUME_GUARDED` (but not
    :data:`RESUME_FREE`) where two resolved run configs differ."""
    a, b = {}, {}
    for key in RESUME_GUARDED:
        a.update(_flat(old.get(key), key))
        b.update(_flat(new.get(key), key))
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and k not in RESUME_FREE}


def format_table(results: dict) -> str:
    """The final metrics as a small fixed-width table."""
    rows = [("clean accuracy", results["clean_acc"]),
            ("PGD accuracy (cheap attack)", results["pgd_acc"]),
            ("IBP-verified accuracy", results["ibp_verified_acc"]),
            ("CROWN-verified accuracy", results["crown_verified_acc"]),
            ("verified by any", results["any_verified_acc"])]
    rows += [(f"{k[:-len('_verified_acc')]}-verified accuracy", v) for k, v in results.items()
             if k.endswith("_verified_acc") and k not in
             ("ibp_verified_acc", "crown_verified_acc", "any_verified_acc")]
    width = max(len(r[0]) for r in rows)
    head = (f"{results['method']} | {results['model']} | {results['data']} | "
            f"eps={results['eps']:.4g} | {results['n_test']} test examples | "
            f"{results['epochs']} epochs | {results['wall_time_s']:.1f}s")
    lines = [head, "-" * len(head)]
    for name, value in rows:
        shown = "skipped" if value is None else f"{100 * value:6.2f} %"
        lines.append(f"{name:<{width}}  {shown}")
    lines.append(f"(attack: {results['pgd_attack']}; python -m fastcert.certify runs a "
                 f"strong attack and the verifier cascade)")
    violations = results["soundness"]["violations"]
    if violations:
        lines.append(f"SOUNDNESS VIOLATIONS: {len(violations)} (see results.json)")
    return "\n".join(lines)


def results_dict(cfg: DictConfig, result: EvalResult, history: list[dict],
                 wall_time_s: float, pgd_attack: str = "") -> dict:
    summary = result.summary()
    return {
        "clean_acc": summary["clean_acc"],
        "pgd_acc": summary["pgd_acc"],
        "pgd_attack": pgd_attack,
        "ibp_verified_acc": summary.get("ibp_verified_acc"),
        "crown_verified_acc": summary.get("crown_verified_acc"),
        **{k: v for k, v in summary.items() if k.endswith("_verified_acc")
           and k not in ("ibp_verified_acc", "crown_verified_acc", "any_verified_acc")},
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
        "soundness": {"violations": result.violations, "ties": result.ties,
                      "tie_tolerance": "1e-5 * max(1, max_k |f_k(x)|)"},
    }


def run(cfg: DictConfig, run_dir: str | os.PathLike,
        resume: str | os.PathLike | bool | None = None, device: torch.device | None = None,
        group: str | None = None, started=None) -> dict:
    """Train and evaluate as ``cfg`` says, writing metrics.jsonl, last.pt and results.json
    into ``run_dir``. ``resume``: where to continue from (True / ``"last"``: the run dir's
    last.pt; a path), default ``cfg.resume.checkpoint``. ``group`` names the sweep/preset for
    loggers. ``started()`` is called once the config, the run dir and the resume are checked,
    before anything is written. Returns the results dict. With ``nproc`` > 1 (outside
    torchrun) it spawns that many data-parallel ranks on devices of the pool
    (:func:`run_parallel`).

    A soundness violation in the final evaluation is recorded in results.json, which is
    written, and then raised (:class:`fastcert.evaluate.SoundnessError`)."""
    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    nproc = speed_settings(cfg).nproc
    if nproc > 1 and distributed.current() is None:
        return run_parallel(cfg, run_dir, nproc, resume, group, started)
    ctx = distributed.current()
    owns_device = device is None and ctx is None
    if ctx is not None:
        device = device or ctx.device
    elif owns_device:
        device = resolve_device(cfg.device, cfg.get("devices"))
    try:
        return _run(cfg, run_dir, resume, device, group, t0, started)
    finally:
        if owns_device:
            release_device()  # a reused worker process's next job may take another GPU


def run_parallel(cfg: DictConfig, run_dir: Path, nproc: int, resume=None,
                 group: str | None = None, started=None) -> dict:
    """``nproc`` data-parallel ranks of one run, spawned here on ``nproc`` devices leased
    together from the pool (fastcert.devices; the CPU, with gloo, without CUDA); rank 0's
    results."""
    from fastcert.devices import acquire_devices, release_device

    # what the ranks would refuse, refused here with its own error (a rank's error reaches
    # this process only as a ProcessRaisedException): the config, the run dir, the resume
    settings = validate(cfg)
    check_parallel(settings, nproc)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    _check_resume(cfg, resolved, run_dir, resume, torch.device("cpu"))
    if started is not None:
        started()
    devices = acquire_devices(cfg.device, cfg.get("devices"), nproc)
    results_path = run_dir / "results.json"
    t_spawn = time.time()
    try:
        distributed.spawn(_rank_run, (resolved, str(run_dir), resume, group), devices)
    except Exception:
        # a soundness violation: rank 0 wrote results.json with it, then the ranks raised
        if results_path.is_file() and results_path.stat().st_mtime >= t_spawn:
            written = json.loads(results_path.read_text())
            violations = written.get("soundness", {}).get("violations")
            if violations:
                raise SoundnessError(f"{len(violations)} soundness violation(s) recorded in "
                                     f"{results_path}; e.g. {violations[0]}") from None
        raise
    finally:
        release_device()
    return json.loads(results_path.read_text())


def _rank_run(ctx, cfg: dict, run_dir: str, resume, group) -> None:
    run(OmegaConf.create(cfg), run_dir, resume, ctx.device, group)


def _check_resume(cfg: DictConfig, resolved: dict, run_dir: Path, resume, device):
    """The checkpoint to continue from, checked: (state or None, the ``resumed`` record, the
    metrics up to it, the wall time it had used). A fresh run into a run dir holding a
    checkpoint, or a resume whose config differs from the checkpoint's in what it trains
    (:data:`RESUME_GUARDED`) without ``resume.allow_changes``, is refused (ConfigError)."""
    checkpoint, allow_changes = resume_options(cfg)
    state = _resume_state(run_dir, checkpoint if resume is None else resume, device)
    if state is None:
        return None, None, [], 0.0
    changes = config_changes(state.get("config") or {}, resolved)
    if changes and not allow_changes:
        raise ConfigError(
            f"resume: this config differs from the one that trained the checkpoint (epoch "
            f"{state['epoch']}) in what it trains:\n"
            + "\n".join(f"  {k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())
            + "\nResuming would mix two runs. Start the new config in another "
              "hydra.run.dir, or force it with resume.allow_changes=true (recorded in "
              "results.json)")
    resumed = {"from_epoch": int(state["epoch"]),
               "changes": {k: list(v) for k, v in changes.items()}}
    history = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["epoch"] <= state["epoch"]]
    previous_wall = float(state.get("wall_time_s", sum(r["epoch_time_s"] for r in history)))
    return state, resumed, history, previous_wall


def check_parallel(settings: Settings, world: int) -> None:
    """What a data-parallel run of ``world`` ranks cannot do: split its share of a batch into
    gradient-accumulation chunks (the ranks' shares differ by up to one example, so their
    chunk counts, hence their BatchNorm all-reduces, could differ)."""
    if world > 1 and settings.optim.grad_acc_steps > 1:
        raise ConfigError(
            f"optim.grad_acc_steps={settings.optim.grad_acc_steps} with {world} data-parallel "
            f"ranks: the ranks already split each batch (memory per rank falls {world}-fold); "
            f"set optim.grad_acc_steps=1")


def _run(cfg: DictConfig, run_dir: Path, resume, device: torch.device, group: str | None,
         t0: float, started) -> dict:
    settings = validate(cfg)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resume_state, resumed, history, previous_wall = _check_resume(cfg, resolved, run_dir, resume,
                                                                  device)
    ctx = distributed.current()
    if ctx is not None:
        check_parallel(settings, ctx.world)
    if started is not None:
        started()
    run_dir.mkdir(parents=True, exist_ok=True)
    built = build(cfg, device)
    main = ctx is None or ctx.main
    if ctx is not None:
        distributed.barrier()  # every rank checked the run dir before rank 0 writes to it
    logger = instantiate(cfg.logger, "logger", run_dir=run_dir, run_name=run_name(cfg),
                         config=resolved,
                         resume_id=(resume_state or {}).get("logger_run_id"),
                         group_default=group,
                         steps_per_epoch=len(built.data.train)) if main else (
        # rank 0's cadence, so that every rank runs the same steps (the same collectives)
        NullLogger(log_every=int(cfg.logger.get("log_every") or 0)))
    try:
        if resume_state is not None:
            for record in history:  # what a killed process may not have sent
                logger.log_epoch(record, record["epoch"])
        setup = TrainSetup(
            net=built.net, method=built.method, train_loader=built.data.train,
            box_fn=built.data.eps_box, schedule=built.schedule, optim=built.settings.optim,
            epochs=built.settings.epochs, seed=built.settings.seed, device=built.device,
            run_dir=run_dir, logger=logger,
            checkpoint_extra=lambda: {"config": resolved, "logger_run_id": logger.run_id,
                                      "wall_time_s": previous_wall + time.perf_counter() - t0},
            epoch_metrics=tightness_probe(built), dist=ctx, channels_last=built.channels_last)
        history = fit(setup, resume_state=resume_state)
        result = _evaluate(built)
        results = results_dict(cfg, result, history, previous_wall + time.perf_counter() - t0,
                               built.settings.eval.pgd.description)
        if resumed is not None:
            results["resumed"] = resumed
        if main:
            write_text_atomic(run_dir / "results.json", json.dumps(results, indent=2) + "\n")
            logger.log_summary(results)
            logger.log_checkpoint(str(run_dir / "last.pt"))
            print(format_table(results), flush=True)
        result.raise_if_unsound()
        return results
    except KeyboardInterrupt:  # SIGINT, or SIGTERM through fastcert.cli.preemptible
        logger.mark_preempting()
        raise
    finally:
        logger.finish()


def _evaluate(built: Built) -> EvalResult:
    """The final test evaluation; in a data-parallel run each rank evaluates its block of
    test batches and every rank gets the whole result, in test-set order (stage times: the
    slowest rank's)."""
    ev, data = built.settings.eval, built.data
    ctx = distributed.current()
    part = (evaluate(built.net, data.test, data.eps_box, built.settings.eval_eps,
                     verifiers=ev.bounds, pgd=ev.pgd, device=built.device,
                     seed=built.settings.seed) if len(data.test) else None)
    if ctx is None:
        return part
    parts = [p for p in distributed.gather(part) if p is not None]

    def cat(field):
        return {k: torch.cat([getattr(p, field)[k] for p in parts]) for k in getattr(parts[0], field)}

    return EvalResult(
        eps=parts[0].eps, label=torch.cat([p.label for p in parts]),
        pred=torch.cat([p.pred for p in parts]),
        pgd_robust=torch.cat([p.pgd_robust for p in parts]),
        attack_margin=torch.cat([p.attack_margin for p in parts]),
        verified=cat("verified"), margin_lb=cat("margin_lb"), ran=cat("ran"),
        stage_time_s={k: max(p.stage_time_s[k] for p in parts) for k in parts[0].stage_time_s},
        violations=[v for p in parts for v in p.violations], ties=sum(p.ties for p in parts))


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
    """The checkpoint to continue from. ``resume``: None/false (a fresh run), true or
    ``"last"`` (this run dir's last.pt) or a path. A fresh run never overwrites a run dir that
    holds a checkpoint."""
    from fastcert import checkpoint

    if resume in (None, False, "false", "False"):
        if (run_dir / "last.pt").exists():
            raise checkpoint.CheckpointError(
                f"{run_dir} already holds a run (last.pt); nothing was changed. Continue it with "
                f"resume.checkpoint=last, or start a new run in another hydra.run.dir")
        return None
    path = run_dir / "last.pt" if resume in (True, "true", "True", "last") else Path(resume)
    if not path.exists():
        raise checkpoint.CheckpointError(
            f"resume: no checkpoint at {path}. Run with hydra.run.dir=<the old run dir> "
            f"resume.checkpoint=last, or resume.checkpoint=<path to last.pt>")
    return checkpoint.load(path, map_location=device)
