"""Each auto_LiRPA compatibility fix is needed (the feature fails without it) and is a no-op
when the feature is already there."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from fastcert import compat

SETUP = """
import warnings; warnings.filterwarnings("ignore")
from fastcert import compat
compat.apply(skip={skip!r})
import torch, torch.nn as nn
"""

# What each fix restores, exercised the way fastcert uses it.
PROBES = {
    "numpy_isin": "import auto_LiRPA",
    "onnx_opset": "import auto_LiRPA",
    "node_getitem": """
        from auto_LiRPA import BoundedModule
        BoundedModule(nn.Sequential(nn.Linear(4, 3)), torch.zeros(2, 4))
    """,
    # torch>=2.0's Module.parameters()/buffers(), called by optimisers, state handling and
    # some CROWN paths of auto_LiRPA (backward_bound.py)
    "named_members": """
        from auto_LiRPA import BoundedModule
        m = BoundedModule(nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)), torch.zeros(2, 4))
        assert len(list(m.parameters())) == 4
    """,
}
ERRORS = {
    "numpy_isin": "No module named 'numpy.lib.arraysetops'",
    "onnx_opset": "_set_opset_version",
    "node_getitem": "not subscriptable",
    "named_members": "remove_duplicate",
}


def _run(skip: set[str], probe: str) -> subprocess.CompletedProcess:
    code = SETUP.format(skip=skip) + textwrap.dedent(probe)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("fix", sorted(compat.FIXES))
def test_each_fix_is_needed(fix):
    without = _run({fix}, PROBES[fix])
    assert without.returncode != 0, f"{fix}: the probe passed without the fix"
    assert ERRORS[fix] in without.stderr, without.stderr[-2000:]
    with_fix = _run(set(), PROBES[fix])
    assert with_fix.returncode == 0, with_fix.stderr[-2000:]


def test_loss_fusion_needs_symbolic_opsets():
    """Without importing the opset-11+ symbolics, torch.gather becomes onnx::OneHot (fix 2)."""
    probe = """
        import torch.onnx.symbolic_helper as h
        from torch.onnx._internal.torchscript_exporter._globals import GLOBALS
        h._set_opset_version = lambda v: setattr(GLOBALS, "export_onnx_opset_version", v)
        import auto_LiRPA
        from auto_LiRPA import BoundedModule, CrossEntropyWrapper
        BoundedModule(CrossEntropyWrapper(nn.Sequential(nn.Linear(4, 3))),
                      (torch.zeros(2, 4), torch.zeros(2, dtype=torch.long)),
                      bound_opts={"loss_fusion": True})
    """
    # (the named_members fix imports auto_LiRPA inside apply(), so it is skipped here too)
    without = _run({"onnx_opset", "named_members"}, probe)
    output = without.stdout + without.stderr  # auto_LiRPA logs the unsupported op's name
    assert without.returncode != 0 and "OneHot" in output, output[-2000:]


def test_fixes_change_nothing_when_the_feature_exists():
    """Once applied, each fix finds its feature present and patches nothing: the same detection
    leaves a newer auto_LiRPA / older torch untouched."""
    compat.apply()
    import torch.onnx.symbolic_helper as helper

    before = helper._set_opset_version
    for name, fix in compat.FIXES.items():
        assert fix() is False, name
    assert helper._set_opset_version is before
