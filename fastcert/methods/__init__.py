"""Training methods, one class each; ``conf/method/<name>.yaml`` names its class with
``_target_: fastcert.methods.<Class>`` and sets its fields. See :mod:`fastcert.methods.base`
for the interface."""
from fastcert.methods.adversarial import PGDTraining
from fastcert.methods.base import Batch, Method, StepOutput, mix, natural_step
from fastcert.methods.crown import Crown, RelaxationRegularized
from fastcert.methods.crown_ibp import CrownIBP
from fastcert.methods.expressive import CCIBP, MTLIBP, ExpIBP
from fastcert.methods.ibp import IBP, FastIBP
from fastcert.methods.natural import Natural
from fastcert.methods.sabr import SABR
from fastcert.methods.taps import STAPS, TAPS

__all__ = ["Batch", "Method", "StepOutput", "mix", "natural_step", "Natural", "IBP", "FastIBP",
           "CrownIBP", "Crown", "RelaxationRegularized", "PGDTraining", "SABR", "TAPS", "STAPS",
           "MTLIBP", "CCIBP", "ExpIBP"]
