"""The complete stage of certify: each example the incomplete cascade left undecided (with
``cascade=false``: each clean-correct example) goes to a complete engine
(:mod:`fastcert.complete`) as fastcert's own ``model.onnx`` and a VNN-LIB property written by
:mod:`fastcert.export`'s functions; the verdict is checked before it is recorded:

* a counterexample is replayed through the PyTorch model (:mod:`fastcert.complete.replay`);
  one that does not violate the property makes the verdict ``error``;
* an example the engine verified that the attack broke, or that it falsified (with a replayed
  counterexample) while a bound verified it, is a soundness violation (``SoundnessError``,
  exit 3, after the outputs are written), as for every other verifier.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from fastcert.complete.engine import Engine, Limits, Verdict
from fastcert.complete.replay import replay

COMPLETE_DIR = "complete"


class CompleteStage:
    """One engine with its limits, working in ``<out dir>/complete/``."""

    def __init__(self, engine: Engine, limits: Limits, out_dir: Path, model, data):
        self.engine, self.limits, self.model, self.data = engine, limits, model, data
        self.dir = Path(out_dir) / COMPLETE_DIR
        self.label = f"{engine.name} {engine.version()}"
        self.onnx = self.dir / "model.onnx"
        if not self.onnx.is_file():
            from fastcert.export import write_onnx

            self.dir.mkdir(parents=True, exist_ok=True)
            tmp = self.dir / f".model.{os.getpid()}.onnx"
            write_onnx(model, data.input_shape, tmp, opset=13)
            os.replace(tmp, self.onnx)

    def decide(self, row: dict, lower: torch.Tensor, upper: torch.Tensor) -> dict:
        """The journal record of one example (``row``: its certify.csv row; ``lower``,
        ``upper``: its box, normalised units)."""
        from fastcert.export import vnnlib_text

        eps, index, label = row["eps"], int(row["index"]), int(row["label"])
        where = self.dir / f"eps={eps!r}"
        where.mkdir(parents=True, exist_ok=True)
        spec = where / f"{index}.vnnlib"
        spec.write_text(vnnlib_text(lower, upper, label, self.data.num_classes,
                                    f"fastcert: test example {index} (label {label}) at "
                                    f"eps={eps:g}"))
        verdict = self.engine.verify(self.onnx, spec, self.limits, where / str(index))
        return record(row, self.checked(verdict, lower, upper, label), self.label)

    def checked(self, verdict: Verdict, lower, upper, label: int) -> tuple[Verdict, float | None]:
        """``verdict`` after the replay of its counterexample, and the replayed margin."""
        if verdict.verdict != "falsified":
            return verdict, None
        r = replay(self.model, verdict.counterexample or [], lower.cpu(), upper.cpu(), label)
        if r.violates:
            return verdict, r.margin
        return Verdict("error", verdict.time_s,
                       f"counterexample does not violate the property: replayed margin "
                       f"{r.margin:.6g}, {r.outside:.3g} outside the box"), r.margin


def record(row: dict, checked: tuple[Verdict, float | None], engine: str) -> dict:
    """The journal record of a checked verdict, with a ``violation`` entry when it
    contradicts the attack or a bound."""
    verdict, margin = checked
    rec = {"kind": "complete", "eps": row["eps"], "index": int(row["index"]),
           "verdict": verdict.verdict, "reason": verdict.reason, "margin": margin,
           "time_s": verdict.time_s, "engine": engine}
    bound_verified = row["verdict"] == "verified"
    if verdict.verdict == "verified" and int(row["pgd_robust"]) != 1:
        rec["violation"] = (f"{engine} verified it but the attack found margin "
                            f"{row['attack_margin']}")
    elif verdict.verdict == "falsified" and bound_verified:
        rec["violation"] = (f"{engine} found a counterexample (replayed margin {margin:.6g}) "
                            f"but {row['decided_by']} verified it")
    return rec
