"""certify's outputs from its per-example rows: certify.csv, certify.json's per-ε entries, the
printed table. Everything here reads rows (dicts of certify.csv's columns), so that results
journaled by several processes or invocations (:mod:`fastcert.certify.journal`) give the same
outputs as one uninterrupted run."""
from __future__ import annotations

import csv
import io

#: The cascade's verifiers (:data:`fastcert.evaluate.CASCADE`), then the complete stage.
VERIFIERS = ("ibp", "crown_ibp", "crown", "alpha_crown")
COMPLETE = "complete"

#: The fractions certify.json holds per ε, in this order.
SUMMARY_KEYS = ("clean", "pgd", *VERIFIERS, COMPLETE, "any")

#: certify.csv's complete-stage columns.
COMPLETE_COLUMNS = ("complete_verdict", "complete_margin", "complete_reason", "complete_engine",
                    "complete_time_s")

#: Fields that hold wall-clock times: the only ones in which a resumed, sharded or repeated
#: certify may differ from an uninterrupted one (keys of certify.json, columns of certify.csv).
TIMING_FIELDS = ("time_s", "complete_time_s")

VERDICTS = {"clean": "misclassified", "attack": "broken", "": "unknown"}


def csv_columns() -> list[str]:
    return (["eps", "index", "label", "prediction", "clean_correct", "pgd_robust",
             "attack_margin", "verdict", "decided_by"]
            + [f"{v}_{k}" for v in VERIFIERS for k in ("verified", "margin_lb")]
            + list(COMPLETE_COLUMNS))


def batch_rows(result, indices: list[int]) -> list[dict]:
    """One dict per example of an :class:`fastcert.evaluate.EvalResult` (certify.csv's columns;
    the complete stage's cells empty until it ran)."""
    rows = []
    for i, by in enumerate(result.decided_by()):
        row = {"eps": result.eps, "index": indices[i], "label": int(result.label[i]),
               "prediction": int(result.pred[i]),
               "clean_correct": int(result.pred[i] == result.label[i]),
               "pgd_robust": int(result.pgd_robust[i]),
               "attack_margin": f"{result.attack_margin[i].item():.9g}",
               "verdict": VERDICTS.get(by, "verified"), "decided_by": by}
        for v in VERIFIERS:
            ran = v in result.ran and bool(result.ran[v][i])
            row[f"{v}_verified"] = int(result.verified[v][i]) if ran else ""
            row[f"{v}_margin_lb"] = f"{result.margin_lb[v][i].item():.9g}" if ran else ""
        row.update(dict.fromkeys(COMPLETE_COLUMNS, ""))
        rows.append(row)
    return rows


def apply_complete(row: dict, record: dict) -> dict:
    """``row`` with a complete-stage record (:mod:`fastcert.certify.complete_stage`): its
    cells, and for an undecided example the new verdict (``verified`` / ``broken``, decided by
    ``complete``)."""
    row = {**row, "complete_verdict": record["verdict"],
           "complete_margin": "" if record.get("margin") is None else f"{record['margin']:.9g}",
           "complete_reason": record.get("reason", ""), "complete_engine": record["engine"],
           "complete_time_s": f"{record['time_s']:.3f}"}
    if row["verdict"] == "unknown" and record["verdict"] in ("verified", "falsified"):
        row["verdict"] = "verified" if record["verdict"] == "verified" else "broken"
        row["decided_by"] = COMPLETE
    return row


def csv_text(rows: list[dict]) -> str:
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=csv_columns())
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _is(row: dict, key: str) -> bool:
    return str(row.get(key, "")) == "1"


def summarize(rows: list[dict], verifiers: list[str], cascade: bool, complete: bool,
              times: dict[str, float]) -> dict:
    """One ε's entry of certify.json: the fractions clean, pgd, one per verifier (None where
    it did not run; with the cascade, verified by it *or an earlier stage*), complete, any;
    ``stages``: per stage the examples it ran on, those it decided, its time (``times``); the
    complete stage also counts its verdicts; ``undecided``: attack-robust examples no stage
    decided."""
    n = max(len(rows), 1)
    out = {"eps": rows[0]["eps"] if rows else None,
           "clean": sum(_is(r, "clean_correct") for r in rows) / n,
           "pgd": sum(_is(r, "pgd_robust") for r in rows) / n}
    done = [False] * len(rows)
    for v in VERIFIERS:
        if v not in verifiers:
            out[v] = None
            continue
        mine = [_is(r, f"{v}_verified") for r in rows]
        done = [a or b for a, b in zip(done, mine)]
        out[v] = sum(done if cascade else mine) / n
    by_complete = [r["complete_verdict"] == "verified" and r["pgd_robust"] == 1 for r in rows]
    if complete:
        done = [a or b for a, b in zip(done, by_complete)]
        out[COMPLETE] = sum(done if cascade else by_complete) / n
    else:
        out[COMPLETE] = None
    out["any"] = sum(r["verdict"] == "verified" for r in rows) / n if verifiers else None
    out["stages"] = _stages(rows, verifiers, complete, times)
    out["undecided"] = sum(r["verdict"] == "unknown" for r in rows)
    return out


def _stages(rows: list[dict], verifiers: list[str], complete: bool, times: dict) -> list[dict]:
    stages = [{"stage": "attack", "examples": len(rows),
               "decided": sum(_is(r, "clean_correct") and not _is(r, "pgd_robust")
                              for r in rows), "time_s": times.get("attack", 0.0)}]
    for v in (v for v in VERIFIERS if v in verifiers):
        stages.append({"stage": v, "examples": sum(r[f"{v}_verified"] != "" for r in rows),
                       "decided": sum(_is(r, f"{v}_verified") for r in rows),
                       "time_s": times.get(v, 0.0)})
    if complete:
        ran = [r for r in rows if r["complete_verdict"]]
        counts = {k: sum(r["complete_verdict"] == k for r in ran)
                  for k in ("verified", "falsified", "timeout", "error")}
        stages.append({"stage": COMPLETE, "examples": len(ran),
                       "decided": counts["verified"] + counts["falsified"], **counts,
                       "time_s": sum(float(r["complete_time_s"]) for r in ran)})
    return stages


def format_table(summary: dict) -> str:
    """Per-ε table of the accuracies in percent (``skipped`` for a verifier that did not run),
    then per stage: examples run -> decided, seconds (the complete stage's verdicts too)."""
    from fastcert.report import percent, table_row

    cascade = summary["cascade"]
    plus = "+" if cascade else ""
    names = {"clean": "clean", "pgd": "attack", "ibp": "IBP", "crown_ibp": f"{plus}CROWN-IBP",
             "crown": f"{plus}CROWN", "alpha_crown": f"{plus}α-CROWN",
             COMPLETE: f"{plus}complete", "any": "any"}
    run = summary["run"]
    head = (f"{run['method']} | {run['model']} | {run['data']} | epoch {summary['epoch']} | "
            f"{summary['n_test']} test examples | attack: {summary['attack']['description']}")
    keys = [k for k in SUMMARY_KEYS if k != COMPLETE or summary.get("complete")]
    cols = ["eps"] + [names[k] for k in keys]
    widths = [max(8, len(c)) for c in cols]
    right = ">" * len(cols)
    lines = [head, table_row(cols, widths, right)]
    for r in summary["results"]:
        cells = [f"{r['eps']:.4g}"] + [percent(r[k]) for k in keys]
        lines.append(table_row(cells, widths, right))
    lines.append("stages (" + ("cascade: each on the undecided examples" if cascade else
                               "every verifier on every example") + "): "
                 "examples run -> decided, seconds")
    for r in summary["results"]:
        lines.append(f"  eps {r['eps']:.4g}: " + ", ".join(map(_stage_text, r["stages"]))
                     + f"; undecided {r['undecided']}")
    if cascade:
        lines.append(f"({plus}X: verified by X or an earlier stage of the cascade)")
    for r in summary["results"]:
        if r.get("tightness") is not None:
            lines.append(f"propagation tightness at eps={r['eps']:.4g}: {r['tightness']:.4g}")
    for v, why in summary["skipped"].items():
        lines.append(f"{v} skipped: {why}")
    return "\n".join(lines)


def _stage_text(s: dict) -> str:
    text = f"{s['stage']} {s['examples']}->{s['decided']} {s['time_s']:.1f}s"
    if s["stage"] == COMPLETE:
        text += (f" (verified {s['verified']}, falsified {s['falsified']}, "
                 f"timeout {s['timeout']}, error {s['error']})")
    return text
