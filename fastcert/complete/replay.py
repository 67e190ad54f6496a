"""A counterexample checked, not trusted: the input an engine returned is replayed through the
PyTorch model. It counts only if it lies in the property's box (within ``box_tol``, the
rounding of a decimal printout) and some class j ≠ y scores at least as high as the label
there: min over j ≠ y of f_y(x') - f_j(x') ≤ 0, the property ``fastcert.export`` writes."""
from __future__ import annotations

from dataclasses import dataclass

import torch

#: How far (normalised units) a counterexample may lie outside the box: engines print
#: float32 values in decimal; 1e-6 is far below one grey level (1/255 / std).
BOX_TOL = 1e-6


@dataclass
class Replay:
    """``violates``: in the box and misclassified; ``margin``: f_y - max_{j≠y} f_j at the
    (box-clamped) point; ``outside``: its largest distance outside the box."""

    violates: bool
    margin: float
    outside: float


def replay(model: torch.nn.Module, values: list[float], lower: torch.Tensor,
           upper: torch.Tensor, label: int, box_tol: float = BOX_TOL) -> Replay:
    """Replay ``values`` (X_0 … X_{n-1}, C-order of one input of shape ``lower.shape``)."""
    if len(values) != lower.numel():
        return Replay(False, float("nan"), float("inf"))
    x = torch.tensor(values, dtype=torch.float32).reshape(lower.shape)
    outside = float(torch.maximum(lower - x, x - upper).clamp_min(0).max())
    x = torch.minimum(torch.maximum(x, lower), upper)
    with torch.no_grad():
        logits = model(x.unsqueeze(0))[0]
    others = torch.cat([logits[:label], logits[label + 1:]])
    margin = float(logits[label] - others.max())
    return Replay(outside <= box_tol and margin <= 0, margin, outside)
