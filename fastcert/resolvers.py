"""fastcert's own OmegaConf resolvers, registered by the command-line entry points
(:func:`register`) before Hydra composes their configs:

* ``${fastcert.n_jobs:<devices>,<cpu jobs>,<nproc>}``: the joblib launcher's default number of
  parallel jobs (conf/hydra/launcher/joblib.yaml; :func:`default_n_jobs`);
* ``${fastcert_checkpoint_dir:<path>}``: the folder of an existing checkpoint (certify's and
  export's ``hydra.run.dir``; :func:`checkpoint_dir`).
"""
from __future__ import annotations

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


def checkpoint_dir(path) -> str:
    """The folder of an existing checkpoint file. Raising here stops Hydra before it creates
    output folders for a mistyped path."""
    p = Path(str(path))
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    return str(p.resolve().parent)


def register() -> None:
    """Register both resolvers (again: replaced)."""
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver(
        "fastcert.n_jobs", lambda devices=None, cpu_jobs=2, nproc=1: default_n_jobs(
            devices, cpu_jobs, nproc), replace=True)
    OmegaConf.register_new_resolver("fastcert_checkpoint_dir", checkpoint_dir, replace=True)
    # conf/hydra/launcher/joblib.yaml deliberately shares the name of the plugin's structured
    # config, so that `hydra/launcher=joblib` gets the pool-sized n_jobs; Hydra 1.3 then
    # validates it against that schema and warns that this matching is deprecated. The file
    # sets every key itself, so it also works where the matching is gone; silence just that.
    warnings.filterwarnings(
        "ignore", message=r"\s*'hydra/launcher/joblib' is validated against ConfigStore schema")
