"""A run config checked once, before anything is loaded: :func:`validate` → :class:`Settings`.

Every check that needs no data or model happens here: unknown keys anywhere (the top level
included), each value against its type, ε against the data range, the epochs against the
warmup. What it builds (method, optimiser, evaluation, data source, initialiser) is carried in
the :class:`Settings` that :func:`fastcert.pipeline.build` takes.
"""
from __future__ import annotations

import difflib
import os
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

from omegaconf import DictConfig, OmegaConf

from fastcert.aids import Aids
from fastcert.bounds.choices import Bound
from fastcert.config import (
    CONF_DIR,
    ConfigError,
    check_keys,
    check_node,
    coerce,
    instantiate,
    parse_number,
)
from fastcert.devices import check_device_spec
from fastcert.evaluate import EvalConfig
from fastcert.memory import check_memory_gb
from fastcert.methods import Method
from fastcert.optim import Optimizer
from fastcert.resume import resume_options
from fastcert.search import SearchSettings, search_settings
from fastcert.selection import Select

#: What the code supplies to each group's target (not settable from the config).
RUNTIME = {
    "model": ("input_shape", "num_classes"),
    "schedule": ("eps_target", "steps_per_epoch"),
    "logger": ("run_dir", "run_name", "config", "resume_id", "group_default", "steps_per_epoch"),
}


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


@dataclass(frozen=True)
class Speed:
    """How this machine runs the training (top-level keys; none changes what is computed)."""

    nproc: int = 1                           # data-parallel processes of the run
    keep_freed_memory: bool = True           # CPU: glibc keeps freed memory (fastcert.memory)
    channels_last: Literal["auto"] | bool = "auto"  # auto: on CUDA
    cudnn_benchmark: bool = True             # CUDA: cuDNN picks the fastest convolution
    memory_gb: float | None = None           # the evaluation's memory budget, GiB (fastcert.memory)


def speed_settings(cfg: DictConfig) -> Speed:
    """The checked :class:`Speed` keys of ``cfg`` (a config saved before a key existed gets
    its default). ``nproc`` under torchrun must be 1 or torchrun's process count."""
    hints = typing.get_type_hints(Speed)
    speed = Speed(**{key: coerce(cfg[key], hints[key], key) for key in hints if key in cfg})
    if speed.nproc < 1:
        raise ConfigError(f"nproc={speed.nproc}: use 1 (one process) or more")
    try:
        check_memory_gb(speed.memory_gb)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and speed.nproc not in (1, world):
        raise ConfigError(f"nproc={speed.nproc} under torchrun with {world} processes: "
                          f"torchrun already runs the ranks; drop nproc (or nproc={world})")
    return speed


@dataclass
class Settings:
    """The run's checked top-level values, the small objects built from its config, and the
    config itself (the model, schedule and logger nodes are built with runtime values)."""

    config: DictConfig
    seed: int
    epochs: int
    eps: float          # training radius (pixel units)
    eval_eps: float     # test radius
    cpu_threads: int    # torch's CPU threads; 0: torch's default
    method: Method
    optim: Optimizer
    eval: EvalConfig
    data: Any           # a fastcert.data.DataSource
    init: Any           # a fastcert.initializers.Init
    speed: Speed
    aids: Aids = Aids()         # CTBench's training aids (all off without an ``aids`` node)
    select: Select = Select()   # model selection (none without a ``select`` node)
    search: SearchSettings = field(default_factory=SearchSettings)  # a trial's study


#: The metrics of results.json that every run produces.
ALWAYS_PRODUCED = ("clean_acc", "pgd_acc", "wall_time_s")


def produced_metrics(settings: Settings) -> set[str]:
    """The numeric keys of the results.json a run with ``settings`` writes, which a sweeper may
    optimise (``optimized_metric``): clean and PGD accuracy, the wall time, and for each
    verifier of ``eval.verifiers`` its ``<verifier>_verified_acc`` (with ``any_verified_acc``
    when there is one); with a validation split (``data.val_size``) the same accuracies on it,
    ``val_<key>``."""
    verified = {f"{b.key}_verified_acc" for b in settings.eval.bounds}
    accuracies = {"clean_acc", "pgd_acc", *verified, *(("any_verified_acc",) if verified else ())}
    val = {f"val_{k}" for k in accuracies} if settings.data.val_size else set()
    return {*ALWAYS_PRODUCED, *accuracies, *val}


def objective_metrics(value: Any) -> list[str]:
    """``optimized_metric`` as a list of key names: null (none), one key, or a list of keys (a
    multi-objective search)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) or OmegaConf.is_list(value):
        return [str(v) for v in value]
    raise ConfigError(f"optimized_metric={value!r}: name a key of results.json, e.g. "
                      f"optimized_metric=ibp_verified_acc, or a list of keys")


def check_objective(value: Any, settings: Settings) -> None:
    """Each metric of ``optimized_metric`` must be one the run produces
    (:func:`produced_metrics`), so that a sweep fails before its first trial trains, not after
    the last."""
    produced = produced_metrics(settings)
    for metric in objective_metrics(value):
        if metric in produced:
            continue
        verifier = metric.removesuffix("_verified_acc")
        if metric.endswith("_verified_acc") and verifier in {b.key for b in Bound}:
            wanted = ",".join([*settings.eval.verifiers, verifier])
            raise ConfigError(
                f"optimized_metric={metric}: eval.verifiers=[{','.join(settings.eval.verifiers)}] "
                f"does not run {verifier}; add it (eval.verifiers=[{wanted}]) or optimise one of "
                f"{', '.join(sorted(produced))}")
        close = difflib.get_close_matches(metric, sorted(produced), n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ConfigError(f"optimized_metric={metric} is not a metric this run produces: "
                          f"{hint}choose from {', '.join(sorted(produced))}")


def validate(cfg: DictConfig) -> Settings:
    """Every check that needs no data or model: unknown keys anywhere (top level included),
    each value against its type, the device's name, ε against the data range, the epochs
    against the warmup, ``optimized_metric`` against the metrics the run produces, and the
    ``search`` node (:func:`fastcert.search.search_settings`)."""
    check_keys([k for k in cfg if k != "hydra"], top_level_keys(), "top-level")
    resume_options(cfg)
    check_device_spec(cfg.get("device"))
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
    search = search_settings(cfg, objective_metrics(cfg.get("optimized_metric")), data.val_size,
                             speed.nproc)
    aids, select = aids_and_selection(cfg, data, speed)
    if aids.swa.on and aids.swa.start >= epochs:
        raise ConfigError(f"aids.swa.start={aids.swa.start}: SWA must start before the last of "
                          f"the {epochs} epochs (an epoch index, 0-based), e.g. "
                          f"aids.swa.start={max(0, epochs - max(1, epochs // 10))}")
    optim = instantiate(cfg.optim, "optim")
    if optim.grad_acc_bn == "batch" and optim.grad_acc_steps > 1 and _parallel(speed):
        raise ConfigError("optim.grad_acc_bn=batch runs in one process only: use nproc=1, or "
                          "optim.grad_acc_bn=chunk")
    settings = Settings(config=cfg, seed=seed, epochs=epochs, eps=eps, eval_eps=eval_eps,
                        cpu_threads=threads, method=instantiate(cfg.method, "method"),
                        optim=optim, eval=eval_cfg, data=data,
                        init=instantiate(cfg.init, "init"), speed=speed, aids=aids, select=select,
                        search=search)
    check_objective(cfg.get("optimized_metric"), settings)
    return settings


def aids_and_selection(cfg: DictConfig, data, speed: Speed) -> tuple[Aids, Select]:
    """The ``aids`` and ``select`` nodes, checked (a config saved before they existed gets
    their defaults: no aid, no selection)."""
    aids = instantiate(cfg.aids, "aids") if "aids" in cfg else Aids()
    select = instantiate(cfg.select, "select") if "select" in cfg else Select()
    if select.on and select.split == "val" and data.val_size == 0:
        raise ConfigError("select.split=val needs a validation split: set data.val_size "
                          "(e.g. data.val_size=0.1), or select.split=test to select on the "
                          "test set as CTBench does, or select.metric=null")
    if aids.edac.on and _parallel(speed):
        raise ConfigError("aids.edac.gamma>0 runs in one process only (its pre-step is not "
                          "reduced over data-parallel ranks): use nproc=1, or aids.edac.gamma=0")
    return aids, select


def _parallel(speed: Speed) -> bool:
    return speed.nproc > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1
