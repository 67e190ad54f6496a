"""What a run reports: results.json's dict (:func:`results_dict`) and the fixed-width table it
prints (:func:`format_table`); the cell and row helpers are also those of certify's table."""
from __future__ import annotations

from collections.abc import Sequence

from fastcert.evaluate import EvalResult
from fastcert.settings import Settings
from fastcert.train import epoch_times_by_phase

#: Verified accuracies results.json and the table list first, in this order.
NAMED_VERIFIED = ("ibp_verified_acc", "crown_verified_acc", "any_verified_acc")


def percent(value: float | None, fmt: str = "{:.2f}%") -> str:
    """A fraction as a percentage (``fmt`` formats 100·value); ``skipped`` for None (a
    verifier that did not run)."""
    return "skipped" if value is None else fmt.format(100 * value)


def table_row(cells: Sequence[str], widths: Sequence[int], align: str) -> str:
    """Cells padded to ``widths`` (``align``: one ``<`` left or ``>`` right per cell), two
    spaces apart."""
    return "  ".join(c.ljust(w) if a == "<" else c.rjust(w)
                     for c, w, a in zip(cells, widths, align, strict=True))


def format_table(results: dict) -> str:
    """The final metrics as a small fixed-width table (with a validation split, its column
    beside the test set's); a run stopped early (:func:`stopped_results`) has one line."""
    if "stopped_early" in results:
        stop = results["stopped_early"]
        values = ", ".join(f"{k} {percent(v)}" for k, v in stop["values"].items())
        return (f"{results['method']} | {results['model']} | {results['data']} | stopped after "
                f"epoch {stop['epoch']}/{results['epochs']}: its validation point ({values}) is "
                f"dominated by {len(stop['dominated_by'])} finished trials "
                f"({', '.join(map(str, stop['dominated_by']))}); the test set was not read")
    rows = [("clean accuracy", "clean_acc"), ("PGD accuracy (cheap attack)", "pgd_acc"),
            ("IBP-verified accuracy", "ibp_verified_acc"),
            ("CROWN-verified accuracy", "crown_verified_acc"),
            ("verified by any", "any_verified_acc")]
    rows += [(f"{k[:-len('_verified_acc')]}-verified accuracy", k) for k in results
             if k.endswith("_verified_acc") and k not in NAMED_VERIFIED
             and not k.startswith("val_")]
    width = max(len(r[0]) for r in rows)
    head = (f"{results['method']} | {results['model']} | {results['data']} | "
            f"eps={results['eps']:.4g} | {results['n_test']} test examples | "
            f"{results['epochs']} epochs | {results['wall_time_s']:.1f}s")
    lines = [head, "-" * len(head)]
    if "n_val" in results:
        lines.append(table_row(["", "test", f"validation ({results['n_val']} examples)"],
                               [width, 8, 0], "<><"))
        lines += [table_row([name, percent(results[k], "{:6.2f} %"),
                             percent(results.get(f"val_{k}"), "{:6.2f} %")],
                            [width, 8, 0], "<><") for name, k in rows]
    else:
        lines += [table_row([name, percent(results[k], "{:6.2f} %")], [width, 0], "<<")
                  for name, k in rows]
    lines.append(f"(attack: {results['pgd_attack']}; python -m fastcert.certify runs a "
                 f"strong attack and the verifier cascade)")
    violations = results["soundness"]["violations"] + results["soundness"].get(
        "val_violations", [])
    if violations:
        lines.append(f"SOUNDNESS VIOLATIONS: {len(violations)} (see results.json)")
    return "\n".join(lines)


def accuracies(result: EvalResult) -> dict:
    """An evaluation's accuracies, results.json's order: clean, PGD, the named verifiers, the
    other verifiers, any verifier (None: a verifier that did not run)."""
    summary = result.summary()
    return {
        "clean_acc": summary["clean_acc"],
        "pgd_acc": summary["pgd_acc"],
        "ibp_verified_acc": summary.get("ibp_verified_acc"),
        "crown_verified_acc": summary.get("crown_verified_acc"),
        **{k: v for k, v in summary.items() if k.endswith("_verified_acc")
           and k not in NAMED_VERIFIED},
        "any_verified_acc": summary.get("any_verified_acc"),
    }


def validation_entries(result: EvalResult) -> dict:
    """The validation split's evaluation in results.json: ``val_<key>`` for every accuracy
    of :func:`accuracies` and ``n_val``."""
    return {**{f"val_{k}": v for k, v in accuracies(result).items()},
            "n_val": len(result.label)}


def _trained(settings: Settings, history: list[dict], wall_time_s: float) -> dict:
    """What was trained and how long it took (every results.json has these)."""
    cfg = settings.config
    return {"train_eps": settings.eps, "epochs": settings.epochs, "method": cfg.method.name,
            "model": cfg.model.name, "data": cfg.data.name, "init": cfg.init.name,
            "seed": settings.seed, "phase_epoch_time_s": epoch_times_by_phase(history),
            "wall_time_s": wall_time_s}


def stopped_results(settings: Settings, val: EvalResult, history: list[dict],
                    wall_time_s: float, stopped: dict) -> dict:
    """results.json of a run stopped early by :mod:`fastcert.search`'s rule: the validation
    split's evaluation at the stop (:func:`validation_entries`), what was trained, and
    ``stopped_early`` (the epoch, the point, the dominating trials); no test-set key, since
    the test set was not read."""
    return {**validation_entries(val), "eps": val.eps, **_trained(settings, history, wall_time_s),
            "soundness": {"val_violations": val.violations, "val_ties": val.ties},
            "stopped_early": stopped}


def results_dict(settings: Settings, result: EvalResult, history: list[dict],
                 wall_time_s: float, val: EvalResult | None = None) -> dict:
    """results.json: the final evaluation's accuracies (``pgd_attack`` names the attack), what
    was trained, the mean epoch time per ε phase, and the soundness record; with ``val`` (the
    same evaluation on the validation split) its :func:`validation_entries` too, and its
    violations in the soundness record."""
    soundness = {"violations": result.violations, "ties": result.ties,
                 "tie_tolerance": "1e-5 * max(1, max_k |f_k(x)|)"}
    if val is not None:
        soundness.update(val_violations=val.violations, val_ties=val.ties)
    return {
        **accuracies(result),
        "pgd_attack": settings.eval.pgd.description,
        "eps": result.eps,
        **_trained(settings, history, wall_time_s),
        "n_test": len(result.label),
        "soundness": soundness,
        **({} if val is None else validation_entries(val)),
    }
