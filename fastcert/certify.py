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

The run is rebuilt from the config that trained the checkpoint, with the checkpoint's weights
(:mod:`fastcert.rebuild`).

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
from dataclasses import dataclass
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from fastcert import rebuild

# torch, auto_LiRPA and the rest of fastcert are imported inside the functions that need
# them, so that a mistyped command line fails in a second, not after ~10 s of imports.

#: The fractions certify.json holds per ε, in this order.
SUMMARY_KEYS = ("clean", "pgd", "ibp", "crown_ibp", "crown", "alpha_crown", "any")


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
    from fastcert.report import percent, table_row

    cascade = summary["cascade"]
    plus = "+" if cascade else ""
    names = {"clean": "clean", "pgd": "attack", "ibp": "IBP", "crown_ibp": f"{plus}CROWN-IBP",
             "crown": f"{plus}CROWN", "alpha_crown": f"{plus}α-CROWN", "any": "any"}
    run = summary["run"]
    head = (f"{run['method']} | {run['model']} | {run['data']} | epoch {summary['epoch']} | "
            f"{summary['n_test']} test examples | attack: {summary['attack']['description']}")
    cols = ["eps"] + [names[k] for k in SUMMARY_KEYS]
    widths = [max(8, len(c)) for c in cols]
    right = ">" * len(cols)
    lines = [head, table_row(cols, widths, right)]
    for r in summary["results"]:
        cells = [f"{r['eps']:.4g}"] + [percent(r[k]) for k in SUMMARY_KEYS]
        lines.append(table_row(cells, widths, right))
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

    held_before = devices.held_device() is not None
    device = devices.acquire_device(str(cfg.get("device", "auto")), cfg.get("devices"))
    try:
        return _certify(cfg, Path(out_dir), device)
    finally:
        if not held_before:
            devices.release_device()


@dataclass
class Options:
    """certify's own keys, checked."""

    verifiers: list[str]       # keys of fastcert.bounds.Bound, as given
    cascade: bool
    attack: object             # conf/attack/<name>.yaml, built
    alpha_opts: dict           # auto_LiRPA's optimize_bound_args of α-CROWN
    budget: float              # crown_max_elements
    seed: int | None           # the attack's random starts; None: the run's seed
    progress: bool


def options(cfg: DictConfig) -> Options:
    """certify's own keys, checked first: a mistake costs a second, not a model build."""
    from fastcert.bounds import Bound
    from fastcert.config import ConfigError, coerce, instantiate

    try:
        verifiers = [Bound.parse(v).key for v in cfg.verifiers]
    except ValueError as e:
        raise ConfigError(f"verifiers: {e}") from None
    cascade = coerce(cfg.cascade, bool, "cascade")
    attack = instantiate(cfg.attack, "attack")
    alpha_opts = {"iteration": rebuild.positive(cfg.alpha_crown.iterations,
                                                "alpha_crown.iterations"),
                  "lr_alpha": coerce(cfg.alpha_crown.lr, float, "alpha_crown.lr")}
    budget = coerce(cfg.crown_max_elements, float, "crown_max_elements")
    seed = None if cfg.get("seed") is None else coerce(cfg.seed, int, "seed")
    progress = coerce(cfg.get("progress", True), bool, "progress")
    return Options(verifiers, cascade, attack, alpha_opts, budget, seed, progress)


def _certify(cfg: DictConfig, out_dir: Path, device) -> dict:
    from fastcert.checkpoint import write_text_atomic

    opts = options(cfg)
    trained = rebuild.load_trained(cfg)
    radii = rebuild.checked_radii(cfg.get("eps"), trained.config)
    seed = int(trained.config.seed) if opts.seed is None else opts.seed
    out_dir.mkdir(parents=True, exist_ok=True)

    built = rebuild.build_trained(trained, device)
    net, data = built.net, built.data
    net.eval()
    net.bounded.set_bound_opts({"optimize_bound_args": opts.alpha_opts})
    dataset = data.test.dataset
    indices = [int(i) for i in getattr(dataset, "indices", range(len(dataset)))]
    batch = min(int(data.test.batch_size), len(dataset))
    verifiers, skipped = fitting_verifiers(opts.verifiers, net.model, data, batch, opts.budget)

    results, rows = [], []
    for eps in radii:
        result, eps_rows = _certify_at(net, data, eps, verifiers, opts, seed, device, indices,
                                       skipped)
        results.append(result)
        rows += eps_rows
    summary = _summary(cfg, trained, opts, verifiers, skipped, results, seed=seed,
                       n_test=len(dataset), batch=batch, device=device)
    write_text_atomic(out_dir / "certify.json", json.dumps(summary, indent=2) + "\n")
    write_text_atomic(out_dir / "certify.csv", _csv_text(rows))
    print(format_table(summary), flush=True)
    print(f"wrote {out_dir / 'certify.json'} and {out_dir / 'certify.csv'}", flush=True)
    _raise_on_violations(results, out_dir)
    return summary


def fitting_verifiers(verifiers: list[str], model, data, batch: int,
                      budget: float) -> tuple[list[str], dict[str, str]]:
    """``verifiers`` without CROWN and α-CROWN when CROWN's estimated size
    B·(Σ_i n_i + K)·max(d_in, max_i n_i) (:func:`fastcert.diagnostics.crown_cost`) exceeds
    ``budget``, and ``{verifier: why}`` for those left out (printed as a note)."""
    from fastcert.diagnostics import crown_cost, relu_sizes

    backward = [v for v in ("crown", "alpha_crown") if v in verifiers]
    if not backward:
        return list(verifiers), {}
    sizes = relu_sizes(model, data.input_shape)
    d_in = math.prod(data.input_shape)
    cost = crown_cost(sizes, d_in, data.num_classes, batch)
    if cost <= budget:
        return list(verifiers), {}
    fit = int(budget // max(crown_cost(sizes, d_in, data.num_classes, 1), 1))
    hint = (f"run with batch_size={fit} or less" if fit >= 1
            else "the model is too large for CROWN even one example at a time")
    why = (f"estimated size B*(relu neurons + classes)*max width = "
           f"{batch}*({sum(sizes)}+{data.num_classes})*{max([d_in] + sizes)} = "
           f"{cost:.3g} > crown_max_elements={budget:.3g} "
           f"(~{4 * cost / 2**30:.1f} GiB); {hint}, or raise crown_max_elements")
    print(f"note: {' and '.join(backward)} skipped: {why}", flush=True)
    return [v for v in verifiers if v not in backward], {v: why for v in backward}


def _certify_at(net, data, eps: float, verifiers: list[str], opts: Options, seed: int, device,
                indices: list[int], skipped: dict[str, str]) -> tuple[dict, list[dict]]:
    """One radius: the evaluation (attack, then the verifiers), the mean tightness (a
    diagnostic: its failure is recorded under ``skipped``), certify.json's entry and
    certify.csv's rows."""
    import torch
    from tqdm.auto import tqdm

    from fastcert.evaluate import evaluate
    from fastcert.tightness import mean_tightness

    t0 = time.perf_counter()
    bar = tqdm(total=len(indices), desc=f"certify eps={eps:.4g}", disable=not opts.progress,
               dynamic_ncols=True, mininterval=1.0)
    try:
        result = evaluate(net, data.test, data.eps_box, eps, verifiers=verifiers,
                          pgd=opts.attack, device=device, seed=seed, progress=bar.update,
                          cascade=opts.cascade, indices=indices)
    finally:
        bar.close()
    try:  # a diagnostic: its failure must not cost the certification just computed
        tau = mean_tightness(net.model, data.test, data.eps_box, eps, data.num_classes, device)
    except (TypeError, torch.OutOfMemoryError) as e:  # a layer it has no rule for; memory
        tau = None
        skipped["tightness"] = f"{type(e).__name__}: {e}"
        print(f"note: tightness skipped: {skipped['tightness']}", flush=True)
    entry = {**summarize(result, verifiers, opts.cascade), "tightness": tau,
             "time_s": time.perf_counter() - t0}
    return entry, csv_rows(result, indices)


def _summary(cfg: DictConfig, trained: rebuild.Trained, opts: Options, verifiers: list[str],
             skipped: dict, results: list[dict], *, seed: int, n_test: int, batch: int,
             device) -> dict:
    """certify.json."""
    from fastcert.config import parse_number
    from fastcert.evaluate import CASCADE

    run_cfg = trained.config
    return {
        "checkpoint": str(trained.path.resolve()),
        "config_source": trained.source,
        "epoch": trained.state.get("epoch"),
        "run": {"method": run_cfg.method.name, "model": run_cfg.model.name,
                "data": run_cfg.data.name, "init": run_cfg.init.name, "seed": int(run_cfg.seed),
                "train_eps": parse_number(run_cfg.eps, "eps")},
        "n_test": n_test,
        "batch_size": batch,
        "device": str(device),
        "seed": seed,
        "attack": {"description": opts.attack.description,
                   **OmegaConf.to_container(cfg.attack, resolve=True)},
        "cascade": opts.cascade,
        "verifiers": [v for v in CASCADE if v in verifiers] if opts.cascade else verifiers,
        "alpha_crown": dict(cfg.alpha_crown),
        "skipped": skipped,
        "results": results,
    }


def _raise_on_violations(results: list[dict], out_dir: Path) -> None:
    """A soundness violation (already recorded in certify.json) raised as SoundnessError."""
    violations = [v for r in results for v in r["violations"]]
    if violations:
        from fastcert.evaluate import SoundnessError

        v = violations[0]
        raise SoundnessError(
            f"{len(violations)} soundness violation(s), recorded in {out_dir / 'certify.json'}"
            f"; e.g. eps={v['eps']} test example {v['index']} is {v['verifier']}-verified "
            f"(margin lower bound {v['margin_lb']:.6g}) but the attack found margin "
            f"{v['attack_margin']:.6g}: the bound is unsound or the attack left the box")


@hydra.main(version_base="1.3", config_path="conf", config_name="certify")
def main(cfg: DictConfig):
    from hydra.core.hydra_config import HydraConfig

    from fastcert.cli import exit_on_known_errors

    with exit_on_known_errors():
        certify(cfg, HydraConfig.get().runtime.output_dir)


def cli() -> None:
    """``fastcert-certify`` (the console script) and ``python -m fastcert.certify``: a missing or
    mistyped ``checkpoint=`` is refused in one line (exit 2) before Hydra starts."""
    from fastcert.cli import checkpoint_command

    checkpoint_command(main, "fastcert.certify")


if __name__ == "__main__":
    cli()
