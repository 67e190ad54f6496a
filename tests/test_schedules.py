from __future__ import annotations

import math

import pytest

from fastcert.config import ConfigError, build_option
from fastcert.schedules import (LinearSchedule, SmoothedSchedule, linear_coefficient,
                                regularizer_weight)


def test_three_phases_linear_per_batch():
    s = LinearSchedule(eps_target=0.4, start=1, length=2, steps_per_epoch=10)
    eps = [s.eps(t) for t in range(50)]
    assert eps[:10] == [0.0] * 10                        # "1+": epoch 0 at eps=0
    ramp = eps[10:30]
    assert all(b > a for a, b in zip(ramp, ramp[1:]))   # grows every batch
    assert ramp[-1] == pytest.approx(0.4)               # reaches the target at the ramp's end
    assert ramp[0] == pytest.approx(0.4 / 20)
    assert eps[30:] == [0.4] * 20
    assert [s.phase(e) for e in range(5)] == ["eps0", "ramp", "ramp", "final", "final"]


def test_no_warmup_is_constant():
    s = LinearSchedule(eps_target=0.1, start=0, length=0, steps_per_epoch=5)
    assert {s.eps(t) for t in range(20)} == {0.1}


def test_smoothed_is_monotone_continuous_and_slower_at_first():
    lin = LinearSchedule(eps_target=1.0, start=0, length=10, steps_per_epoch=100)
    smo = SmoothedSchedule(eps_target=1.0, start=0, length=10, steps_per_epoch=100)
    values = [smo.eps(t) for t in range(1000)]
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert max(b - a for a, b in zip(values, values[1:])) < 0.01   # no jump at the joint
    assert values[-1] == pytest.approx(1.0)
    assert smo.eps(100) < lin.eps(100)                               # exponential start


def test_bad_schedules_are_rejected():
    with pytest.raises(ConfigError, match="schedule.mid='abc': expected a number"):
        build_option("schedule", "smoothed", {"mid": "abc"}, eps_target=0.1, steps_per_epoch=1)
    with pytest.raises(ConfigError, match="schedule.kind is not a key"):
        build_option("schedule", "linear", {"kind": "cosine"}, eps_target=0.1, steps_per_epoch=1)
    with pytest.raises(ValueError, match="mid must be in"):
        SmoothedSchedule(eps_target=0.1, start=0, length=1, steps_per_epoch=1, mid=1.5)
    with pytest.raises(ValueError, match=">= 0"):
        LinearSchedule(eps_target=-0.1, start=0, length=1, steps_per_epoch=1)


def test_lambda_follows_eq10_across_a_schedule():
    """λ = λ0(1 - ε/ε_target) during warmup, 0 once ε = ε_target (Eq. 10 of Shi et al. 2021)."""
    s = LinearSchedule(eps_target=0.2, start=1, length=3, steps_per_epoch=7)
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


@pytest.mark.parametrize("option,cls", [("linear", LinearSchedule), ("smoothed", SmoothedSchedule)])
def test_each_schedule_config_builds_its_class(option, cls):
    s = build_option("schedule", option, eps_target=0.3, steps_per_epoch=4)
    assert type(s) is cls and s.eps_target == 0.3 and s.steps_per_epoch == 4
