"""``python -m fastcert.run [overrides]``: train and certify one model (a Hydra app).

With no overrides it runs the embedded default (digits, IBP, ε=0.1) on the CPU in a few
minutes. ``-m`` sweeps, e.g. ``python -m fastcert.run -m method=ibp,fast seed=0,1,2``.
"""
from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from fastcert import distributed
from fastcert.pipeline import run


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig):
    hydra_cfg = HydraConfig.get()
    results = run(cfg, hydra_cfg.runtime.output_dir, resume=cfg.get("resume"),
                  group=hydra_cfg.runtime.choices.get("experiment"))
    metric = cfg.get("optimized_metric")
    return results[metric] if metric else None


def _join_torchrun() -> None:
    """Under ``torchrun``: join the process group before Hydra resolves the run dir (so every
    rank resolves the same one); ranks > 0 leave Hydra's own files (.hydra/, the job log) to
    rank 0."""
    ctx = distributed.init_from_env()
    if ctx is not None and not ctx.main:
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=disabled"]


if __name__ == "__main__":
    _join_torchrun()
    try:
        main()
    finally:
        distributed.shutdown()
