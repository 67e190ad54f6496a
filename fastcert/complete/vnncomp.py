"""Result files in the VNN-COMP format, which NeuralSAT and α,β-CROWN write with
``--result_file`` / ``--results_file``: a first line ``sat`` | ``unsat`` | ``timeout`` |
``unknown`` (NeuralSAT appends ``,<seconds>``), and after ``sat`` the assignment
``((X_0 v) (X_1 v) … (Y_0 v) …)``, one ``(name value)`` pair per variable, whitespace and line
breaks free (VNN-COMP 2021 rules, §"Counterexample")."""
from __future__ import annotations

import re

#: The result line's word → verdict.
STATUS = {"unsat": "verified", "sat": "falsified", "timeout": "timeout", "unknown": "error"}

_PAIR = re.compile(r"\(\s*([XY])_(\d+)\s+([-+0-9.eEinfa]+)\s*\)")


class ResultFormatError(ValueError):
    """A result file that does not follow the format."""


def parse(text: str) -> tuple[str, dict[str, list[float]]]:
    """``(status word, {"X": [...], "Y": [...]})`` of a result file's text; the assignment is
    empty unless the status is ``sat``. Raises :class:`ResultFormatError` for an empty or
    unknown status, or a ``sat`` whose X assignment is missing or has gaps."""
    lines = text.strip().splitlines()
    if not lines:
        raise ResultFormatError("empty result file")
    status = lines[0].split(",")[0].strip().lower()
    if status not in STATUS:
        raise ResultFormatError(f"unknown result {lines[0]!r}")
    values: dict[str, dict[int, float]] = {"X": {}, "Y": {}}
    if STATUS[status] == "falsified":
        for name, i, v in _PAIR.findall("\n".join(lines[1:])):
            values[name][int(i)] = float(v)
        if not values["X"] or sorted(values["X"]) != list(range(len(values["X"]))):
            raise ResultFormatError("sat without a complete X_0 … X_n assignment")
    return status, {k: [d[i] for i in sorted(d)] for k, d in values.items()}
