"""The complete-verifier interface: one property in, one :class:`Verdict` out.

An engine is given fastcert's ``model.onnx`` and one ``.vnnlib`` property written by
:mod:`fastcert.export` (the negation of robustness: UNSAT iff the example is robust) and answers

* ``verified`` — UNSAT: no input of the box changes the prediction;
* ``falsified`` — SAT, with a counterexample input (checked afterwards by
  :mod:`fastcert.complete.replay`: a counterexample that does not violate the property through
  the PyTorch model turns the verdict into ``error``);
* ``timeout`` — undecided within the wall-time limit;
* ``error`` — anything else: the engine crashed, ran out of memory (``reason`` says which),
  answered ``unknown`` or something unreadable.
"""
from __future__ import annotations

import signal
from dataclasses import dataclass, field
from pathlib import Path

#: The verdicts of the complete stage.
VERDICTS = ("verified", "falsified", "timeout", "error")


@dataclass
class Verdict:
    """One property's outcome. ``counterexample``: the input values X_0 … X_{n-1} of a SAT
    answer; ``reason``: why an ``error`` / ``timeout`` (e.g. ``memory limit 8 GB``)."""

    verdict: str
    time_s: float
    reason: str = ""
    counterexample: list[float] | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict {self.verdict!r} is not one of {VERDICTS}")


@dataclass(frozen=True)
class Limits:
    """What one property may use: wall seconds (the engine's own timeout; the process is
    killed ``grace_s`` later) and resident memory in GB (the process group is killed above
    it)."""

    timeout_s: float
    memory_gb: float
    grace_s: float = 60.0


class Engine:
    """A complete verifier. Subclasses set :attr:`name` and implement :meth:`version` and
    :meth:`verify`."""

    name = ""

    def version(self) -> str:
        raise NotImplementedError

    def verify(self, onnx: Path, vnnlib: Path, limits: Limits, work_dir: Path) -> Verdict:
        """Decide ``vnnlib`` on ``onnx``; ``work_dir`` (created) holds the engine's files."""
        raise NotImplementedError


def make_engine(name: str, settings: dict) -> Engine:
    """The engine ``name`` (``neuralsat`` | ``abcrown``) built from its config section."""
    from fastcert.complete.abcrown import ABCrown
    from fastcert.complete.neuralsat import NeuralSAT

    engines = {NeuralSAT.name: NeuralSAT, ABCrown.name: ABCrown}
    if name not in engines:
        raise ValueError(f"unknown engine {name!r}; one of {sorted(engines)}")
    return engines[name](**settings)


def last_line(log: Path) -> str:
    """The last non-empty line of a log (an engine's error message), at most 200 characters."""
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:200] if lines else ""


def verdict_of_run(finished, result_file: Path, log: Path, limits: Limits) -> Verdict:
    """The verdict of an engine's subprocess (:class:`fastcert.complete.limits.Finished`) from
    its VNN-COMP result file: killed over the memory limit → ``error`` (reason ``memory``),
    past the wall limit → ``timeout``; no readable result file → ``error`` with the log's last
    line as the reason."""
    from fastcert.complete import vnncomp

    t = finished.wall_s
    if finished.killed == "memory":
        return Verdict("error", t, f"memory: over the {limits.memory_gb:g} GB limit")
    if finished.killed == "timeout":
        return Verdict("timeout", t, f"killed after {t:.0f} s")
    try:
        status, values = vnncomp.parse(result_file.read_text())
    except (OSError, vnncomp.ResultFormatError) as e:
        rc = finished.returncode
        if rc is not None and rc < 0:  # a signal certify did not send: the OOM killer's SIGKILL
            return Verdict("error", t, f"{signal.Signals(-rc).name} at {finished.peak_gb:.1f} GB "
                                       f"resident (memory: the kernel's OOM killer, if SIGKILL)")
        why = last_line(log) or str(e)
        return Verdict("error", t, f"exit {rc}: {why}")
    verdict = vnncomp.STATUS[status]
    reason = "" if verdict in ("verified", "falsified") else f"the engine answered {status}"
    return Verdict(verdict, t, reason, values["X"] if verdict == "falsified" else None)
