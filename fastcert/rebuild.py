"""A trained run rebuilt from its checkpoint, as ``certify`` and ``export`` need it.

The run is rebuilt from the config that trained the checkpoint: the checkpoint's ``"config"``
entry (written with its weights), else, for checkpoints without one,
``<checkpoint dir>/.hydra/config.yaml``. Data and machine settings of the command
(``limit_test``, ``batch_size``, ``device``, ``run_overrides``...) are applied to it, model,
data and init come from :func:`fastcert.pipeline.build`, then the checkpoint's weights (and
BatchNorm statistics) are copied in place with ``net.model.load_state_dict`` so the
BoundedNet's tied views see them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

# torch and the rest of fastcert are imported inside the functions that need them, so that a
# mistyped command line of certify / export fails in a second, not after ~10 s of imports.

HYDRA_CONFIG = Path(".hydra") / "config.yaml"
#: Keys whose difference between .hydra/config.yaml and the checkpoint's config is reported.
IDENTITY_KEYS = ("model", "data", "method", "seed", "eps")


def precheck(argv: list[str], command: str) -> str | None:
    """A one-line error for a missing or mistyped ``checkpoint=`` on the command line of
    ``python -m <command>`` before Hydra starts (which would otherwise print a long traceback
    from resolving hydra.run.dir). Only plain overrides are checked: any flag (``--help``,
    ``-m``, ``--cfg``...) skips it."""
    if any(a.startswith("-") for a in argv):
        return None
    values = [a.split("=", 1)[1] for a in argv if a.startswith("checkpoint=")]
    if not values:
        return f"missing checkpoint=PATH (usage: python -m {command} checkpoint=PATH ...)"
    v = values[-1]
    if "," in v or "$" in v or Path(v).is_file():
        return None
    return f"checkpoint {v} does not exist"


def load_run_config(checkpoint_path: str | os.PathLike, state: dict) -> tuple[DictConfig, str]:
    """The config that trained the checkpoint and where it came from (``"checkpoint"`` or a
    path).

    The checkpoint's own ``"config"`` entry comes first: ``.hydra/config.yaml`` describes the
    last launch in that directory, which may be a run that was refused or changed on resume.
    ``<checkpoint dir>/.hydra/config.yaml`` is read only for a checkpoint without a config;
    when both exist and differ in model, data, method, seed or eps a note says so. Raises
    ``CheckpointError`` when neither exists.
    """
    from fastcert import checkpoint as ckpt

    path = Path(checkpoint_path)
    hydra_cfg = path.parent / HYDRA_CONFIG
    if state.get("config"):
        cfg = OmegaConf.create(state["config"])
        if hydra_cfg.is_file():
            try:
                launched = OmegaConf.load(hydra_cfg)
                OmegaConf.resolve(launched)
            except OmegaConfBaseException:
                return cfg, "checkpoint"
            differ = [k for k in IDENTITY_KEYS
                      if OmegaConf.select(launched, k) != OmegaConf.select(cfg, k)]
            if differ:
                print(f"note: {hydra_cfg} differs from the config that trained {path.name} in "
                      f"{', '.join(differ)}; using the checkpoint's own config", flush=True)
        return cfg, "checkpoint"
    if not hydra_cfg.is_file():
        raise ckpt.CheckpointError(
            f"checkpoint {path} holds no 'config' entry and there is no {hydra_cfg}: cannot "
            f"rebuild the model and data it was trained on")
    try:
        cfg = OmegaConf.load(hydra_cfg)
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        raise ckpt.CheckpointError(
            f"{hydra_cfg} cannot be resolved ({e}) and checkpoint {path} holds no 'config' "
            f"entry") from e
    return cfg, str(hydra_cfg)


def tested_radius(run_cfg: DictConfig):
    """The radius a run is tested at: its ``eval.eps`` (e.g. 0.3 for CROWN-IBP's MNIST train-0.4
    setting), else its training ``eps``; what certify and export use without ``eps=``."""
    test_eps = OmegaConf.select(run_cfg, "eval.eps")
    return run_cfg.eps if test_eps is None else test_eps


def eps_list(value, default) -> list[float]:
    """``eps=`` of the command (a radius or a list of radii; None: ``default``) as numbers."""
    from fastcert.config import parse_number

    if value is None:
        return [parse_number(default, "eps")]
    if isinstance(value, (int, float, str)):
        return [parse_number(value, "eps")]
    return [parse_number(v, "eps") for v in value]


def checked_radii(value, run_cfg: DictConfig) -> list[float]:
    """:func:`eps_list` of ``value`` (default: the run's :func:`tested_radius`), each checked
    against the run's data range."""
    from fastcert.config import parse_number
    from fastcert.settings import check_eps

    radii = eps_list(value, tested_radius(run_cfg))
    for e in radii:
        check_eps(e, parse_number(run_cfg.data.eps_max, "data.eps_max"))
    return radii


def positive(value, key: str) -> int:
    """``value`` as an integer >= 1 (ConfigError naming ``key`` otherwise)."""
    from fastcert.config import ConfigError, coerce

    n = coerce(value, int, key)
    if n < 1:
        raise ConfigError(f"{key}={n}: must be a positive integer")
    return n


def apply_overrides(run_cfg: DictConfig, cfg: DictConfig) -> DictConfig:
    """The run's config with the command's own data and machine settings (``run_overrides``,
    ``limit_test``, ``batch_size``, ``cpu_threads``, ``device``, ``devices``), each checked
    (naming the key) before anything is loaded."""
    from fastcert.config import coerce

    run_cfg = run_cfg.copy()
    OmegaConf.set_struct(run_cfg, False)
    overrides = list(cfg.get("run_overrides") or [])
    if overrides:
        run_cfg = OmegaConf.merge(run_cfg, OmegaConf.from_dotlist(overrides))
    limit = cfg.get("limit_test")
    if limit is not None:
        run_cfg.data.limit_test = (None if str(limit).lower() == "all"
                                   else positive(limit, "limit_test"))
    if cfg.get("batch_size") is not None:
        run_cfg.data.test_batch_size = positive(cfg.batch_size, "batch_size")
    # how this machine runs, not what was trained: the command's own settings
    run_cfg.cpu_threads = coerce(cfg.get("cpu_threads", 0) or 0, int, "cpu_threads")
    run_cfg.device = str(cfg.get("device", "auto"))
    run_cfg.devices = cfg.get("devices")
    return run_cfg


@dataclass
class Trained:
    """A checkpoint and the config that trained it, with the command's overrides."""

    path: Path
    state: dict
    config: DictConfig
    source: str  # where the config came from: "checkpoint" or the .hydra/config.yaml path


def load_trained(cfg: DictConfig) -> Trained:
    """``cfg.checkpoint`` loaded (on the CPU) with its run config (:func:`load_run_config`)
    and ``cfg``'s overrides (:func:`apply_overrides`)."""
    from fastcert import checkpoint as ckpt

    path = Path(str(cfg.checkpoint))
    state = ckpt.load(path, map_location="cpu")
    run_cfg, source = load_run_config(path, state)
    return Trained(path, state, apply_overrides(run_cfg, cfg), source)


def build_trained(trained: Trained, device):
    """The run rebuilt on ``device`` (:func:`fastcert.pipeline.build` of its validated config)
    with the checkpoint's weights copied in place (the tied views stay tied); a
    ``CheckpointError`` when they do not fit the model."""
    from fastcert import checkpoint as ckpt
    from fastcert.pipeline import build
    from fastcert.settings import validate

    built = build(validate(trained.config), device)
    try:
        built.net.model.load_state_dict(trained.state["model"])
    except RuntimeError as e:
        raise ckpt.CheckpointError(
            f"checkpoint {trained.path}: its weights do not fit the model rebuilt from "
            f"{trained.source} ({e})") from e
    return built
