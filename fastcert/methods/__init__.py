"""Training methods, one class each; ``conf/method/<name>.yaml`` names its class with
``_target_: fastcert.methods.<Class>`` and sets its fields. See :mod:`fastcert.methods.base`
for the interface.

Shared parts are nested config nodes a method holds, not base classes it inherits: the κ ramp
(``method.kappa: {start, end}``, :class:`Ramp`) and the warmup regularisers of Shi et al. 2021
(``method.warmup: {lambda0, tau, tightness, relu, min_eps_reg}``, :class:`Warmup`), which
check their own values, so every holder refuses the same mistakes.

A method that trains from IBP initialisation (fast, sabr, taps, staps, mtl_ibp, cc_ibp,
exp_ibp) selects it in its option file's defaults list,
``override /init@_global_.init: ibp``: the run's ``init`` group (``@_global_.init``; a plain
``/init`` inside the ``method`` package would name ``method.init``). It stays a Hydra choice,
so ``method=X`` is all a user types, a command-line ``init=...`` wins by Hydra's own
precedence, the run's ``.hydra`` files and ``hydra.runtime.choices`` record it, and no code
needs to know which method prefers which initialisation.
"""
from fastcert.methods.adversarial import PGDTraining
from fastcert.methods.base import Batch, Method, Ramp, StepOutput, mix, natural_step
from fastcert.methods.crown import Crown, RelaxationRegularized
from fastcert.methods.crown_ibp import CrownIBP
from fastcert.methods.expressive import CCIBP, MTLIBP, ExpIBP
from fastcert.methods.ibp import IBP, FastIBP
from fastcert.methods.natural import Natural
from fastcert.methods.sabr import SABR
from fastcert.methods.taps import STAPS, TAPS
from fastcert.methods.warmup import Warmup

__all__ = ["Batch", "Method", "StepOutput", "Ramp", "Warmup", "mix", "natural_step", "Natural",
           "IBP", "FastIBP", "CrownIBP", "Crown", "RelaxationRegularized", "PGDTraining", "SABR",
           "TAPS", "STAPS", "MTLIBP", "CCIBP", "ExpIBP"]
