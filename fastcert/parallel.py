"""A run's data-parallel ranks seen from the pipeline: spawning them (``nproc=N`` outside
torchrun), what such a run refuses, and the final evaluation gathered from every rank.

The collectives, the DDP wrapper and BatchNorm's global statistics are
:mod:`fastcert.distributed`'s.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from fastcert import distributed
from fastcert.config import ConfigError
from fastcert.devices import acquire_devices, release_device
from fastcert.evaluate import EvalResult, SoundnessError
from fastcert.resume import check_resume
from fastcert.settings import Settings


def check_parallel(settings: Settings, world: int) -> None:
    """What a data-parallel run of ``world`` ranks cannot do: split its share of a batch into
    gradient-accumulation chunks (the ranks' shares differ by up to one example, so their
    chunk counts, hence their BatchNorm all-reduces, could differ)."""
    if world > 1 and settings.optim.grad_acc_steps > 1:
        raise ConfigError(
            f"optim.grad_acc_steps={settings.optim.grad_acc_steps} with {world} data-parallel "
            f"ranks: the ranks already split each batch (memory per rank falls {world}-fold); "
            f"set optim.grad_acc_steps=1")


def run_parallel(settings: Settings, run_dir: Path, resume=None, group: str | None = None,
                 started=None) -> dict:
    """``settings.speed.nproc`` data-parallel ranks of one run, spawned here on as many devices
    leased together from the pool (fastcert.devices; the CPU, with gloo, without CUDA); rank
    0's results. Each rank is a fresh process that runs :func:`fastcert.pipeline.run` on the
    resolved config."""
    cfg, nproc = settings.config, settings.speed.nproc
    # what the ranks would refuse, refused here with its own error (a rank's error reaches
    # this process only as a ProcessRaisedException): the config, the run dir, the resume
    check_parallel(settings, nproc)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    start = check_resume(cfg, resolved, run_dir, resume, torch.device("cpu"))
    if start.done is not None:
        return start.done  # resume.checkpoint=auto on a finished run
    if started is not None and start.first_in(run_dir):
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
    from fastcert.pipeline import run  # the rank's run: this module is the pipeline's helper

    run(OmegaConf.create(cfg), run_dir, resume, ctx.device, group)


def gather_results(part: EvalResult | None) -> EvalResult:
    """Every rank's evaluation of its block of test batches (None: an empty block), as one
    result in test-set order, on every rank (stage times: the slowest rank's)."""
    parts = [p for p in distributed.gather(part) if p is not None]

    def cat(field):
        return {k: torch.cat([getattr(p, field)[k] for p in parts])
                for k in getattr(parts[0], field)}

    return EvalResult(
        eps=parts[0].eps, label=torch.cat([p.label for p in parts]),
        pred=torch.cat([p.pred for p in parts]),
        pgd_robust=torch.cat([p.pgd_robust for p in parts]),
        attack_margin=torch.cat([p.attack_margin for p in parts]),
        verified=cat("verified"), margin_lb=cat("margin_lb"), ran=cat("ran"),
        stage_time_s={k: max(p.stage_time_s[k] for p in parts) for k in parts[0].stage_time_s},
        violations=[v for p in parts for v in p.violations], ties=sum(p.ties for p in parts))
