"""NeuralSAT (Duong, Nguyen, Dwyer; https://github.com/dynaroars/neuralsat, PyPI ``neuralsat``,
MIT): a DPLL(T) branch and bound on ReLU activations with its own auto_LiRPA, 2nd overall at
VNN-COMP 2024 and 2025. It installs a top-level package named ``src`` and pins its own torch,
so it lives in its own virtual environment (``make neuralsat``) and runs as a subprocess from
its package directory::

    <venv>/bin/python main.py --net model.onnx --spec p.vnnlib --timeout T --device cpu
                              --result_file F --export_cex [extra args]

It reads ``fastcert.export``'s model.onnx and .vnnlib unchanged and writes a VNN-COMP result
file (:mod:`fastcert.complete.vnncomp`).
"""
from __future__ import annotations

import subprocess
from functools import cache
from pathlib import Path

from fastcert.complete.engine import Engine, Limits, Verdict, verdict_of_run
from fastcert.complete.limits import run_limited


class EngineMissing(RuntimeError):
    """The engine's environment is not where the config says."""


@cache
def _version(python: str) -> str:
    out = subprocess.run([python, "-c", "import importlib.metadata as m; "
                          "print(m.version('neuralsat'))"], capture_output=True, text=True,
                         timeout=120)
    return out.stdout.strip() or "unknown"


class NeuralSAT(Engine):
    """``venv``: the environment ``make neuralsat`` creates; ``args``: extra flags of
    ``main.py`` (e.g. ``--disable_restart``)."""

    name = "neuralsat"

    def __init__(self, venv: str, args: list[str] = (), address_space_slack_gb: float = 4.0):
        self.python = Path(venv) / "bin" / "python"
        self.args = [str(a) for a in args]
        self.slack = float(address_space_slack_gb)

    def package_dir(self) -> Path:
        """``<venv>/lib/python3.X/site-packages/src``, where main.py is."""
        found = sorted(self.python.parent.parent.glob("lib/python3*/site-packages/src/main.py"))
        if not self.python.is_file() or not found:
            raise EngineMissing(f"NeuralSAT is not installed in {self.python.parent.parent} "
                                f"(run `make neuralsat`, or set complete.neuralsat.venv=...)")
        return found[-1].parent

    def version(self) -> str:
        self.package_dir()
        return _version(str(self.python))

    def verify(self, onnx: Path, vnnlib: Path, limits: Limits, work_dir: Path) -> Verdict:
        work_dir.mkdir(parents=True, exist_ok=True)
        result, log = work_dir / "result.txt", work_dir / "neuralsat.log"
        result.unlink(missing_ok=True)
        cmd = [str(self.python), "main.py", "--net", str(onnx.resolve()),
               "--spec", str(vnnlib.resolve()), "--timeout", f"{limits.timeout_s:g}",
               "--device", "cpu", "--result_file", str(result.resolve()), "--export_cex",
               *self.args]
        # its timeout counts from after its imports (~10-30 s): the wall limit adds a grace
        finished = run_limited(cmd, self.package_dir(), limits.timeout_s + limits.grace_s,
                               limits.memory_gb, log, self.slack)
        return verdict_of_run(finished, result, log, limits)
