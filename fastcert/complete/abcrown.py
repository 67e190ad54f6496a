"""α,β-CROWN (Wang et al. 2021; https://github.com/Verified-Intelligence/alpha-beta-CROWN),
the field's reference complete verifier, installed from its source by the user. Run as a
subprocess from its ``complete_verifier`` directory on one property::

    <python> abcrown.py --config <work dir>/abcrown.yaml

The YAML holds the model and property paths, the device, the results file, the timeout, and
the verifier settings (``settings``, default: CTBench's ``abCROWN_configs/mnist_eps0.1.yaml``
— seed 100, PGD before BaB with 100 steps and 30 restarts, batch 100, α-CROWN with 20
iterations and shared α, BaB with kfsb branching). With a single ``vnnlib_path`` it writes a
VNN-COMP result file (:mod:`fastcert.complete.vnncomp`): ``sat`` / ``unsat`` / ``timeout`` /
``unknown``, a counterexample after ``sat``.
"""
from __future__ import annotations

import copy
import subprocess
from pathlib import Path

import yaml

from fastcert.complete.engine import Engine, Limits, Verdict, verdict_of_run
from fastcert.complete.limits import run_limited
from fastcert.complete.neuralsat import EngineMissing


def merged(base: dict, extra: dict) -> dict:
    """``base`` with ``extra``'s keys set, recursively into nested sections."""
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) \
            else copy.deepcopy(v)
    return out


class ABCrown(Engine):
    """``root``: the ``complete_verifier`` directory of an alpha-beta-CROWN checkout;
    ``python``: the interpreter of its environment; ``settings``: its YAML sections."""

    name = "abcrown"

    def __init__(self, root: str | None, python: str, settings: dict,
                 address_space_slack_gb: float = 4.0):
        self.root = Path(root) if root else None
        self.python = str(python)
        self.settings = dict(settings)
        self.slack = float(address_space_slack_gb)

    def checked_root(self) -> Path:
        if self.root is None or not (self.root / "abcrown.py").is_file():
            raise EngineMissing(f"alpha-beta-CROWN not found at {self.root}: set "
                                f"complete.abcrown.root=<checkout>/complete_verifier")
        return self.root

    def version(self) -> str:
        out = subprocess.run(["git", "-C", str(self.checked_root()), "describe", "--always",
                              "--tags"], capture_output=True, text=True, timeout=60)
        return out.stdout.strip() or "source"

    def config(self, onnx: Path, vnnlib: Path, limits: Limits, result: Path) -> dict:
        """The YAML α,β-CROWN reads for one property."""
        return merged(self.settings, {
            "model": {"onnx_path": str(onnx.resolve())},
            "specification": {"vnnlib_path": str(vnnlib.resolve())},
            "general": {"device": "cpu", "results_file": str(result.resolve())},
            "bab": {"timeout": float(limits.timeout_s)}})

    def verify(self, onnx: Path, vnnlib: Path, limits: Limits, work_dir: Path) -> Verdict:
        root = self.checked_root()
        work_dir.mkdir(parents=True, exist_ok=True)
        result, log = work_dir / "result.txt", work_dir / "abcrown.log"
        result.unlink(missing_ok=True)
        cfg = work_dir / "abcrown.yaml"
        cfg.write_text(yaml.safe_dump(self.config(onnx, vnnlib, limits, result)))
        finished = run_limited([self.python, "abcrown.py", "--config", str(cfg.resolve())],
                               root, limits.timeout_s + limits.grace_s, limits.memory_gb, log,
                               self.slack)
        return verdict_of_run(finished, result, log, limits)
