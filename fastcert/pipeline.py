"""One readable path from a composed config to results:

    validate → resume → build (data → model + init → BoundedNet → schedule) → fit → evaluate
    → write

:func:`run` is what ``python -m fastcert.run`` calls; it takes a plain config and a run
directory, so tests and other front ends call it without Hydra's decorator. The config is
checked once (:func:`fastcert.settings.validate`), the resume by :mod:`fastcert.resume`, the
data-parallel ranks are spawned by :mod:`fastcert.parallel`, and what is written and printed
is :mod:`fastcert.report`'s.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from fastcert import distributed, memory, parallel, report
from fastcert.bounds import BoundedNet
from fastcert.checkpoint import load as checkpoint_load
from fastcert.checkpoint import write_text_atomic
from fastcert.config import instantiate
from fastcert.data import DataBundle
from fastcert.devices import acquire_device, release_device
from fastcert.evaluate import EvalResult, evaluate
from fastcert.loggers import Logger, NullLogger
from fastcert.methods import Method
from fastcert.resume import Resume, check_resume, check_weights
from fastcert.schedules import EpsSchedule
from fastcert.search import DominatedStop, dominated_stop
from fastcert.seeding import seed_everything
from fastcert.selection import Selector
from fastcert.settings import Settings, Speed, objective_metrics, validate
from fastcert.tightness import TightnessProbe
from fastcert.train import TrainSetup, fit


def run_name(settings: Settings) -> str:
    """A readable name from the choices, e.g. ``fast-cnn7-cifar10-s1``."""
    cfg = settings.config
    return f"{cfg.method.name}-{cfg.model.name}-{cfg.data.name}-s{settings.seed}"


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


def build(settings: Settings, device: torch.device | None = None) -> Built:
    """Data, model, bounded network, method and schedule of a validated run (in a data-parallel
    rank: this rank's shard of the data, BatchNorm on global statistics). ``device``: default
    the rank's, else ``device`` / ``devices`` of the config (a pool device stays leased)."""
    s, cfg = settings, settings.config
    ctx = distributed.current()
    device = device or (ctx.device if ctx else acquire_device(cfg.device, cfg.get("devices")))
    set_process(s.cpu_threads, s.speed, device)
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
    # two held-out images to trace the graph (not a whole loader batch: no workers, no 512
    # images; validation images where there are some: the test set is read only at the end)
    test_set = (data.test if data.val is None else data.val).dataset
    example = torch.stack([test_set[i][0] for i in range(min(2, len(test_set)))])
    net = BoundedNet(model, example.to(device, memory_format=memory_format), data.num_classes)
    schedule = instantiate(cfg.schedule, "schedule", eps_target=s.eps,
                           steps_per_epoch=len(data.train))
    return Built(s, data, net, schedule, device, channels_last)


def set_process(cpu_threads: int, speed: Speed, device: torch.device) -> None:
    """Process-wide settings of a run (a run owns its process): torch's CPU threads
    (``cpu_threads``; 0: torch's default), the allocator on CPU (``keep_freed_memory``) and
    cuDNN's autotuner on CUDA (``cudnn_benchmark``)."""
    if cpu_threads > 0:
        torch.set_num_threads(cpu_threads)
    if device.type == "cpu" and speed.keep_freed_memory:
        memory.keep_freed_memory()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = speed.cudnn_benchmark


def run(cfg: DictConfig, run_dir: str | os.PathLike, resume: str | os.PathLike | bool | None = None,
        device: torch.device | None = None, group: str | None = None, started=None) -> dict:
    """Train and evaluate as ``cfg`` says, writing metrics.jsonl, last.pt and results.json
    into ``run_dir``. ``resume``: where to continue from (True / ``"last"``: the run dir's
    last.pt; a path), default ``cfg.resume.checkpoint``. ``group`` names the sweep/preset for
    loggers. ``started()`` is called for a fresh start (or a resume of another dir's
    checkpoint, not of this run dir's) once the config, the run dir, the resume and the data
    are checked, before anything is written into the run dir. Returns the results dict.
    With ``nproc`` > 1 (outside torchrun) it spawns that many data-parallel ranks on devices
    of the pool (:func:`fastcert.parallel.run_parallel`).

    A soundness violation in the final evaluation is recorded in results.json, which is
    written, and then raised (:class:`fastcert.evaluate.SoundnessError`)."""
    t0 = time.perf_counter()
    settings = validate(cfg)
    settings.select.warn()
    run_dir = Path(run_dir)
    ctx = distributed.current()
    if settings.speed.nproc > 1 and ctx is None:
        return parallel.run_parallel(settings, run_dir, resume, group, started)
    owns_device = device is None and ctx is None
    if ctx is not None:
        device = device or ctx.device
    elif owns_device:
        device = acquire_device(cfg.device, cfg.get("devices"))
    try:
        return _run_here(settings, run_dir, resume, device, group, t0, started)
    finally:
        if owns_device:
            release_device()  # a reused worker process's next job may take another GPU


def _run_here(settings: Settings, run_dir: Path, resume, device: torch.device,
              group: str | None, t0: float, started) -> dict:
    """The run in this process (one rank of a data-parallel run): resume → build → fit →
    evaluate → write."""
    resolved, start, built = _begin(settings, run_dir, resume, device, started)
    if built is None:
        return start.done
    ctx = distributed.current()
    main = ctx is None or ctx.main
    logger = _logger(built, run_dir, resolved, start, group, main)
    try:
        if start.state is not None:
            for record in start.history:  # what a killed process may not have sent
                logger.log_epoch(record, record["epoch"])
        rule = _stop_rule(built)
        stopped: dict = {}
        setup = _train_setup(built, run_dir, logger, resolved, start, t0,
                             _stop_check(built, rule, stopped))
        history = fit(setup, resume_state=start.state)
        if stopped:
            return _stopped(built, run_dir, logger, history, start, t0, stopped, main)
        _keep_selected(built, setup.selector)
        return _final(built, run_dir, logger, history, start, t0, main, setup.selector)
    except KeyboardInterrupt:  # SIGINT, or SIGTERM through fastcert.cli.preemptible
        logger.mark_preempting()
        raise
    finally:
        logger.finish()


def _begin(settings: Settings, run_dir: Path, resume, device: torch.device,
           started) -> tuple[dict, Resume, Built | None]:
    """The resolved config, the resume (checked and announced) and the built run, with
    ``started()`` called and every rank past the checks; no build where ``resume.checkpoint
    =auto`` found the run finished (``start.done``)."""
    resolved = OmegaConf.to_container(settings.config, resolve=True)
    start = check_resume(settings.config, resolved, run_dir, resume, device)
    ctx = distributed.current()
    if ctx is None or ctx.main:
        _announce(start, settings, run_dir)
    if start.done is not None:
        return resolved, start, None
    if ctx is not None:
        parallel.check_parallel(settings, ctx.world)
    run_dir.mkdir(parents=True, exist_ok=True)
    built = build(settings, device)
    if start.state is not None:
        check_weights(start.state, built.net.model, start.resumed[-1]["changes"])
    if started is not None and start.first_in(run_dir):
        started()
    if ctx is not None:
        distributed.barrier()  # every rank checked the run dir before rank 0 writes to it
    return resolved, start, built


def _final(built: Built, run_dir: Path, logger: Logger, history, start: Resume, t0: float,
           main: bool, selector: Selector | None) -> dict:
    """The trained (or selected) model evaluated on the validation split (if any), then on the
    test set, and results.json written (with the selection's record); a soundness violation
    raised after the write."""
    val = None if built.data.val is None else _evaluate(built, built.data.val)
    result = _evaluate(built, built.data.test)
    results = report.results_dict(built.settings, result, history,
                                  start.previous_wall_s + time.perf_counter() - t0, val)
    if selector is not None:
        results["selection"] = selector.summary()
    if start.resumed is not None:
        results["resumed"] = start.resumed
    if main:
        _write(run_dir, results, logger)
    for r in (val, result):
        if r is not None:
            r.raise_if_unsound()
    return results


def _announce(start: Resume, settings: Settings, run_dir: Path) -> None:
    """One line for a resume: where it continues, or that there is nothing to do."""
    if start.done is not None:
        print(f"{run_dir / 'results.json'} holds the finished run ({start.epoch} epochs); "
              f"nothing to do", flush=True)
    elif start.state is not None:
        print(f"resuming {start.path} at epoch {start.epoch}/{settings.epochs}"
              + (" (trained: evaluating only)" if start.epoch == settings.epochs else ""),
              flush=True)


def _logger(built: Built, run_dir: Path, resolved: dict, start: Resume, group: str | None,
            main: bool) -> Logger:
    """The run's logger (rank 0's; other ranks get a silent one with rank 0's cadence, so
    that every rank runs the same steps, hence the same collectives)."""
    cfg = built.settings.config
    if not main:
        return NullLogger(log_every=int(cfg.logger.get("log_every") or 0))
    return instantiate(cfg.logger, "logger", run_dir=run_dir, run_name=run_name(built.settings),
                       config=resolved, resume_id=(start.state or {}).get("logger_run_id"),
                       group_default=group, steps_per_epoch=len(built.data.train))


def _train_setup(built: Built, run_dir: Path, logger: Logger, resolved: dict, start: Resume,
                 t0: float, stop=None) -> TrainSetup:
    s = built.settings

    def checkpoint_extra() -> dict:
        return {"config": resolved, "logger_run_id": logger.run_id,
                "wall_time_s": start.previous_wall_s + time.perf_counter() - t0,
                **({"resumed": start.resumed} if start.resumed else {})}

    selector = None
    if s.select.on:
        ctx = distributed.current()
        selector = Selector(s.select, lambda: _selection_scores(built),
                            lambda epoch: _eligible(built, epoch), run_dir,
                            extra=lambda: {"config": resolved}, write=ctx is None or ctx.main)
    return TrainSetup(
        net=built.net, method=built.method, train_loader=built.data.train,
        box_fn=built.data.eps_box, schedule=built.schedule, optim=s.optim, epochs=s.epochs,
        seed=s.seed, device=built.device, run_dir=run_dir, logger=logger,
        checkpoint_extra=checkpoint_extra,
        epoch_metrics=TightnessProbe.on_held_out(built.data, s.eps, built.device),
        dist=distributed.current(), channels_last=built.channels_last, aids=s.aids,
        selector=selector, stop=stop)


def _stop_rule(built: Built) -> DominatedStop | None:
    """The run's early stopping of dominated trials (:mod:`fastcert.search`), if it has one."""
    s = built.settings
    objective = objective_metrics(s.config.get("optimized_metric"))
    return dominated_stop(s.search, objective, built.schedule.start, built.schedule.length,
                          s.epochs)


def _stop_check(built: Built, rule: DominatedStop | None, stopped: dict):
    """``TrainSetup.stop`` for ``rule``: after the rule's epoch, the validation split's
    evaluation and the study's verdict; when dominated, ``stopped`` gets the evaluation
    (``result``) and results.json's ``stopped_early`` entry (``record``)."""
    if rule is None:
        return None

    def stop(record: dict) -> bool:
        if record["epoch"] != rule.epoch:
            return False
        result = _evaluate(built, built.data.val)
        entries = report.validation_entries(result)
        point = [float(entries[k]) for k in rule.objective]
        by = rule.dominating(point)
        if len(by) < rule.settings.stop_dominated:
            return False
        stopped.update(result=result, record=rule.record(point, by))
        return True

    return stop


def _stopped(built: Built, run_dir: Path, logger: Logger, history: list[dict], start: Resume,
             t0: float, stopped: dict, main: bool) -> dict:
    """results.json of a run stopped early: the validation split's evaluation at the stop,
    ``stopped_early``; the test set is not read."""
    results = report.stopped_results(built.settings, stopped["result"], history,
                                     start.previous_wall_s + time.perf_counter() - t0,
                                     stopped["record"])
    if main:
        _write(run_dir, results, logger)
    stopped["result"].raise_if_unsound()
    return results


def _selection_scores(built: Built) -> dict:
    """The current model's accuracies on the selection split, from the final evaluation with
    only the verifiers the selection metric needs."""
    s = built.settings
    loader = built.data.test if s.select.split == "test" else built.data.val
    return report.accuracies(_evaluate(built, loader, s.select.verifiers(s.eval.verifiers)))


def _eligible(built: Built, epoch: int) -> bool:
    """Whether epoch ``epoch`` (0-based) competes in the selection: its last step trained at
    ε ≥ the test radius (CTBench's rule, ``mix_train.py``)."""
    last_step = (epoch + 1) * len(built.data.train) - 1
    return built.schedule.eps(last_step) >= built.settings.eval_eps


def _keep_selected(built: Built, selector: Selector | None) -> None:
    """The selected epoch's weights (best.pt) copied into the network, when one was kept."""
    if selector is None or selector.best_epoch is None:
        return
    if distributed.current() is not None:
        distributed.barrier()  # rank 0 wrote best.pt
    state = checkpoint_load(selector.path, built.device)
    built.net.model.load_state_dict(state["model"])


def _evaluate(built: Built, loader, verifiers=None) -> EvalResult:
    """The final evaluation on ``loader`` (the test set, or the validation split: the same
    evaluation) with ``verifiers`` (default ``eval.verifiers``); in a data-parallel run each
    rank evaluates its block of batches and every rank gets the whole result
    (:func:`fastcert.parallel.gather_results`)."""
    s, data = built.settings, built.data
    verifiers = s.eval.bounds if verifiers is None else verifiers
    part = (evaluate(built.net, loader, data.eps_box, s.eval_eps, verifiers=verifiers,
                     pgd=s.eval.pgd, device=built.device, seed=s.seed,
                     memory_gb=s.speed.memory_gb)
            if len(loader) else None)
    return part if distributed.current() is None else parallel.gather_results(part)


def _write(run_dir: Path, results: dict, logger: Logger) -> None:
    """results.json, the logger's summary and checkpoint, and the printed table."""
    write_text_atomic(run_dir / "results.json", json.dumps(results, indent=2) + "\n")
    logger.log_summary(results)
    logger.log_checkpoint(str(run_dir / "last.pt"))
    print(report.format_table(results), flush=True)
