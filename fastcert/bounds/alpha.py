"""α-CROWN of the margins as α,β-CROWN runs it: intermediate bounds from CROWN, α of the final
specification optimised, never looser than CROWN.

α-CROWN (Xu et al. 2021, Sec. 3.1) lower-bounds the margins C·f over the box with the linear
relaxation whose lower ReLU slopes α ∈ [0, 1] are free, and maximises the bound over α by
projected gradient steps; every α gives a sound bound (Eq. 4-5 of Xu et al. 2021). Left to its
defaults, auto_LiRPA 0.3 also re-optimises the α of every *intermediate* layer's bounds at each
iteration (one backward pass per ReLU layer per iteration, and one α set per pair of layers);
α,β-CROWN instead computes the intermediate bounds once by CROWN and optimises only the α of
the final specification (its ``fix_interm_bounds``). Here:

1. one CROWN pass (``init_slope``) gives the intermediate bounds, the initial α (CROWN's own
   slopes) and CROWN's margin bounds m̲^CROWN;
2. ``iteration`` Adam steps on the final specification's α with the intermediate bounds fixed,
   stopping early when every margin bound is > 0 (the examples are verified) or after
   ``early_stop_patience`` steps without improvement (auto_LiRPA's ``optimize_bound_args``);
3. the result is max(m̲^α, m̲^CROWN) per margin: both are sound lower bounds of the same margin,
   so their maximum is one, and α-CROWN is never looser than CROWN even when Adam's first step
   moves away from CROWN's slopes.
"""
from __future__ import annotations

import contextlib
import io
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from auto_LiRPA import BoundedModule, BoundedTensor

#: auto_LiRPA's α-CROWN options fastcert sets (the caller's ``iteration`` and ``lr_alpha`` are
#: kept): the intermediate bounds given, α initialised here.
FIXED_OPTIONS = {"fix_intermediate_layer_bounds": True, "init_alpha": False}


def _stop_when_verified(caller):
    """auto_LiRPA's ``stop_criterion_func``: stop once every margin bound of the chunk is > 0,
    or when the caller's own criterion ``caller`` (e.g. certify's per-example time limit) says
    so."""
    def stop(bound: torch.Tensor) -> bool:
        return bool((bound > 0).all()) or bool(caller(bound))
    return stop


def alpha_crown_margins(module: BoundedModule, x: BoundedTensor, C: torch.Tensor,
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower bounds (B, T) of the margins ``C @ f`` over ``x``'s box: α-CROWN's (see the module
    docstring) and CROWN's, in that order; the first is elementwise ≥ the second."""
    opts = module.bound_opts["optimize_bound_args"]
    saved = {k: opts[k] for k in (*FIXED_OPTIONS, "stop_criterion_func")}
    stop = _stop_when_verified(saved["stop_criterion_func"])
    opts.update(FIXED_OPTIONS, stop_criterion_func=stop)
    try:
        with torch.no_grad():
            module(x)
            crown, _, interm = module.init_slope((x,), method="backward", c=C,
                                                 bound_upper=False)
        # auto_LiRPA prints a line when the stop criterion holds
        with torch.enable_grad(), contextlib.redirect_stdout(io.StringIO()):
            alpha, _ = module.compute_bounds(x=(x,), C=C, method="CROWN-Optimized",
                                             bound_upper=False,
                                             intermediate_layer_bounds=interm)
    finally:
        opts.update(saved)
    crown = crown.detach()
    return torch.maximum(alpha.detach(), crown), crown

