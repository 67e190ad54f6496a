"""Make auto_LiRPA 0.3 (the newest release on PyPI) run on PyTorch 2.x and NumPy 2.

auto_LiRPA 0.3 (Sept 2022) was written for torch<1.13. On today's stack it breaks in four
places (measured, see shared/NOTES.md). Each fix below is applied only when the feature it
restores is missing, so a newer auto_LiRPA (or an older torch) is left untouched:

1. ``numpy_isin``        NumPy 2 removed ``numpy.lib.arraysetops``; 0.3 imports ``isin`` from it.
2. ``onnx_opset``        ``torch.onnx.symbolic_helper._set_opset_version`` is gone (the opset now
                         lives in the TorchScript exporter's ``GLOBALS``), and the opset-7..20
                         symbolic modules are no longer imported eagerly, so without importing them
                         ``torch.gather`` is exported as ``onnx::OneHot`` and loss fusion fails.
                         This import is needed on torch>=2.9 whatever the auto_LiRPA version.
3. ``node_getitem``      ``torch._C.Node.__getitem__`` (attribute access by key) is gone.
4. ``named_members``     ``nn.Module.parameters()`` now passes ``remove_duplicate=`` to
                         ``_named_members``, which 0.3's ``BoundedModule`` override does not accept.

Call :func:`apply` before the first ``import auto_LiRPA``; :mod:`fastcert.bounds` does so, and
every fastcert module reaches auto_LiRPA through it.
"""
from __future__ import annotations

import importlib
import inspect
import sys
import types
from typing import Callable, Iterable

__all__ = ["apply", "FIXES", "applied"]

applied: dict[str, bool] = {}
"""Which fixes :func:`apply` found necessary (name -> True if it patched something)."""


def _fix_numpy_isin() -> bool:
    try:
        importlib.import_module("numpy.lib.arraysetops")
        return False
    except ImportError:
        pass
    import numpy

    module = types.ModuleType("numpy.lib.arraysetops")
    module.isin = numpy.isin
    sys.modules["numpy.lib.arraysetops"] = module
    return True


def _fix_onnx_opset() -> bool:
    import torch.onnx.symbolic_helper as helper

    patched = False
    try:
        exporter = importlib.import_module("torch.onnx._internal.torchscript_exporter")
    except ImportError:  # torch < 2.9: symbolics are registered eagerly
        exporter = None
    if exporter is not None:
        import pkgutil

        for info in pkgutil.iter_modules(exporter.__path__):
            if info.name.startswith("symbolic_opset"):
                name = f"{exporter.__name__}.{info.name}"
                if name not in sys.modules:
                    importlib.import_module(name)
                    patched = True
    if not hasattr(helper, "_set_opset_version"):
        from torch.onnx._internal.torchscript_exporter._globals import GLOBALS

        def _set_opset_version(opset_version: int) -> None:
            GLOBALS.export_onnx_opset_version = opset_version

        helper._set_opset_version = _set_opset_version
        patched = True
    return patched


def _fix_node_getitem() -> bool:
    import torch

    if hasattr(torch._C.Node, "__getitem__"):
        return False
    from torch.onnx.symbolic_helper import _node_get

    torch._C.Node.__getitem__ = lambda node, key: _node_get(node, key)
    return True


def _fix_named_members() -> bool:
    from auto_LiRPA import BoundedModule

    original = BoundedModule._named_members
    if "remove_duplicate" in inspect.signature(original).parameters:
        return False

    def _named_members(self, get_members_fn, prefix="", recurse=True, remove_duplicate=True):
        # 0.3's override already de-duplicates; the keyword is accepted for torch>=2.0's callers.
        return original(self, get_members_fn, prefix=prefix, recurse=recurse)

    BoundedModule._named_members = _named_members
    return True


# Order matters: the first three must run before auto_LiRPA is imported, the last after.
FIXES: dict[str, Callable[[], bool]] = {
    "numpy_isin": _fix_numpy_isin,
    "onnx_opset": _fix_onnx_opset,
    "node_getitem": _fix_node_getitem,
    "named_members": _fix_named_members,
}


def apply(skip: Iterable[str] = ()) -> dict[str, bool]:
    """Apply every fix not in ``skip`` (idempotent). Returns ``{name: patched?}``.

    ``skip`` exists for the tests that show each fix is needed; fastcert itself never skips.
    """
    skip = set(skip)
    unknown = skip - set(FIXES)
    if unknown:
        raise ValueError(f"unknown compat fix(es) {sorted(unknown)}; known: {sorted(FIXES)}")
    for name, fix in FIXES.items():
        if name in skip:
            continue
        if name not in applied:
            applied[name] = fix()
    return dict(applied)
