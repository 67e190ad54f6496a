from __future__ import annotations

import math

import pytest

from fastcert.schedules import EpsSchedule, linear_coefficient, regularizer_weight


def test_three_phases_linear_per_batch():
    s = EpsSchedule(eps_target=0.4, start=1, length=2, steps_per_epoch=10)
    eps = [s.eps(t) for t in range(50)]
    assert eps[:10] == [0.0] * 10                        # "1+": epoch 0 at eps=0
    ramp = eps[10:30]
    assert all(b > a for a, b in zip(ramp, ramp[1:]))   # grows every batch
    assert ramp[-1] == pytest.approx(0.4)               # reaches the target at the ramp's end
    assert ramp[0] == pytest.approx(0.4 / 20)
    assert eps[30:] == [0.4] * 20
    assert [s.phase(e) for e in range(5)] == ["eps0", "ramp", "ramp", "final", "final"]


def test_no_warmup_is_constant():
    s = EpsSchedule(eps_target=0.1, start=0, length=0, steps_per_epoch=5)
    assert {s.eps(t) for t in range(20)} == {0.1}


def test_smoothed_is_monotone_continuous_and_slower_at_first():
    lin = EpsSchedule(eps_target=1.0, start=0, length=10, steps_per_epoch=100)
    smo = EpsSchedule(eps_target=1.0, start=0, length=10, steps_per_epoch=100, kind="smoothed")
    values = [smo.eps(t) for t in range(1000)]
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert max(b - a for a, b in zip(values, values[1:])) < 0.01   # no jump at the joint
    assert values[-1] == pytest.approx(1.0)
    assert smo.eps(100) < lin.eps(100)                               # exponential start


def test_bad_schedules_are_rejected():
    with pytest.raises(ValueError, match="kind"):
        EpsSchedule(eps_target=0.1, start=0, length=1, steps_per_epoch=1, kind="cosine")
    with pytest.raises(ValueError, match=">= 0"):
        EpsSchedule(eps_target=-0.1, start=0, length=1, steps_per_epoch=1)


def test_lambda_follows_eq10_across_a_schedule():
    """λ = λ0(1 - ε/ε_target) during warmup, 0 once ε = ε_target (Eq. 10 of Shi et al. 2021)."""
    s = EpsSchedule(eps_target=0.2, start=1, length=3, steps_per_epoch=7)
    for t in range(70):
        eps = s.eps(t)
        lam = regularizer_weight(0.5, eps, 0.2)
        if t >= 28:
            assert lam == 0.0
        else:
            assert lam == pytest.approx(0.5 * (1 - eps / 0.2))
    assert regularizer_weight(0.5, 0.0, 0.2) == 0.5


def test_kappa_beta_linear_in_ramp_progress():
    assert linear_coefficient(1.0, 0.0, 0.25) == 0.75
    assert linear_coefficient(1.0, 0.5, 2.0) == 0.5
    assert math.isclose(linear_coefficient(0.0, 1.0, -1.0), 0.0)
