"""certify's own keys (``conf/certify.yaml``), checked before anything is built or written."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from fastcert import rebuild

#: Share of the memory available at start that ``memory_gb: null`` budgets (all workers).
MEMORY_SHARE = 0.5


@dataclass
class Options:
    verifiers: list[str]       # keys of fastcert.bounds.Bound, as given
    cascade: bool
    attack: object             # conf/attack/<name>.yaml, built
    alpha_opts: dict           # auto_LiRPA's optimize_bound_args of α-CROWN
    alpha_timeout: float | None  # seconds per example of α-CROWN's optimisation
    seed: int | None           # the attack's random starts; None: the run's seed
    progress: bool
    workers: int
    shard: tuple[int, int] | None  # (i, n): this process certifies test batches b ≡ i mod n
    memory_gb: float           # per process
    complete: dict | None      # conf's complete section, checked; None: no complete stage


def available_gb() -> float:
    """MemAvailable of /proc/meminfo in GB."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    raise OSError("no MemAvailable in /proc/meminfo")


def parse_shard(value) -> tuple[int, int] | None:
    from fastcert.config import ConfigError

    if value is None:
        return None
    try:
        i, n = (int(p) for p in str(value).split("/"))
    except ValueError:
        i, n = -1, 0
    if not 0 <= i < n:
        raise ConfigError(f"shard={value}: expected i/n with 0 <= i < n, e.g. shard=0/4")
    return i, n


def options(cfg: DictConfig) -> Options:
    """certify's own keys, checked first: a mistake costs a second, not a model build."""
    from fastcert.bounds import Bound
    from fastcert.config import ConfigError, coerce, instantiate

    try:
        verifiers = [Bound.parse(v).key for v in cfg.verifiers]
    except ValueError as e:
        raise ConfigError(f"verifiers: {e}") from None
    alpha_opts = {"iteration": rebuild.positive(cfg.alpha_crown.iterations,
                                                "alpha_crown.iterations"),
                  "lr_alpha": coerce(cfg.alpha_crown.lr, float, "alpha_crown.lr")}
    alpha_timeout = _optional_positive(cfg.alpha_crown.get("timeout_s"), "alpha_crown.timeout_s")
    workers = rebuild.positive(cfg.get("workers", 1), "workers")
    shard = parse_shard(cfg.get("shard"))
    if shard is not None and workers > 1:
        raise ConfigError("workers and shard exclude each other: shard=i/n is one process of "
                          "n; workers=N starts N of them (drop one)")
    memory = _optional_positive(cfg.get("memory_gb"), "memory_gb")
    memory = (memory or MEMORY_SHARE * available_gb()) / workers
    return Options(verifiers, coerce(cfg.cascade, bool, "cascade"),
                   instantiate(cfg.attack, "attack"), alpha_opts, alpha_timeout,
                   None if cfg.get("seed") is None else coerce(cfg.seed, int, "seed"),
                   coerce(cfg.get("progress", True), bool, "progress"), workers, shard, memory,
                   complete_options(cfg.get("complete"), memory))


def _optional_positive(value, key: str) -> float | None:
    from fastcert.config import ConfigError, coerce

    if value is None:
        return None
    number = coerce(value, float, key)
    if not number > 0:
        raise ConfigError(f"{key}={value}: expected a number > 0 (or null)")
    return number


def complete_options(section, memory_gb: float) -> dict | None:
    """The complete stage's section checked and resolved (``memory_gb: null`` → the process's
    budget), or None when ``complete.engine`` is null."""
    from fastcert.complete.engine import make_engine
    from fastcert.complete.neuralsat import EngineMissing
    from fastcert.config import ConfigError

    if section is None or section.get("engine") is None:
        return None
    opts = OmegaConf.to_container(section, resolve=True)
    name = str(opts["engine"])
    opts["timeout_s"] = _optional_positive(opts.get("timeout_s"), "complete.timeout_s")
    if opts["timeout_s"] is None:
        raise ConfigError("complete.timeout_s: a number of seconds per example is required")
    opts["memory_gb"] = (_optional_positive(opts.get("memory_gb"), "complete.memory_gb")
                         or memory_gb)
    try:
        engine = make_engine(name, opts.get(name) or {})
        opts["version"] = engine.version()
    except ValueError as e:
        raise ConfigError(f"complete.engine={name}: {e}") from None
    except EngineMissing as e:
        raise ConfigError(f"complete.engine={name}: {e}") from None
    return opts


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def settings_of(cfg: DictConfig, opts: Options, trained, seed: int, n_test: int,
                batch: int) -> dict:
    """What determines certify's results, recorded in the journal: a later certify into the
    same dir must match it (:meth:`fastcert.certify.journal.Journal.check_settings`)."""
    complete = None
    if opts.complete is not None:
        engine = opts.complete["engine"]
        complete = {"engine": engine, "version": opts.complete["version"],
                    "timeout_s": opts.complete["timeout_s"],
                    "settings": {k: v for k, v in (opts.complete.get(engine) or {}).items()
                                 if k in ("args", "settings")}}
    return {"checkpoint_sha256": sha256(trained.path), "n_test": n_test, "batch_size": batch,
            "seed": seed, "attack": OmegaConf.to_container(cfg.attack, resolve=True),
            "verifiers": list(opts.verifiers), "cascade": opts.cascade,
            "alpha_crown": OmegaConf.to_container(cfg.alpha_crown, resolve=True),
            "run_overrides": list(cfg.get("run_overrides") or []),
            "limit_test": cfg.get("limit_test"), "complete": complete}
