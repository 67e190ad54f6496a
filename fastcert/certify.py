"""``python -m fastcert.certify checkpoint=PATH [eps=[0.05,0.1,0.2]] [pgd.steps=200] ...``

Re-evaluates a trained checkpoint on the test split at one or more radii ε (pixel units; by default
the run's test radius ``eval.eps``, else its training ``eps``):

* clean accuracy; PGD accuracy (Madry et al. 2018; 200 steps by default, as the evaluation of
  Zhang et al. 2020), inside the same clipped box the verifiers bound;
* verified accuracy by IBP (Gowal et al. 2018), CROWN-IBP (Zhang et al. 2020) and CROWN
  (Zhang et al. 2018): an example is verified when every margin lower bound
  m̲_j = lower bound of [f(x')]_y - [f(x')]_j over the box is > 0 (Eq. 2 of Shi et al. 2021);
* "verified by any" of the verifiers that ran.

Everything is measured by :func:`fastcert.evaluate.evaluate` through one
:class:`fastcert.bounds.BoundedNet` in eval mode, which enforces per example
verified ⇒ PGD-robust ⇒ clean-correct (a violation raises ``SoundnessError``).

The run is rebuilt from its own config: ``<checkpoint dir>/.hydra/config.yaml`` when it exists
(the config Hydra saved at launch), else the checkpoint's ``"config"`` entry (the resolved
config :func:`fastcert.pipeline.run` stores). Model, data and init come from
:func:`fastcert.pipeline.build`, then the checkpoint's weights (and BatchNorm statistics) are
copied in place with ``net.model.load_state_dict`` so the BoundedNet's tied views see them.

Full CROWN is skipped (``null`` in the outputs, with a printed note) when its estimated size
``B·(Σ_i n_i + K)·max(d_in, max_i n_i)`` (see :func:`fastcert.diagnostics.crown_cost`) exceeds
``crown_max_elements``: B the test batch, n_i the ReLU layer sizes, K the classes.

Outputs, in the Hydra output dir (default ``<checkpoint dir>/certify/``):

* ``certify.json`` — settings and, per ε, the fractions clean, pgd, ibp, crown_ibp, crown, any,
  and the mean propagation tightness τ over the test set (:mod:`fastcert.tightness`);
* ``certify.csv`` — one row per test example per ε: eps, index (in the full test set), label,
  prediction, clean_correct, pgd_robust, and per verifier ``<v>_verified`` (0/1) and
  ``<v>_margin_lb`` (min_j m̲_j); empty cells for a skipped verifier.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

# torch, auto_LiRPA and the rest of fastcert are imported inside the functions that need
# them, so that a mistyped command line fails in a second, not after ~10 s of imports.

SUMMARY_KEYS = ("clean", "pgd", "ibp", "crown_ibp", "crown", "alpha_crown", "any")
HYDRA_CONFIG = Path(".hydra") / "config.yaml"


def _checkpoint_dir(path) -> str:
    """Resolver for hydra.run.dir: the folder of an existing checkpoint file. Raising here
    stops Hydra before it creates output folders for a mistyped path."""
    p = Path(str(path))
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    return str(p.resolve().parent)


if not OmegaConf.has_resolver("fastcert_checkpoint_dir"):
    OmegaConf.register_new_resolver("fastcert_checkpoint_dir", _checkpoint_dir)


# --------------------------------------------------------------------------- run config


def load_run_config(checkpoint_path: str | os.PathLike, state: dict) -> tuple[DictConfig, str]:
    """The training run's config and where it came from (a path or ``"checkpoint"``).

    Prefers ``<checkpoint dir>/.hydra/config.yaml``; falls back to ``state["config"]`` when
    that file is absent or cannot be resolved outside Hydra. Raises ``CheckpointError`` when
    neither exists.
    """
    from fastcert import checkpoint as ckpt

    path = Path(checkpoint_path)
    hydra_cfg = path.parent / HYDRA_CONFIG
    if hydra_cfg.is_file():
        try:
            cfg = OmegaConf.load(hydra_cfg)
            OmegaConf.resolve(cfg)
            return cfg, str(hydra_cfg)
        except OmegaConfBaseException as e:
            if not state.get("config"):
                raise ckpt.CheckpointError(
                    f"{hydra_cfg} cannot be resolved ({e}) and checkpoint {path} holds no "
                    f"'config' entry") from e
            print(f"note: {hydra_cfg} cannot be resolved ({e}); using the checkpoint's config")
    if not state.get("config"):
        raise ckpt.CheckpointError(
            f"checkpoint {path} holds no 'config' entry and there is no {hydra_cfg}: cannot "
            f"rebuild the model and data it was trained on")
    return OmegaConf.create(state["config"]), "checkpoint"


def _eps_list(value, default) -> list[float]:
    from fastcert.config import parse_number

    if value is None:
        return [parse_number(default, "eps")]
    if isinstance(value, (int, float, str)):
        return [parse_number(value, "eps")]
    return [parse_number(v, "eps") for v in value]


def _pgd_config(cfg):
    from fastcert.attacks import PGDConfig
    from fastcert.config import ConfigError

    steps = int(cfg.pgd.steps)
    step_size = cfg.pgd.get("step_size")
    if step_size is None:
        step_size = 2.5 / max(steps, 1)  # Madry et al. 2018: step 2.5·ε/steps
    try:
        return PGDConfig(steps=steps, restarts=int(cfg.pgd.restarts), step_size=float(step_size))
    except ValueError as e:
        raise ConfigError(f"pgd: {e}") from e


def _apply_data_overrides(run_cfg: DictConfig, cfg: DictConfig) -> DictConfig:
    run_cfg = run_cfg.copy()
    OmegaConf.set_struct(run_cfg, False)
    overrides = list(cfg.get("run_overrides") or [])
    if overrides:
        run_cfg = OmegaConf.merge(run_cfg, OmegaConf.from_dotlist(overrides))
    limit = cfg.get("limit_test")
    if limit is not None:
        run_cfg.data.limit_test = None if str(limit).lower() == "all" else int(limit)
    if cfg.get("batch_size") is not None:
        run_cfg.data.test_batch_size = int(cfg.batch_size)
    # how this machine runs, not what was trained: certify's own settings
    run_cfg.cpu_threads = int(cfg.get("cpu_threads", 0) or 0)
    run_cfg.device = str(cfg.get("device", "auto"))
    run_cfg.devices = cfg.get("devices")
    return run_cfg


# --------------------------------------------------------------------------- outputs


def summarize(result, verifiers: list[str]) -> dict:
    """Fractions of the test set (an :class:`fastcert.evaluate.EvalResult`): clean, pgd, one
    per verifier of :data:`SUMMARY_KEYS` (None for a verifier that did not run), and any."""
    from fastcert.bounds import Bound

    n = max(len(result.label), 1)
    out = {"eps": result.eps, "clean": result.clean_correct.sum().item() / n,
           "pgd": result.pgd_robust.sum().item() / n}
    for v in (b.key for b in Bound):
        out[v] = result.verified[v].sum().item() / n if v in result.verified else None
    out["any"] = result.verified_any.sum().item() / n if verifiers else None
    return out


def csv_rows(result, indices: list[int]) -> list[dict]:
    """One dict per test example (columns of certify.csv)."""
    from fastcert.bounds import Bound

    rows = []
    for i in range(len(result.label)):
        row = {"eps": result.eps, "index": indices[i], "label": int(result.label[i]),
               "prediction": int(result.pred[i]),
               "clean_correct": int(result.pred[i] == result.label[i]),
               "pgd_robust": int(result.pgd_robust[i])}
        for v in (b.key for b in Bound):
            if v in result.verified:
                row[f"{v}_verified"] = int(result.verified[v][i])
                row[f"{v}_margin_lb"] = f"{result.margin_lb[v][i].item():.9g}"
            else:
                row[f"{v}_verified"] = ""
                row[f"{v}_margin_lb"] = ""
        rows.append(row)
    return rows


def csv_columns() -> list[str]:
    from fastcert.bounds import Bound

    return (["eps", "index", "label", "prediction", "clean_correct", "pgd_robust"]
            + [f"{b.key}_{k}" for b in Bound for k in ("verified", "margin_lb")])


def _csv_text(rows: list[dict]) -> str:
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=csv_columns())
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def format_table(summary: dict) -> str:
    """Per-ε table of the accuracies in percent; ``skipped`` for a verifier that did not run."""
    names = {"clean": "clean", "pgd": "PGD", "ibp": "IBP", "crown_ibp": "CROWN-IBP",
             "crown": "CROWN", "alpha_crown": "α-CROWN", "any": "any"}
    run = summary["run"]
    head = (f"{run['method']} | {run['model']} | {run['data']} | epoch {summary['epoch']} | "
            f"{summary['n_test']} test examples | PGD {summary['pgd']['steps']} steps x "
            f"{summary['pgd']['restarts']}")
    cols = ["eps"] + [names[k] for k in SUMMARY_KEYS]
    widths = [max(8, len(c)) for c in cols]
    lines = [head, "  ".join(c.rjust(w) for c, w in zip(cols, widths))]
    for r in summary["results"]:
        cells = [f"{r['eps']:.4g}"] + [
            "skipped" if r[k] is None else f"{100 * r[k]:.2f}%" for k in SUMMARY_KEYS]
        lines.append("  ".join(c.rjust(w) for c, w in zip(cells, widths)))
    for r in summary["results"]:
        if r.get("tightness") is not None:
            lines.append(f"propagation tightness at eps={r['eps']:.4g}: {r['tightness']:.4g}")
    for v, why in summary["skipped"].items():
        lines.append(f"{v} skipped: {why}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the command


def certify(cfg: DictConfig, out_dir: str | os.PathLike) -> dict:
    """Certify ``cfg.checkpoint`` as ``conf/certify.yaml`` describes; write certify.json and
    certify.csv into ``out_dir`` and return the certify.json dict.

    ``device=auto`` takes a free GPU of the node's pool (:mod:`fastcert.devices`), released
    when certify returns unless this process already held one, or the CPU.
    """
    from fastcert import devices
    from fastcert.pipeline import resolve_device

    held_before = devices.held_device() is not None
    device = resolve_device(str(cfg.get("device", "auto")), cfg.get("devices"))
    try:
        return _certify(cfg, Path(out_dir), device)
    finally:
        if not held_before:
            devices.release_device()


def _certify(cfg: DictConfig, out_dir: Path, device) -> dict:
    from tqdm.auto import tqdm

    from fastcert import checkpoint as ckpt
    from fastcert.bounds import Bound
    from fastcert.config import ConfigError, parse_number
    from fastcert.diagnostics import crown_cost, relu_sizes
    from fastcert.evaluate import evaluate
    from fastcert.pipeline import build, check_eps
    from fastcert.tightness import mean_tightness

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = Path(str(cfg.checkpoint))
    state = ckpt.load(path, map_location="cpu")
    run_cfg, source = load_run_config(path, state)
    if source != "checkpoint" and state.get("config"):
        saved = OmegaConf.create(state["config"])
        for key in ("model", "data.name", "seed"):
            if OmegaConf.select(saved, key) != OmegaConf.select(run_cfg, key):
                print(f"note: {key} differs between {source} and the checkpoint's config; "
                      f"using {source}")
    run_cfg = _apply_data_overrides(run_cfg, cfg)

    try:
        verifiers = [Bound.parse(v).key for v in cfg.verifiers]
    except ValueError as e:
        raise ConfigError(f"verifiers: {e}") from None
    pgd = _pgd_config(cfg)
    test_eps = OmegaConf.select(run_cfg, "eval.eps")  # the run's test radius, else its training one
    eps_list = _eps_list(cfg.get("eps"), run_cfg.eps if test_eps is None else test_eps)
    for e in eps_list:
        check_eps(e, parse_number(run_cfg.data.eps_max, "data.eps_max"))
    seed = int(run_cfg.seed if cfg.get("seed") is None else cfg.seed)

    built = build(run_cfg, device)
    net, data = built.net, built.data
    try:
        net.model.load_state_dict(state["model"])  # copies in place: the tied views stay tied
    except RuntimeError as e:
        raise ckpt.CheckpointError(
            f"checkpoint {path}: its weights do not fit the model rebuilt from {source} "
            f"({e})") from e
    net.eval()

    dataset = data.test.dataset
    n_test = len(dataset)
    indices = [int(i) for i in getattr(dataset, "indices", range(n_test))]
    batch = min(int(data.test.batch_size), n_test)
    skipped: dict[str, str] = {}
    if "crown" in verifiers:
        sizes = relu_sizes(net.model, data.input_shape)
        d_in = math.prod(data.input_shape)
        cost = crown_cost(sizes, d_in, data.num_classes, batch)
        budget = float(cfg.crown_max_elements)
        if cost > budget:
            fit = int(budget // max(crown_cost(sizes, d_in, data.num_classes, 1), 1))
            hint = (f"run with batch_size={fit} or less" if fit >= 1
                    else "the model is too large for CROWN even one example at a time")
            skipped["crown"] = (f"estimated size B*(relu neurons + classes)*max width = "
                                f"{batch}*({sum(sizes)}+{data.num_classes})*"
                                f"{max([d_in] + sizes)} = {cost:.3g} > crown_max_elements="
                                f"{budget:.3g} (~{4 * cost / 2**30:.1f} GiB); {hint}, or raise "
                                f"crown_max_elements")
            print(f"note: CROWN skipped: {skipped['crown']}", flush=True)
            verifiers.remove("crown")

    results, rows = [], []
    for eps in eps_list:
        t0 = time.perf_counter()
        bar = tqdm(total=n_test, desc=f"certify eps={eps:.4g}", disable=not cfg.get("progress",
                                                                                   True),
                   dynamic_ncols=True, mininterval=1.0)
        try:
            result = evaluate(net, data.test, data.eps_box, eps, verifiers=verifiers, pgd=pgd,
                              device=device, seed=seed, progress=bar.update)
        finally:
            bar.close()
        tau = mean_tightness(net.model, data.test, data.eps_box, eps, data.num_classes, device)
        results.append({**summarize(result, verifiers), "tightness": tau,
                        "time_s": time.perf_counter() - t0})
        rows += csv_rows(result, indices)

    summary = {
        "checkpoint": str(path.resolve()),
        "config_source": source,
        "epoch": state.get("epoch"),
        "run": {"method": run_cfg.method.name, "model": run_cfg.model.name,
                "data": run_cfg.data.name, "init": run_cfg.init.name, "seed": int(run_cfg.seed),
                "train_eps": parse_number(run_cfg.eps, "eps")},
        "n_test": n_test,
        "batch_size": batch,
        "device": str(device),
        "seed": seed,
        "pgd": {"steps": pgd.steps, "restarts": pgd.restarts, "step_size": pgd.step_size},
        "verifiers": verifiers,
        "skipped": skipped,
        "results": results,
    }
    ckpt.write_text_atomic(out_dir / "certify.json", json.dumps(summary, indent=2) + "\n")
    ckpt.write_text_atomic(out_dir / "certify.csv", _csv_text(rows))
    print(format_table(summary), flush=True)
    print(f"wrote {out_dir / 'certify.json'} and {out_dir / 'certify.csv'}", flush=True)
    return summary


def _precheck(argv: list[str]) -> str | None:
    """A one-line error for a missing or mistyped ``checkpoint=`` before Hydra starts (which
    would otherwise print a long traceback from resolving hydra.run.dir). Only plain
    overrides are checked: any flag (``--help``, ``-m``, ``--cfg``...) skips it."""
    if any(a.startswith("-") for a in argv):
        return None
    values = [a.split("=", 1)[1] for a in argv if a.startswith("checkpoint=")]
    if not values:
        return "missing checkpoint=PATH (usage: python -m fastcert.certify checkpoint=PATH ...)"
    v = values[-1]
    if "," in v or "$" in v or Path(v).is_file():
        return None
    return f"checkpoint {v} does not exist"


@hydra.main(version_base="1.3", config_path="../conf", config_name="certify")
def main(cfg: DictConfig):
    from hydra.core.hydra_config import HydraConfig

    certify(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    import sys

    problem = _precheck(sys.argv[1:])
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    main()
