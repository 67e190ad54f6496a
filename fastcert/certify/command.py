"""The certify command: options checked, the journal's settings checked, the test batches
certified (by this process, a shard of them, or ``workers`` processes), the outputs assembled
from the journal."""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from fastcert import rebuild
from fastcert.certify import outputs
from fastcert.certify.journal import Journal
from fastcert.certify.options import Options, options, settings_of


def certify(cfg: DictConfig, out_dir: str | os.PathLike) -> dict | None:
    """Certify ``cfg.checkpoint`` as ``conf/certify.yaml`` describes into ``out_dir``; returns
    the certify.json dict, or None for a shard whose others have not finished (the last one to
    finish writes the outputs). Nothing is written before the settings are accepted."""
    out_dir = Path(out_dir)
    opts = options(cfg)
    trained = rebuild.load_trained(cfg)
    radii = rebuild.checked_radii(cfg.get("eps"), trained.config)
    seed = int(trained.config.seed) if opts.seed is None else opts.seed
    n_test, batch = test_size(trained)
    settings = settings_of(cfg, opts, trained, seed, n_test, batch)
    journal = Journal(out_dir)
    journal.check_settings(settings)
    journal.start(settings)
    if opts.workers > 1:
        run_workers(cfg, opts, out_dir, opts.workers)
    else:
        certify_shard(cfg, opts, trained, radii, seed, out_dir, opts.shard)
    return assemble(cfg, opts, trained, journal, radii, seed=seed, n_test=n_test, batch=batch)


def test_size(trained) -> tuple[int, int]:
    """(test examples, test batch size) of the rebuilt run, from its config (no data load)."""
    from fastcert.settings import validate

    s = validate(trained.config)
    data = s.data.load(seed=s.seed, device=None)
    return len(data.test.dataset), min(int(data.test.batch_size), len(data.test.dataset))


# --------------------------------------------------------------------------- the work


@dataclass
class OneBatch:
    """Test batch ``first_batch`` as a loader of one batch (for
    :func:`fastcert.evaluate.evaluate`, which seeds the attack by the batch's number)."""

    x: object
    y: object
    first_batch: int
    batch_size: int

    def __iter__(self):
        yield self.x, self.y


class AlphaDeadline:
    """auto_LiRPA's ``stop_criterion_func`` for α-CROWN's per-example time limit: stop the
    slope optimisation once ``seconds`` × (examples in the call) have passed since its first
    iteration (the best bounds so far are kept: every α gives a sound bound)."""

    def __init__(self, seconds: float):
        self.seconds, self.t0 = seconds, None

    def reset(self) -> None:
        self.t0 = None

    def __call__(self, lower) -> bool:
        if self.t0 is None:
            self.t0 = time.perf_counter()
        return time.perf_counter() - self.t0 > self.seconds * lower.shape[0]


def certify_shard(cfg: DictConfig, opts: Options, trained, radii: list[float], seed: int,
                  out_dir: Path, shard: tuple[int, int] | None, shared: bool = False) -> None:
    """Certify the test batches b with b ≡ i (mod n) (every batch without ``shard``) at each
    radius, skipping what the journal holds; each batch and each complete-stage verdict is
    journaled when decided (with ``shared``, the complete stage waits for every batch, see
    ``Work.complete_shared``)."""
    from fastcert import devices

    held_before = devices.held_device() is not None
    device = devices.acquire_device(str(cfg.get("device", "auto")), cfg.get("devices"))
    journal = Journal(out_dir)
    try:
        work = Work(opts, trained, device, seed, out_dir, journal, shared)
        for eps in radii:
            work.at(eps, shard or (0, 1))
    finally:
        journal.close()
        if not held_before:
            devices.release_device()


class Work:
    """The model, data, complete stage and journal of one certifying process."""

    def __init__(self, opts: Options, trained, device, seed: int, out_dir: Path,
                 journal: Journal, shared: bool = False):
        built = rebuild.build_trained(trained, device)
        self.net, self.data = built.net, built.data
        self.net.eval()
        bound_args = dict(opts.alpha_opts)
        self.deadline = None
        if opts.alpha_timeout is not None:
            self.deadline = AlphaDeadline(opts.alpha_timeout)
            bound_args["stop_criterion_func"] = self.deadline
        self.net.bounded.set_bound_opts({"optimize_bound_args": bound_args})
        dataset = self.data.test.dataset
        self.indices = [int(i) for i in getattr(dataset, "indices", range(len(dataset)))]
        self.opts, self.device, self.seed, self.journal = opts, device, seed, journal
        self.shared = shared  # one of workers=N running together: complete stage dealt out
        self.complete = None
        if opts.complete is not None:
            import copy

            # the engine reads the ONNX of, and the replay runs, a CPU copy of the model
            cpu_model = copy.deepcopy(self.net.model).cpu().eval()
            self.complete = _complete_stage(opts.complete, out_dir, cpu_model, self.data)

    def at(self, eps: float, shard: tuple[int, int]) -> None:
        from fastcert.certify.progress import Progress

        done = self.journal.at(eps)
        batch_size = int(self.data.test.batch_size)
        mine = [b for b in range(len(self.data.test)) if b % shard[1] == shard[0]]
        total = sum(min(batch_size, len(self.indices) - b * batch_size) for b in mine)
        with Progress(eps, total, self.opts.progress, position=shard[0]) as bar:
            for b, (x, y) in enumerate(self.data.test):
                if b % shard[1] != shard[0]:
                    continue
                lower, upper = self.data.eps_box(x, eps)
                rec = done["batches"].get(b) or self.batch(eps, b, x, y, lower, upper)
                bar.batch(rec["rows"])
                if self.complete is not None and not self.shared:
                    for k, row in enumerate(rec["rows"]):
                        if self.wanted(row):
                            self.complete_one(row, lower[k], upper[k], done["complete"], bar)
            if self.complete is not None and self.shared:
                self.complete_shared(eps, shard, bar)

    def wanted(self, row: dict) -> bool:
        """Whether the complete stage runs on the example: clean-correct and undecided
        (with ``cascade=false``: every clean-correct example)."""
        return row["clean_correct"] == 1 and (row["verdict"] == "unknown"
                                              or not self.opts.cascade)

    def complete_one(self, row: dict, lower, upper, done: dict, bar) -> None:
        rec = done.get(int(row["index"]))
        if rec is None:
            bar.engine_started(row["index"])
            rec = self.complete.decide(row, lower, upper)
            self.journal.append(rec)
        bar.complete(rec["verdict"])

    def complete_shared(self, eps: float, shard: tuple[int, int], bar) -> None:
        """``workers=N``: once every worker journaled its batches, the examples for the
        complete stage are dealt round-robin (the k-th to worker k mod N), so that the
        engine's time is shared evenly whichever batches hold them."""
        n_batches = len(self.data.test)
        at = self.journal.at(eps)
        while len(at["batches"]) < n_batches:
            time.sleep(2.0)
            at = self.journal.at(eps)
        wanted = [(b, k) for b in range(n_batches)
                  for k, row in enumerate(at["batches"][b]["rows"]) if self.wanted(row)]
        mine = [bk for pos, bk in enumerate(wanted) if pos % shard[1] == shard[0]]
        for b, (x, _) in enumerate(self.data.test):
            ks = [k for bb, k in mine if bb == b]
            if ks:
                lower, upper = self.data.eps_box(x, eps)
                for k in ks:
                    self.complete_one(at["batches"][b]["rows"][k], lower[k], upper[k],
                                      at["complete"], bar)

    def batch(self, eps: float, b: int, x, y, lower, upper) -> dict:
        """Attack and incomplete cascade on test batch ``b``; its journal record."""
        from fastcert.evaluate import evaluate

        if self.deadline is not None:
            self.deadline.reset()
        result = evaluate(self.net, OneBatch(x, y, b, int(self.data.test.batch_size)),
                          self.data.eps_box, eps, verifiers=self.opts.verifiers,
                          pgd=self.opts.attack, device=self.device, seed=self.seed,
                          cascade=self.opts.cascade, indices=self.indices,
                          memory_gb=self.opts.memory_gb)
        start = b * int(self.data.test.batch_size)
        rows = outputs.batch_rows(result, self.indices[start:start + len(y)])
        rec = {"kind": "batch", "eps": eps, "batch": b, "rows": rows,
               "times": result.stage_time_s, "violations": result.violations,
               "ties": result.ties, "tightness": self.tightness(x, y, lower, upper)}
        self.journal.append(rec)
        return rec

    def tightness(self, x, y, lower, upper) -> list[float] | str:
        """[Σ τ, count] of the batch (:mod:`fastcert.tightness`), or why it could not run."""
        import torch

        from fastcert.tightness import propagation_tightness

        try:
            tau = propagation_tightness(self.net.model, x.to(self.device), y.to(self.device),
                                        lower.to(self.device), upper.to(self.device),
                                        self.data.num_classes)
        except (TypeError, torch.OutOfMemoryError) as e:  # a layer it has no rule for; memory
            return f"{type(e).__name__}: {e}"
        return [tau.sum().item(), tau.numel()]


def _complete_stage(section: dict, out_dir: Path, model, data):
    from fastcert.certify.complete_stage import CompleteStage
    from fastcert.complete.engine import Limits, make_engine

    name = section["engine"]
    engine = make_engine(name, section.get(name) or {})
    limits = Limits(section["timeout_s"], section["memory_gb"],
                    float(section.get("grace_s", 60.0)))
    return CompleteStage(engine, limits, out_dir, model, data)


# --------------------------------------------------------------------------- workers


def _worker(cfg_yaml: str, out_dir: str, i: int, n: int) -> None:
    import torch

    from fastcert import resolvers
    from fastcert.cli import quiet_known_warnings

    quiet_known_warnings()
    resolvers.register()
    cfg = OmegaConf.create(cfg_yaml)
    threads = int(cfg.get("cpu_threads", 1))
    if threads:
        torch.set_num_threads(threads)
    opts = options(cfg)
    trained = rebuild.load_trained(cfg)
    radii = rebuild.checked_radii(cfg.get("eps"), trained.config)
    seed = int(trained.config.seed) if opts.seed is None else opts.seed
    certify_shard(cfg, opts, trained, radii, seed, Path(out_dir), (i, n), shared=True)


def run_workers(cfg: DictConfig, opts: Options, out_dir: Path, n: int) -> None:
    """Shards 0/n … n-1/n in n processes (spawned: each builds its own model, takes its own
    device from the pool, runs its own engine subprocesses); a failed worker is an error."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    # each worker: one process's share of the memory budget, resolved here once
    share = {"workers": 1, "memory_gb": opts.memory_gb}
    if opts.complete is not None:
        share["complete"] = {"memory_gb": opts.complete["memory_gb"]}
    one = OmegaConf.to_yaml(OmegaConf.merge(cfg, share), resolve=True)
    procs = [ctx.Process(target=_worker, args=(one, str(out_dir), i, n)) for i in range(n)]
    for p in procs:
        p.start()
    try:  # a failed worker stops the others (they may wait for its batches)
        while any(p.is_alive() for p in procs) and not any(p.exitcode for p in procs):
            time.sleep(0.5)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    failed = [i for i, p in enumerate(procs) if p.exitcode != 0]
    if failed:
        raise RuntimeError(f"certify worker(s) {failed} of {n} failed (exit codes "
                           f"{[procs[i].exitcode for i in failed]}); rerun the same command "
                           f"to resume from the journal")


# --------------------------------------------------------------------------- outputs


def assemble(cfg: DictConfig, opts: Options, trained, journal: Journal, radii: list[float],
             **info) -> dict | None:
    """certify.json and certify.csv from the journal, at every radius it holds completely
    (earlier certifies' radii included); None while a radius of this certify lacks batches
    (other shards still running)."""
    from fastcert.checkpoint import write_text_atomic

    n_batches = -(-info["n_test"] // info["batch"])
    entries, rows, missing = [], [], []
    for key, at in sorted(journal.read().items(), key=lambda kv: float(kv[0])):
        eps_rows = eps_entry_rows(at, opts, n_batches)
        if eps_rows is None:
            missing.append(float(key))
            continue
        entries.append(eps_entry(at, eps_rows, opts))
        rows += eps_rows
    if any(e in missing for e in radii) or not entries:
        print(f"shard done; eps {missing} still lack other shards' batches in "
              f"{journal.dir} (the last shard to finish writes certify.json)", flush=True)
        return None
    out_dir = journal.dir.parent
    summary = _summary(cfg, trained, opts, entries, **info)
    write_text_atomic(out_dir / "certify.json", json.dumps(summary, indent=2) + "\n")
    write_text_atomic(out_dir / "certify.csv", outputs.csv_text(rows))
    print(outputs.format_table(summary), flush=True)
    print(f"wrote {out_dir / 'certify.json'} and {out_dir / 'certify.csv'}", flush=True)
    _raise_on_violations(entries, out_dir)
    return summary


def eps_entry_rows(at: dict, opts: Options, n_batches: int) -> list[dict] | None:
    """One radius's rows with the complete stage applied, or None when incomplete."""
    if sorted(at["batches"]) != list(range(n_batches)):
        return None
    rows = [r for b in range(n_batches) for r in at["batches"][b]["rows"]]
    if opts.complete is None:
        return rows
    out = []
    for r in rows:
        rec = at["complete"].get(int(r["index"]))
        wanted = r["clean_correct"] == 1 and (r["verdict"] == "unknown" or not opts.cascade)
        if wanted and rec is None:
            return None
        out.append(outputs.apply_complete(r, rec) if wanted else r)
    return out


def eps_entry(at: dict, rows: list[dict], opts: Options) -> dict:
    batches = at["batches"].values()
    times: dict[str, float] = {}
    for rec in batches:
        for k, t in rec["times"].items():
            times[k] = times.get(k, 0.0) + t
    entry = outputs.summarize(rows, opts.verifiers, opts.cascade, opts.complete is not None,
                              times)
    tau = [rec["tightness"] for rec in batches]
    ok = [t for t in tau if isinstance(t, list)]
    entry["tightness"] = (sum(t[0] for t in ok) / max(sum(t[1] for t in ok), 1)
                          if len(ok) == len(tau) else None)
    failed = [t for t in tau if not isinstance(t, list)]
    if failed:  # why τ could not be computed (moved to certify.json's skipped)
        entry["tightness_skipped"] = failed[0]
    entry["ties"] = sum(rec["ties"] for rec in batches)
    entry["violations"] = [v for rec in sorted(batches, key=lambda r: r["batch"])
                           for v in rec["violations"]]
    entry["violations"] += [{"eps": rec["eps"], "index": rec["index"], "verifier": "complete",
                             "why": rec["violation"]}
                            for _, rec in sorted(at["complete"].items()) if "violation" in rec]
    entry["time_s"] = sum(s["time_s"] for s in entry["stages"])
    return entry


def _summary(cfg: DictConfig, trained, opts: Options, results: list[dict], *, seed: int,
             n_test: int, batch: int) -> dict:
    """certify.json."""
    from fastcert.config import parse_number
    from fastcert.evaluate import CASCADE

    run_cfg = trained.config
    skipped = {}
    for r in results:
        reason = r.pop("tightness_skipped", None)
        if r["tightness"] is None:
            skipped["tightness"] = f"not computed at eps={r['eps']}: {reason}"
    complete = None
    if opts.complete is not None:
        c = opts.complete
        complete = {"engine": c["engine"], "version": c["version"],
                    "timeout_s": c["timeout_s"], "memory_gb": c["memory_gb"]}
    return {
        "checkpoint": str(trained.path.resolve()),
        "config_source": trained.source,
        "epoch": trained.state.get("epoch"),
        "run": {"method": run_cfg.method.name, "model": run_cfg.model.name,
                "data": run_cfg.data.name, "init": run_cfg.init.name, "seed": int(run_cfg.seed),
                "train_eps": parse_number(run_cfg.eps, "eps")},
        "n_test": n_test,
        "batch_size": batch,
        "seed": seed,
        "attack": {"description": opts.attack.description,
                   **OmegaConf.to_container(cfg.attack, resolve=True)},
        "cascade": opts.cascade,
        "verifiers": ([v for v in CASCADE if v in opts.verifiers] if opts.cascade
                      else list(opts.verifiers)),
        "alpha_crown": OmegaConf.to_container(cfg.alpha_crown, resolve=True),
        "complete": complete,
        "skipped": skipped,
        "timing_fields": list(outputs.TIMING_FIELDS),
        "results": results,
    }


def _raise_on_violations(results: list[dict], out_dir: Path) -> None:
    """A soundness violation (already recorded in certify.json) raised as SoundnessError."""
    violations = [v for r in results for v in r["violations"]]
    if violations:
        from fastcert.evaluate import SoundnessError

        v = violations[0]
        what = v.get("why") or (
            f"{v['verifier']}-verified (margin lower bound {v['margin_lb']:.6g}) but the "
            f"attack found margin {v['attack_margin']:.6g}")
        raise SoundnessError(
            f"{len(violations)} soundness violation(s), recorded in {out_dir / 'certify.json'}"
            f"; e.g. eps={v['eps']} test example {v['index']}: {what}: the verifier is "
            f"unsound or the attack left the box")


# --------------------------------------------------------------------------- command line


@hydra.main(version_base="1.3", config_path="../conf", config_name="certify")
def main(cfg: DictConfig):
    from hydra.core.hydra_config import HydraConfig

    from fastcert.cli import exit_on_known_errors

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    with exit_on_known_errors():
        certify(cfg, out_dir)
        write_hydra_dir(out_dir, cfg)


def write_hydra_dir(out_dir: Path, cfg: DictConfig) -> None:
    """``.hydra/`` (config, hydra, overrides) of this certify, once it ran."""
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    out = out_dir / ".hydra"
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    (out / "hydra.yaml").write_text(OmegaConf.to_yaml({"hydra": hydra_cfg}))
    (out / "overrides.yaml").write_text(OmegaConf.to_yaml(hydra_cfg.overrides.task))


def cli() -> None:
    """``fastcert-certify`` (the console script) and ``python -m fastcert.certify``: a missing or
    mistyped ``checkpoint=`` is refused in one line (exit 2) before Hydra starts; a refused
    certify leaves no directory it created."""
    from fastcert import rundir
    from fastcert.cli import checkpoint_command

    created = []

    def guarded():
        if not any(a.startswith("-") for a in sys.argv[1:]):  # a flag: Hydra's own handling
            created.extend(rundir.create(run_dir_of(sys.argv[1:])))
        main()

    try:
        checkpoint_command(guarded, "fastcert.certify")
    except SystemExit as e:
        if e.code not in (0, None, 3):
            rundir.release(created)
        raise


def run_dir_of(argv: list[str]) -> Path:
    """The dir certify writes into: ``hydra.run.dir=`` if given, else ``<checkpoint
    dir>/certify``."""
    given = [a.split("=", 1)[1] for a in argv if a.startswith("hydra.run.dir=")]
    if given:
        return Path(given[-1])
    checkpoint = next(a.split("=", 1)[1] for a in argv if a.startswith("checkpoint="))
    from fastcert.resolvers import checkpoint_dir

    return Path(checkpoint_dir(checkpoint)) / "certify"
