from __future__ import annotations

import math

import pytest

from fastcert.config import ConfigError, build_option
from fastcert.schedules import (
    LinearSchedule,
    SmoothedSchedule,
    linear_coefficient,
    regularizer_weight,
)


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
    values = [smo.eps(t) for t in range(1001)]
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert max(b - a for a, b in zip(values, values[1:])) < 0.01   # no jump at the joint
    assert values[-1] == 1.0                                         # first batch after the ramp
    assert smo.eps(100) < lin.eps(100)                               # exponential start


def _formula(step: int, start: int, length: int, steps: int, target: float,
             mid: float = 0.25, p: float = 4.0) -> float:
    """auto_LiRPA's SmoothedScheduler (auto_LiRPA/eps_scheduler.py) written out, with its own
    1-based ``start`` (one more than the schedule's)."""
    init, final = (start - 1) * steps, (start + length - 1) * steps
    mid_step = int((final - init) * mid) + init
    t = (mid_step - init) ** (p - 1)
    alpha = target / ((final - mid_step) * p * t + (mid_step - init) * t)
    mid_value = alpha * (mid_step - init) ** p
    if step <= init:
        return 0.0
    if step < mid_step:
        return alpha * (step - init) ** p
    return min(mid_value + (target - mid_value) * (step - mid_step) / (final - mid_step), target)


#: Shi et al. 2021's runs (start, length, batches per epoch, ε_target, epochs) in the
#: schedule's convention; auto_LiRPA's start is one more.
SHI_RUNS = {
    "mnist_70": (0, 20, 235, 0.4, 70),
    "cifar10_70": (1, 20, 391, 8 / 255, 70),
    "cifar10_160": (1, 80, 391, 8 / 255, 160),
    "tinyimagenet_1_10_69": (1, 10, 782, 1 / 255, 80),
    "tinyimagenet_1_20_59": (1, 20, 782, 1 / 255, 80),
}


@pytest.mark.parametrize("run", sorted(SHI_RUNS))
def test_smoothed_equals_the_formula_on_the_papers_runs(run):
    """Every batch of every run of Tables 1-2 (the released code's smoothed schedule, mid 0.25,
    exponent 4), and where ε first reaches the target: the first batch of epoch start+length."""
    start, length, steps, target, epochs = SHI_RUNS[run]
    s = SmoothedSchedule(start=start, length=length, steps_per_epoch=steps, eps_target=target)
    ours = [s.eps(t) for t in range(epochs * steps)]
    assert ours == [_formula(t, start + 1, length, steps, target) for t in range(epochs * steps)]
    reached = ours.index(target)
    assert reached == (start + length) * steps
    assert all(v == target for v in ours[reached:]) and max(ours[:reached]) < target
    zero = (start * steps) + 1          # the `start` epochs and the next epoch's first batch
    assert ours[:zero] == [0.0] * zero and ours[zero] > 0
    assert [s.phase(e) for e in (start, start + length - 1, start + length)] == [
        "ramp", "ramp", "final"]


def test_smoothed_equals_auto_lirpas_scheduler():
    """Stepped as Shi et al.'s train.py steps it (step_epoch per epoch, step_batch before each
    batch, one global counter), auto_LiRPA's own SmoothedScheduler gives the same floats."""
    from fastcert import compat

    compat.apply()
    from auto_LiRPA.eps_scheduler import SmoothedScheduler

    for start, length, steps, target, mid, p in [(0, 3, 7, 0.4, 0.25, 4.0),
                                                 (2, 5, 13, 8 / 255, 0.25, 4.0),
                                                 (1, 4, 10, 0.1, 0.4, 2.0)]:
        ref = SmoothedScheduler(target, f"start={start + 1},length={length},mid={mid},beta={p}")
        ref.set_epoch_length(steps)
        ref.train()
        expected = []
        for _ in range(start + length + 2):
            ref.step_epoch()
            for _ in range(steps):
                ref.step_batch()
                expected.append(ref.get_eps())
        ours = SmoothedSchedule(start=start, length=length, steps_per_epoch=steps,
                                eps_target=target, mid=mid, exponent=p)
        assert [ours.eps(t) for t in range(len(expected))] == expected


def test_smoothed_degenerate_ramps():
    assert [SmoothedSchedule(start=1, length=0, steps_per_epoch=2, eps_target=0.3).eps(t)
            for t in range(4)] == [0.0, 0.0, 0.3, 0.3]
    short = SmoothedSchedule(start=0, length=1, steps_per_epoch=3, eps_target=0.3)  # M = S
    assert [short.eps(t) for t in range(4)] == pytest.approx([0.0, 0.1, 0.2, 0.3])


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
