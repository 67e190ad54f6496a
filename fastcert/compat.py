"""Make auto_LiRPA 0.3 (the newest release on PyPI) run on PyTorch 2.x and NumPy 2, and make
α-CROWN optimise on torch >= 2.14 whatever the auto_LiRPA version.

auto_LiRPA 0.3 (Sept 2022) was written for torch<1.13. On today's stack it breaks in four
places (each probed by tests/test_compat.py), and α-CROWN fails in two more. Each fix below is
applied only when a probe shows the feature it restores is missing, so a newer auto_LiRPA (or an
older torch) is left untouched (tested versions: auto_LiRPA 0.3 from PyPI and 0.7.1 from source,
on torch 2.14.1):

1. ``numpy_isin``        NumPy 2 removed ``numpy.lib.arraysetops``; 0.3 imports ``isin`` from it.
2. ``onnx_opset``        ``torch.onnx.symbolic_helper._set_opset_version`` is gone (the opset now
                         lives in the TorchScript exporter's ``GLOBALS``), and the opset-7..20
                         symbolic modules are no longer imported eagerly, so without importing them
                         ``torch.gather`` is exported as ``onnx::OneHot`` and loss fusion fails.
                         This import is needed on torch>=2.9 whatever the auto_LiRPA version.
3. ``node_getitem``      ``torch._C.Node.__getitem__`` (attribute access by key) is gone.
4. ``named_members``     ``nn.Module.parameters()`` now passes ``remove_duplicate=`` to
                         ``_named_members``, which 0.3's ``BoundedModule`` override does not accept.
5. ``alpha_clamp_gradient`` torch 2.14 changed the gradient of ``torch.clamp`` at its bounds from 1
                         (the closed interval, torch <= 2.13) to 0 (pytorch issue #184574). α-CROWN
                         starts every ReLU slope α at CROWN's, exactly 0 or 1, and uses
                         ``clamp(α, 0, 1)`` in ``BoundRelu._relu_mask_alpha``: every α gets gradient
                         0, Adam never moves it and α-CROWN returns CROWN's bound (0.3 and 0.7.1).
                         The fix gives that one function a ``clamp`` whose gradient is 1 on the
                         closed interval again. Needed on torch >= 2.14 whatever the auto_LiRPA.
6. ``sparse_features_alpha`` a bug of 0.3 on any torch (fixed by 0.7.1): when more than
                         ``minimum_sparsity`` (90 %) but not all of a ReLU layer's neurons are
                         unstable, ``BoundRelu.init_opt_parameters`` allocates full-size α yet keeps
                         the sparse ``alpha_indices`` (a line indented under ``if verbosity > 0``),
                         and α-CROWN fails with "shape mismatch" in ``reconstruct_full_alpha``. The
                         fix drops ``alpha_indices`` when the α it allocated are full-size.

Call :func:`apply` before the first ``import auto_LiRPA``; :func:`fastcert.bounds.auto_lirpa`
does so, and every fastcert module reaches auto_LiRPA through it. tests/test_compat.py
tabulates which versions need which fix and checks each there.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import sys
import types
from collections.abc import Callable, Iterable

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


# ---- 5. alpha_clamp_gradient ------------------------------------------------------------------


def _clamp_closed(input, min=None, max=None):
    """``torch.clamp(input, min, max)`` with torch <= 2.13's subgradient: 1 on the closed interval
    [min, max], 0 outside. The values are clamp's (NaN included)."""
    import torch

    clamped = torch.clamp(input, min=min, max=max)
    if not (isinstance(input, torch.Tensor) and input.requires_grad):
        return clamped
    inside = torch.ones_like(input, dtype=torch.bool)
    if min is not None:
        inside &= input >= min
    if max is not None:
        inside &= input <= max
    # where inside, the value is the input itself (gradient 1); elsewhere clamp's (gradient 0)
    return torch.where(inside, input, clamped)


class _TorchClosedClamp(types.ModuleType):
    """The ``torch`` one auto_LiRPA function sees: torch itself, but for :func:`_clamp_closed`."""

    def __init__(self):
        super().__init__("torch")

    clamp = staticmethod(_clamp_closed)

    def __getattr__(self, name):
        import torch

        return getattr(torch, name)


def _slope_gradient_at_bounds(mask_alpha) -> list[float]:
    """The gradient ``mask_alpha`` (``BoundRelu._relu_mask_alpha``) passes to slopes α = 0 and
    α = 1 of two unstable neurons (pre-activation bounds [-1, 1]): [1, 1] when α can move."""
    import torch

    alpha = torch.tensor([0.0, 1.0], requires_grad=True)
    slopes = mask_alpha(-torch.ones(2), torch.ones(2), alpha, None)[0]
    (grad,) = torch.autograd.grad(slopes.sum(), alpha, allow_unused=True)
    return [0.0, 0.0] if grad is None else grad.tolist()


def _fix_alpha_clamp_gradient() -> bool:
    from auto_LiRPA.operators import BoundRelu

    original = BoundRelu.__dict__.get("_relu_mask_alpha")
    if not isinstance(original, staticmethod) or not isinstance(original.__func__,
                                                                types.FunctionType):
        return False  # an auto_LiRPA laid out otherwise: nothing this fix knows how to patch
    if _slope_gradient_at_bounds(BoundRelu._relu_mask_alpha) == [1.0, 1.0]:
        return False  # torch <= 2.13, or an auto_LiRPA that does not clamp α this way
    func = original.__func__
    # the same code, only its global name ``torch`` resolves to the closed-interval clamp
    patched = types.FunctionType(func.__code__, {**func.__globals__, "torch": _TorchClosedClamp()},
                                 func.__name__, func.__defaults__, func.__closure__)
    patched.__kwdefaults__ = func.__kwdefaults__
    functools.update_wrapper(patched, func)
    BoundRelu._relu_mask_alpha = staticmethod(patched)
    if _slope_gradient_at_bounds(BoundRelu._relu_mask_alpha) != [1.0, 1.0]:
        BoundRelu._relu_mask_alpha = original
        raise RuntimeError("compat fix alpha_clamp_gradient did not restore the slopes' gradient")
    return True


# ---- 6. sparse_features_alpha -----------------------------------------------------------------


def _full_alpha_sparse_indices(relu) -> bool:
    """True when ``relu`` holds full-size α but a sparse ``alpha_indices`` (the 0.3 bug)."""
    if getattr(relu, "alpha_indices", None) is None or not getattr(relu, "alpha", None):
        return False
    full = tuple(relu.inputs[0].lower.shape[1:])
    return any(tuple(a.shape[3:]) == full for a in relu.alpha.values())


def _sparse_alpha_probe() -> bool | None:
    """Initialise α (``BoundRelu.init_opt_parameters``, as α-CROWN does after a CROWN pass) on a
    real 1-20-2 network whose ReLU layer has 19 of 20 neurons unstable (> 90 %: full α).
    True: the bug's inconsistent state; False: consistent; None: this auto_LiRPA initialises
    α some other way (nothing to check)."""
    import torch
    from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm
    from auto_LiRPA.operators import BoundRelu

    first, last = torch.nn.Linear(1, 20), torch.nn.Linear(20, 2)
    with torch.no_grad():
        first.weight.fill_(1.0)
        first.bias.zero_()
        first.bias[0] = 2.0  # pre-activation in [1, 3]: the one stable neuron
        last.weight.copy_(torch.linspace(-1.0, 1.0, 40).view(2, 20))
        last.bias.zero_()
    net = BoundedModule(torch.nn.Sequential(first, torch.nn.ReLU(), last), torch.zeros(1, 1))
    x = BoundedTensor(torch.zeros(1, 1), PerturbationLpNorm(norm=float("inf"), eps=1.0))
    relu = next(n for n in net.modules() if isinstance(n, BoundRelu))
    try:
        relu.opt_init()
        with torch.no_grad():
            net.compute_bounds(x=(x,), method="CROWN")
        relu.init_opt_parameters([(net.final_name, 2, None)])
    except (AttributeError, TypeError, KeyError):
        return None
    return _full_alpha_sparse_indices(relu)


def _fix_sparse_features_alpha() -> bool:
    from auto_LiRPA.operators import BoundRelu

    if not _sparse_alpha_probe():
        return False
    original = BoundRelu.init_opt_parameters

    @functools.wraps(original)
    def init_opt_parameters(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if _full_alpha_sparse_indices(self):
            self.alpha_indices = None  # full α: what 0.3's "# Use full alpha." line meant
        return out

    BoundRelu.init_opt_parameters = init_opt_parameters
    if _sparse_alpha_probe():
        BoundRelu.init_opt_parameters = original
        raise RuntimeError("compat fix sparse_features_alpha did not repair alpha_indices")
    return True


# Order matters: the first three must run before auto_LiRPA is imported, the others after.
FIXES: dict[str, Callable[[], bool]] = {
    "numpy_isin": _fix_numpy_isin,
    "onnx_opset": _fix_onnx_opset,
    "node_getitem": _fix_node_getitem,
    "named_members": _fix_named_members,
    "alpha_clamp_gradient": _fix_alpha_clamp_gradient,
    "sparse_features_alpha": _fix_sparse_features_alpha,
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
