"""``python -m fastcert.certify checkpoint=PATH [eps=[0.05,0.1,0.2]] [attack=pgd] ...``

Re-evaluates a trained checkpoint on the test split at one or more radii ε (pixel units; by default
the run's test radius ``eval.eps``, else its training ``eps``):

* clean accuracy;
* attacked accuracy ("pgd") under certify's strong default attack
  (:class:`fastcert.attacks.StrongAttack`: APGD with margin, CE and targeted losses, then
  small-step PGD-CE restarts; ``attack=pgd`` selects plain PGD), inside the same clipped box
  the verifiers bound: an upper bound of the robust accuracy;
* verified accuracy by a cascade IBP (Gowal et al. 2018) → CROWN-IBP (Zhang et al. 2020) →
  CROWN (Zhang et al. 2018) → α-CROWN (Xu et al. 2021, auto_LiRPA's ``CROWN-Optimized``):
  each stage runs only on the examples still undecided (clean-correct, not broken by the
  attack, not verified by an earlier stage). An example is verified when every margin lower
  bound m̲_j = lower bound of [f(x')]_y - [f(x')]_j over the box is > 0 (Eq. 2 of Shi et al.
  2021). With ``cascade=false`` every verifier runs on every example instead (each
  verifier's own accuracy, and the soundness check on every example; slower).

Everything is measured by :func:`fastcert.evaluate.evaluate` through one
:class:`fastcert.bounds.BoundedNet` in eval mode, which checks per example verified ⇒
attack-robust ⇒ clean-correct; a violation beyond the float tie tolerance is recorded in
certify.json and certify.csv, which are written first, and then raised as ``SoundnessError``
(the command exits non-zero).

The run is rebuilt from the config that trained the checkpoint: the checkpoint's ``"config"``
entry (written with its weights), else, for checkpoints without one,
``<checkpoint dir>/.hydra/config.yaml``. Model, data and init come from
:func:`fastcert.pipeline.build`, then the checkpoint's weights (and BatchNorm statistics) are
copied in place with ``net.model.load_state_dict`` so the BoundedNet's tied views see them.

CROWN and α-CROWN are skipped (``null`` in the outputs, with a printed note) when CROWN's
estimated size ``B·(Σ_i n_i + K)·max(d_in, max_i n_i)`` (see
:func:`fastcert.diagnostics.crown_cost`) exceeds ``crown_max_elements``: B the test batch, n_i
the ReLU layer sizes, K the classes.

Outputs, in the Hydra output dir (default ``<checkpoint dir>/certify/``):

* ``certify.json`` — settings and, per ε: the fractions clean, pgd, one per verifier and any,
  where with the cascade a verifier's fraction counts the examples verified by it *or an
  earlier stage* (so ``alpha_crown`` = ``any`` when it ran last); ``stages``: per stage the
  examples it ran on, those it verified, and its time (``attack`` first); ``ties``,
  ``violations``, and the mean propagation tightness τ over the test set
  (:mod:`fastcert.tightness`);
* ``certify.csv`` — one row per test example per ε: eps, index (in the full test set), label,
  prediction, clean_correct, pgd_robust, attack_margin (the smallest margin the attack saw),
  verdict (``verified`` / ``broken`` / ``misclassified`` / ``unknown``), decided_by (the
  verifier that verified it, ``attack`` or ``clean``; empty when unknown), and per verifier
  ``<v>_verified`` (0/1) and ``<v>_margin_lb`` (min_j m̲_j). A verifier's two cells are empty
  where it did not run on the example: with the cascade, because the example was decided
  before that stage (see decided_by); or because the verifier was skipped altogether.
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
#: Keys whose difference between .hydra/config.yaml and the checkpoint's config is reported.
IDENTITY_KEYS = ("model", "data", "method", "seed", "eps")


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


def _eps_list(value, default) -> list[float]:
    from fastcert.config import parse_number

    if value is None:
        return [parse_number(default, "eps")]
    if isinstance(value, (int, float, str)):
        return [parse_number(value, "eps")]
    return [parse_number(v, "eps") for v in value]


def _attack(cfg):
    """The attack node (``conf/attack/<name>.yaml``), checked and built."""
    from fastcert.config import instantiate

    return instantiate(cfg.attack, "attack")


def _positive(value, key: str) -> int:
    from fastcert.config import ConfigError, coerce

    n = coerce(value, int, key)
    if n < 1:
        raise ConfigError(f"{key}={n}: must be a positive integer")
    return n


def _apply_data_overrides(run_cfg: DictConfig, cfg: DictConfig) -> DictConfig:
    """The run's config with certify's / export's own data and machine settings, each checked
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
                                   else _positive(limit, "limit_test"))
    if cfg.get("batch_size") is not None:
        run_cfg.data.test_batch_size = _positive(cfg.batch_size, "batch_size")
    # how this machine runs, not what was trained: certify's own settings
    run_cfg.cpu_threads = coerce(cfg.get("cpu_threads", 0) or 0, int, "cpu_threads")
    run_cfg.device = str(cfg.get("device", "auto"))
    run_cfg.devices = cfg.get("devices")
    return run_cfg


# --------------------------------------------------------------------------- outputs


def summarize(result, verifiers: list[str], cascade: bool) -> dict:
    """Fractions of the test set (an :class:`fastcert.evaluate.EvalResult`): clean, pgd, one
    per verifier of :data:`SUMMARY_KEYS` (None for a verifier that did not run; with the
    cascade, verified by it or an earlier stage), any; and per stage its counts and time."""
    import torch

    from fastcert.bounds import Bound

    n = max(len(result.label), 1)
    out = {"eps": result.eps, "clean": result.clean_correct.sum().item() / n,
           "pgd": result.pgd_robust.sum().item() / n}
    so_far = torch.zeros_like(result.label, dtype=torch.bool)
    for v in (b.key for b in Bound):
        if v not in result.verified:
            out[v] = None
            continue
        so_far = so_far | result.verified[v]
        out[v] = (so_far if cascade else result.verified[v]).sum().item() / n
    out["any"] = result.verified_any.sum().item() / n if verifiers else None
    out["stages"] = [{"stage": "attack", "examples": len(result.label),
                      "decided": int((result.clean_correct & ~result.pgd_robust).sum()),
                      "time_s": result.stage_time_s["attack"]}]
    out["stages"] += [{"stage": v, "examples": int(result.ran[v].sum()),
                       "decided": int(result.verified[v].sum()),
                       "time_s": result.stage_time_s[v]} for v in result.verified]
    out["undecided"] = int((result.pgd_robust & ~result.verified_any).sum())
    out["ties"] = result.ties
    out["violations"] = result.violations
    return out


VERDICTS = {"clean": "misclassified", "attack": "broken", "": "unknown"}


def csv_rows(result, indices: list[int]) -> list[dict]:
    """One dict per test example (columns of certify.csv)."""
    from fastcert.bounds import Bound

    rows = []
    for i, by in enumerate(result.decided_by()):
        row = {"eps": result.eps, "index": indices[i], "label": int(result.label[i]),
               "prediction": int(result.pred[i]),
               "clean_correct": int(result.pred[i] == result.label[i]),
               "pgd_robust": int(result.pgd_robust[i]),
               "attack_margin": f"{result.attack_margin[i].item():.9g}",
               "verdict": VERDICTS.get(by, "verified"), "decided_by": by}
        for v in (b.key for b in Bound):
            ran = v in result.ran and bool(result.ran[v][i])
            row[f"{v}_verified"] = int(result.verified[v][i]) if ran else ""
            row[f"{v}_margin_lb"] = f"{result.margin_lb[v][i].item():.9g}" if ran else ""
        rows.append(row)
    return rows


def csv_columns() -> list[str]:
    from fastcert.bounds import Bound

    return (["eps", "index", "label", "prediction", "clean_correct", "pgd_robust",
             "attack_margin", "verdict", "decided_by"]
            + [f"{b.key}_{k}" for b in Bound for k in ("verified", "margin_lb")])


def _csv_text(rows: list[dict]) -> str:
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=csv_columns())
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def format_table(summary: dict) -> str:
    """Per-ε table of the accuracies in percent (``skipped`` for a verifier that did not run),
    then the cascade's stages: examples run on, verified, seconds."""
    cascade = summary["cascade"]
    plus = "+" if cascade else ""
    names = {"clean": "clean", "pgd": "attack", "ibp": "IBP", "crown_ibp": f"{plus}CROWN-IBP",
             "crown": f"{plus}CROWN", "alpha_crown": f"{plus}α-CROWN", "any": "any"}
    run = summary["run"]
    head = (f"{run['method']} | {run['model']} | {run['data']} | epoch {summary['epoch']} | "
            f"{summary['n_test']} test examples | attack: {summary['attack']['description']}")
    cols = ["eps"] + [names[k] for k in SUMMARY_KEYS]
    widths = [max(8, len(c)) for c in cols]
    lines = [head, "  ".join(c.rjust(w) for c, w in zip(cols, widths))]
    for r in summary["results"]:
        cells = [f"{r['eps']:.4g}"] + [
            "skipped" if r[k] is None else f"{100 * r[k]:.2f}%" for k in SUMMARY_KEYS]
        lines.append("  ".join(c.rjust(w) for c, w in zip(cells, widths)))
    lines.append("stages (" + ("cascade: each on the undecided examples" if cascade else
                               "every verifier on every example") + "): "
                 "examples run -> decided, seconds")
    for r in summary["results"]:
        stages = ", ".join(f"{s['stage']} {s['examples']}->{s['decided']} {s['time_s']:.1f}s"
                           for s in r["stages"])
        lines.append(f"  eps {r['eps']:.4g}: {stages}; undecided {r['undecided']}")
    if cascade:
        lines.append(f"({plus}X: verified by X or an earlier stage of the cascade)")
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
    import torch
    from tqdm.auto import tqdm

    from fastcert import checkpoint as ckpt
    from fastcert.bounds import Bound
    from fastcert.config import ConfigError, coerce, parse_number
    from fastcert.diagnostics import crown_cost, relu_sizes
    from fastcert.evaluate import CASCADE, evaluate
    from fastcert.pipeline import build, check_eps
    from fastcert.tightness import mean_tightness

    # certify's own keys first: a mistake costs a second, not a model build
    try:
        verifiers = [Bound.parse(v).key for v in cfg.verifiers]
    except ValueError as e:
        raise ConfigError(f"verifiers: {e}") from None
    cascade = coerce(cfg.cascade, bool, "cascade")
    attack = _attack(cfg)
    alpha_opts = {"iteration": _positive(cfg.alpha_crown.iterations, "alpha_crown.iterations"),
                  "lr_alpha": coerce(cfg.alpha_crown.lr, float, "alpha_crown.lr")}
    budget = coerce(cfg.crown_max_elements, float, "crown_max_elements")
    seed = None if cfg.get("seed") is None else coerce(cfg.seed, int, "seed")
    coerce(cfg.get("progress", True), bool, "progress")

    out_dir = Path(out_dir)
    path = Path(str(cfg.checkpoint))
    state = ckpt.load(path, map_location="cpu")
    run_cfg, source = load_run_config(path, state)
    run_cfg = _apply_data_overrides(run_cfg, cfg)
    eps_list = _eps_list(cfg.get("eps"), tested_radius(run_cfg))
    for e in eps_list:
        check_eps(e, parse_number(run_cfg.data.eps_max, "data.eps_max"))
    seed = int(run_cfg.seed) if seed is None else seed
    out_dir.mkdir(parents=True, exist_ok=True)

    built = build(run_cfg, device)
    net, data = built.net, built.data
    try:
        net.model.load_state_dict(state["model"])  # copies in place: the tied views stay tied
    except RuntimeError as e:
        raise ckpt.CheckpointError(
            f"checkpoint {path}: its weights do not fit the model rebuilt from {source} "
            f"({e})") from e
    net.eval()
    net.bounded.set_bound_opts({"optimize_bound_args": alpha_opts})

    dataset = data.test.dataset
    n_test = len(dataset)
    indices = [int(i) for i in getattr(dataset, "indices", range(n_test))]
    batch = min(int(data.test.batch_size), n_test)
    skipped: dict[str, str] = {}
    backward = [v for v in ("crown", "alpha_crown") if v in verifiers]
    if backward:
        sizes = relu_sizes(net.model, data.input_shape)
        d_in = math.prod(data.input_shape)
        cost = crown_cost(sizes, d_in, data.num_classes, batch)
        if cost > budget:
            fit = int(budget // max(crown_cost(sizes, d_in, data.num_classes, 1), 1))
            hint = (f"run with batch_size={fit} or less" if fit >= 1
                    else "the model is too large for CROWN even one example at a time")
            why = (f"estimated size B*(relu neurons + classes)*max width = "
                   f"{batch}*({sum(sizes)}+{data.num_classes})*{max([d_in] + sizes)} = "
                   f"{cost:.3g} > crown_max_elements={budget:.3g} "
                   f"(~{4 * cost / 2**30:.1f} GiB); {hint}, or raise crown_max_elements")
            for v in backward:
                skipped[v] = why
                verifiers.remove(v)
            print(f"note: {' and '.join(backward)} skipped: {why}", flush=True)

    results, rows = [], []
    for eps in eps_list:
        t0 = time.perf_counter()
        bar = tqdm(total=n_test, desc=f"certify eps={eps:.4g}",
                   disable=not cfg.get("progress", True), dynamic_ncols=True, mininterval=1.0)
        try:
            result = evaluate(net, data.test, data.eps_box, eps, verifiers=verifiers,
                              pgd=attack, device=device, seed=seed, progress=bar.update,
                              cascade=cascade, indices=indices)
        finally:
            bar.close()
        try:  # a diagnostic: its failure must not cost the certification just computed
            tau = mean_tightness(net.model, data.test, data.eps_box, eps, data.num_classes,
                                 device)
        except (TypeError, torch.OutOfMemoryError) as e:  # a layer it has no rule for; memory
            tau = None
            skipped["tightness"] = f"{type(e).__name__}: {e}"
            print(f"note: tightness skipped: {skipped['tightness']}", flush=True)
        results.append({**summarize(result, verifiers, cascade), "tightness": tau,
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
        "attack": {"description": attack.description,
                   **OmegaConf.to_container(cfg.attack, resolve=True)},
        "cascade": cascade,
        "verifiers": [v for v in CASCADE if v in verifiers] if cascade else verifiers,
        "alpha_crown": dict(cfg.alpha_crown),
        "skipped": skipped,
        "results": results,
    }
    ckpt.write_text_atomic(out_dir / "certify.json", json.dumps(summary, indent=2) + "\n")
    ckpt.write_text_atomic(out_dir / "certify.csv", _csv_text(rows))
    print(format_table(summary), flush=True)
    print(f"wrote {out_dir / 'certify.json'} and {out_dir / 'certify.csv'}", flush=True)
    violations = [v for r in results for v in r["violations"]]
    if violations:
        from fastcert.evaluate import SoundnessError

        v = violations[0]
        raise SoundnessError(
            f"{len(violations)} soundness violation(s), recorded in {out_dir / 'certify.json'}"
            f"; e.g. eps={v['eps']} test example {v['index']} is {v['verifier']}-verified "
            f"(margin lower bound {v['margin_lb']:.6g}) but the attack found margin "
            f"{v['attack_margin']:.6g}: the bound is unsound or the attack left the box")
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


@hydra.main(version_base="1.3", config_path="conf", config_name="certify")
def main(cfg: DictConfig):
    from hydra.core.hydra_config import HydraConfig

    from fastcert.cli import exit_on_known_errors

    with exit_on_known_errors():
        certify(cfg, HydraConfig.get().runtime.output_dir)


def cli() -> None:
    """``fastcert-certify`` (the console script) and ``python -m fastcert.certify``: a missing or
    mistyped ``checkpoint=`` is refused in one line (exit 2) before Hydra starts."""
    import sys

    from fastcert.cli import quiet_known_warnings

    quiet_known_warnings()
    problem = _precheck(sys.argv[1:])
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    main()


if __name__ == "__main__":
    cli()
