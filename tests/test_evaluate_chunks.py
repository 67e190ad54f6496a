"""The evaluation in chunks (fastcert.memory.Budget) computes what it computes at once, and
α-CROWN (fastcert.bounds.alpha) is never looser than CROWN."""
from __future__ import annotations

import pytest
import torch

from fastcert import memory
from fastcert.attacks import PGDConfig
from fastcert.bounds import Bound, BoundedNet, alpha_crown_margins, margin_spec
from fastcert.evaluate import evaluate


def _net_and_batch(n: int = 12):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    x = torch.rand(n, 1, 8, 8)
    y = torch.randint(0, 10, (n,))
    return BoundedNet(model, x[:2], 10).eval(), x, y


def _box(x, eps):
    return (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)


@pytest.mark.skipif(not memory.reset_peak(), reason="needs /proc/self/clear_refs")
def test_chunks_of_one_give_the_bounds_of_one_batch(monkeypatch):
    """A budget below the resident memory runs one example at a time: CROWN's and IBP's margin
    bounds are those of the whole batch (up to float summation order)."""
    net, x, y = _net_and_batch()
    args = (net, [(x, y)], _box, 0.05)
    kw = {"verifiers": ["ibp", "crown"], "pgd": PGDConfig(steps=2, restarts=1)}
    whole = evaluate(*args, **kw, memory_gb=64.0)
    chunked = evaluate(*args, **kw, memory_gb=1e-3)
    for v in ("ibp", "crown"):
        torch.testing.assert_close(chunked.margin_lb[v], whole.margin_lb[v], rtol=1e-5,
                                   atol=1e-5)
    assert set(chunked.peak_rss) == {"attack", "ibp", "crown"}


def test_alpha_crown_is_at_least_crown_per_margin():
    net, x, y = _net_and_batch()
    lower, upper = _box(x, 0.1)
    alpha, crown = alpha_crown_margins(net.bounded, net.perturbed(x, lower, upper),
                                       margin_spec(y, 10))
    with torch.no_grad():
        direct = net.margin_bounds(x, y, lower, upper, Bound.CROWN)[1]
    torch.testing.assert_close(crown, direct, rtol=1e-5, atol=1e-5)
    assert (alpha >= crown).all()
    assert (alpha > crown + 1e-4).any()  # the optimisation tightens something here
