"""Each auto_LiRPA compatibility fix is needed where the installed versions need it (the feature
fails without it), is harmless where they do not, and is a no-op once the feature is there; and
α-CROWN tightens CROWN.

Which fix each stack needs (measured on torch 2.14.1: auto_LiRPA 0.3 from PyPI and 0.7.1 from
its newest source; see fastcert/compat.py):

======================  ==========================  =======
fix                     auto_LiRPA 0.3              0.7.1
======================  ==========================  =======
numpy_isin              needed (NumPy 2)            no
onnx_opset              needed (torch >= 2.9)       needed
node_getitem            needed                      no
named_members           needed                      no
alpha_clamp_gradient    needed (torch >= 2.14)      needed
sparse_features_alpha   needed                      no
======================  ==========================  =======
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
from importlib.metadata import version

import pytest
import torch
from torch import nn

from fastcert import compat

from conftest import ROOT, once_per_session


def _lirpa_03() -> bool:
    return version("auto_LiRPA").split(".")[:2] == ["0", "3"]


def _torch_at_least(major: int, minor: int) -> bool:
    return tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (major, minor)


#: Whether the installed versions need each fix (the table above).
NEEDED = {
    "numpy_isin": lambda: _lirpa_03() and int(__import__("numpy").__version__.split(".")[0]) >= 2,
    "onnx_opset": lambda: _torch_at_least(2, 9),
    "node_getitem": _lirpa_03,
    "named_members": _lirpa_03,
    "alpha_clamp_gradient": lambda: _torch_at_least(2, 14),
    "sparse_features_alpha": _lirpa_03,
}

SETUP = """
import warnings; warnings.filterwarnings("ignore")
from fastcert import compat
compat.apply(skip={skip!r})
import torch, torch.nn as nn
"""

# α-CROWN against CROWN on a random 20-50-50-3 MLP at ε = 0.3 (L∞), 20 iterations.
ALPHA_VS_CROWN = """
    from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 50), nn.ReLU(), nn.Linear(50, 50), nn.ReLU(),
                        nn.Linear(50, 3))
    x = torch.randn({batch}, 20)
    m = BoundedModule(net, torch.zeros(1, 20))
    xb = BoundedTensor(x, PerturbationLpNorm(norm=float("inf"), eps=0.3))
    crown, _ = m.compute_bounds(x=(xb,), method="CROWN")
    m.set_bound_opts({{"optimize_bound_args": {{"iteration": 20, "lr_alpha": 0.1}}}})
    alpha, _ = m.compute_bounds(x=(xb,), method="CROWN-Optimized")
    assert (alpha > crown + 1e-4).any(), "alpha-CROWN did not tighten any bound"
"""

# What each fix restores, exercised the way fastcert uses it.
PROBES = {
    "numpy_isin": "import auto_LiRPA",
    # loss fusion (Xu et al. 2020) exports torch.gather: without the opset-11+ symbolics it is
    # onnx::OneHot, which auto_LiRPA cannot bound (0.3 fails earlier, on _set_opset_version)
    "onnx_opset": """
        from auto_LiRPA import BoundedModule, CrossEntropyWrapper
        BoundedModule(CrossEntropyWrapper(nn.Sequential(nn.Linear(4, 3))),
                      (torch.zeros(2, 4), torch.zeros(2, dtype=torch.long)),
                      bound_opts={"loss_fusion": True})
    """,
    "node_getitem": """
        from auto_LiRPA import BoundedModule
        BoundedModule(nn.Sequential(nn.Linear(4, 3)), torch.zeros(2, 4))
    """,
    # torch>=2.0's Module.parameters()/buffers(), called by optimisers, state handling and
    # some CROWN paths of auto_LiRPA (backward_bound.py)
    "named_members": """
        from auto_LiRPA import BoundedModule
        m = BoundedModule(nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)),
                          torch.zeros(2, 4))
        assert len(list(m.parameters())) == 4
    """,
    # a batch of 4: every neuron unstable for some example, so the sparse-α bug stays quiet
    "alpha_clamp_gradient": ALPHA_VS_CROWN.format(batch=4),
    # a batch of 1: 49 of 50 neurons of a layer unstable (> 90 %, not all)
    "sparse_features_alpha": ALPHA_VS_CROWN.format(batch=1),
}
ERRORS = {
    "numpy_isin": "No module named 'numpy.lib.arraysetops'",
    "onnx_opset": "_set_opset_version|OneHot",
    "node_getitem": "not subscriptable",
    "named_members": "remove_duplicate",
    "alpha_clamp_gradient": "did not tighten",
    "sparse_features_alpha": "shape mismatch",
}


def _run(skip: set[str], probe: str) -> subprocess.CompletedProcess:
    code = SETUP.format(skip=skip) + textwrap.dedent(probe)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


def test_the_table_covers_every_fix():
    assert set(NEEDED) == set(PROBES) == set(ERRORS) == set(compat.FIXES)


@pytest.fixture(scope="module")
def with_every_fix(tmp_path_factory) -> dict[str, str | None]:
    """Every probe in one process with every fix applied, as fastcert runs: per fix, the
    probe's error (its traceback's last lines), or None where it passed."""
    import json

    runner = "import json, traceback\nerrors = {}\n" + "".join(
        f"try:\n{textwrap.indent(textwrap.dedent(probe), '    ')}\n"
        f"    errors[{fix!r}] = None\n"
        f"except Exception:\n    errors[{fix!r}] = traceback.format_exc()[-2000:]\n"
        for fix, probe in PROBES.items()) + "print('JSON' + json.dumps(errors))\n"

    def make(_):
        proc = _run(set(), runner)
        assert proc.returncode == 0, proc.stderr[-2000:]
        (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("JSON")]
        return json.loads(line[len("JSON"):])

    return once_per_session(tmp_path_factory, "compat_with_every_fix", make)


@pytest.mark.parametrize("fix", sorted(compat.FIXES))
def test_each_fix_is_needed_where_the_installed_versions_need_it(fix, with_every_fix):
    """Where needed, the probe fails without the fix (with the known error) and passes with
    it; elsewhere it passes without the fix (the table's "no" is checked, not assumed)."""
    import re

    without = _run({fix}, PROBES[fix])
    if NEEDED[fix]():
        assert without.returncode != 0, f"{fix}: the probe passed without the fix"
        output = without.stdout + without.stderr  # auto_LiRPA logs an unsupported op's name
        assert re.search(ERRORS[fix], output), output[-2000:]
        assert with_every_fix[fix] is None, with_every_fix[fix]
    else:
        assert without.returncode == 0, without.stderr[-2000:]


@pytest.mark.skipif(not _torch_at_least(2, 9), reason="torch < 2.9 registers symbolics eagerly")
def test_loss_fusion_needs_symbolic_opsets():
    """Without importing the opset-11+ symbolics, torch.gather becomes onnx::OneHot (fix 2),
    even with ``_set_opset_version`` back in place."""
    probe = """
        import torch.onnx.symbolic_helper as h
        from torch.onnx._internal.torchscript_exporter._globals import GLOBALS
        h._set_opset_version = lambda v: setattr(GLOBALS, "export_onnx_opset_version", v)
    """ + PROBES["onnx_opset"]
    # (the named_members and alpha fixes import auto_LiRPA inside apply(): skipped here too)
    without = _run({"onnx_opset", "named_members", "alpha_clamp_gradient",
                    "sparse_features_alpha"}, probe)
    output = without.stdout + without.stderr
    assert without.returncode != 0 and "OneHot" in output, output[-2000:]


def test_fixes_change_nothing_when_the_feature_exists():
    """Once applied, each fix finds its feature present and patches nothing: the same detection
    leaves a newer auto_LiRPA / older torch untouched."""
    compat.apply()
    import torch.onnx.symbolic_helper as helper
    from auto_LiRPA.operators import BoundRelu

    before = helper._set_opset_version, BoundRelu.__dict__["_relu_mask_alpha"]
    for name, fix in compat.FIXES.items():
        assert fix() is False, name
    assert (helper._set_opset_version, BoundRelu.__dict__["_relu_mask_alpha"]) == before


def test_closed_interval_clamp_keeps_clamps_values():
    x = torch.tensor([-1.0, 0.0, 0.5, 1.0, 2.0, float("nan")], requires_grad=True)
    y = compat._clamp_closed(x, min=0.0, max=1.0)
    torch.testing.assert_close(y, torch.clamp(x, 0.0, 1.0), equal_nan=True)
    y[:5].sum().backward()
    assert x.grad[:5].tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]   # 1 on the closed interval


@pytest.mark.parametrize("batch", [4, 1])
def test_alpha_crown_tightens_crown(batch):
    """α-CROWN (Xu et al. 2021) on a random 2-hidden-layer MLP at ε = 0.3: its lower bound is
    never below CROWN's and strictly above it (measured mean gain 0.048 at batch 4, 0.074 at
    batch 1; 0 before the fixes, or a crash at batch 1 on 0.3)."""
    compat.apply()
    from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 50), nn.ReLU(), nn.Linear(50, 50), nn.ReLU(),
                        nn.Linear(50, 3))
    x = torch.randn(batch, 20)
    m = BoundedModule(net, torch.zeros(1, 20))
    xb = BoundedTensor(x, PerturbationLpNorm(norm=float("inf"), eps=0.3))
    crown, _ = m.compute_bounds(x=(xb,), method="CROWN")
    m.set_bound_opts({"optimize_bound_args": {"iteration": 20, "lr_alpha": 0.1}})
    alpha, _ = m.compute_bounds(x=(xb,), method="CROWN-Optimized")
    crown, alpha = crown.detach(), alpha.detach()
    assert bool((alpha >= crown - 1e-5).all()), (alpha - crown).min()
    assert bool((alpha > crown + 1e-4).any()), "α-CROWN did not tighten any bound"
    assert (alpha - crown).mean() > 0.01
