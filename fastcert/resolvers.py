"""fastcert's own OmegaConf resolvers, registered by the command-line entry points
(:func:`register`) before Hydra composes their configs:

* ``${fastcert.n_jobs:<devices>,<cpu jobs>,<nproc>}``: the joblib launcher's default number of
  parallel jobs (conf/hydra/launcher/joblib.yaml; :func:`default_n_jobs`);
* ``${fastcert_checkpoint_dir:<path>}``: the folder of an existing checkpoint (certify's and
  export's ``hydra.run.dir``; :func:`checkpoint_dir`);
* the derived values of the pareto searches (conf/hparams_search/pareto, after Kaulen et al.'s
  CTRAIN, whose search spaces are relative to the run): ``${fastcert.mul:a,b}`` (a·b, e.g. the
  training ε = factor · ``data.eps``, κ_end = factor · κ_start), ``${fastcert.epochs_frac:f,E}``
  (⌈f·E⌉, an epoch bound), ``${fastcert.min:a,b}`` and ``${fastcert.milestones:start,length,
  d1,d2,E}`` (:func:`milestones_after_ramp`).
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

from fastcert.devices import parse_devices


def default_n_jobs(devices: Any = None, cpu_jobs: int = 2, nproc: int = 1) -> int:
    """Parallel jobs for the joblib launcher: the pool size (``devices`` or every visible GPU)
    divided by the devices a job takes (``nproc``, at least one job), or ``cpu_jobs`` without
    CUDA."""
    chosen = parse_devices(devices)
    if chosen:
        n = len(chosen)
    else:
        try:
            import torch

            n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        except Exception:
            n = 0
    return max(1, n // max(1, int(nproc))) if n else int(cpu_jobs)


def multiply(a, b) -> float:
    """a · b of two config numbers (``8/255`` fractions included)."""
    from fastcert.config import parse_number

    return parse_number(a, "fastcert.mul") * parse_number(b, "fastcert.mul")


def epochs_frac(frac, epochs) -> int:
    """⌈frac · epochs⌉: CTRAIN's epoch bounds (ramp ≤ ⌈0.75 E⌉, first decay ≤ ⌈0.5 E⌉ ...)."""
    return math.ceil(float(frac) * int(epochs) - 1e-9)


def milestones_after_ramp(start, length, d1, d2, epochs) -> list[int]:
    """The LR decay epochs of Kaulen et al.'s CTRAIN (``_lr_decay_kwargs_from_config``): the
    first ``d1`` epochs after the end of the ε ramp (``start + length``), the second ``d2``
    epochs after the first; a milestone beyond ``epochs`` is dropped."""
    first = int(start) + int(length) + int(d1)
    return [m for m in (first, first + int(d2)) if m <= int(epochs)]


def checkpoint_dir(path) -> str:
    """The folder of an existing checkpoint file. Raising here stops Hydra before it creates
    output folders for a mistyped path."""
    p = Path(str(path))
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    return str(p.resolve().parent)


def register() -> None:
    """Register the resolvers (again: replaced)."""
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver(
        "fastcert.n_jobs", lambda devices=None, cpu_jobs=2, nproc=1: default_n_jobs(
            devices, cpu_jobs, nproc), replace=True)
    OmegaConf.register_new_resolver("fastcert_checkpoint_dir", checkpoint_dir, replace=True)
    OmegaConf.register_new_resolver("fastcert.mul", multiply, replace=True)
    OmegaConf.register_new_resolver("fastcert.epochs_frac", epochs_frac, replace=True)
    OmegaConf.register_new_resolver("fastcert.min", lambda a, b: min(a, b), replace=True)
    OmegaConf.register_new_resolver("fastcert.milestones", milestones_after_ramp, replace=True)
    # conf/hydra/launcher/joblib.yaml deliberately shares the name of the plugin's structured
    # config, so that `hydra/launcher=joblib` gets the pool-sized n_jobs; Hydra 1.3 then
    # validates it against that schema and warns that this matching is deprecated. The file
    # sets every key itself, so it also works where the matching is gone; silence just that.
    warnings.filterwarnings(
        "ignore", message=r"\s*'hydra/launcher/joblib' is validated against ConfigStore schema")
