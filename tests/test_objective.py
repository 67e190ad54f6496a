"""``optimized_metric`` is checked against the metrics the run will produce
(:func:`fastcert.settings.produced_metrics`), as one key or a list of keys."""
from __future__ import annotations

import re

import pytest

from fastcert.config import ConfigError
from fastcert.settings import produced_metrics, validate


def test_the_produced_metrics_follow_the_verifiers(compose):
    assert produced_metrics(validate(compose(["eval.verifiers=[crown]"]))) == {
        "clean_acc", "pgd_acc", "wall_time_s", "crown_verified_acc", "any_verified_acc"}
    assert produced_metrics(validate(compose(["eval.verifiers=[]"]))) == {
        "clean_acc", "pgd_acc", "wall_time_s"}


@pytest.mark.parametrize("objective", ["ibp_verified_acc", "[clean_acc,ibp_verified_acc]",
                                       "null"])
def test_a_produced_objective_is_accepted(compose, objective):
    validate(compose([f"optimized_metric={objective}"]))


@pytest.mark.parametrize("overrides,message", [
    (["optimized_metric=[clean_acc,ibp_verifed_acc]"], "did you mean ibp_verified_acc?"),
    (["optimized_metric=crown_verified_acc", "eval.verifiers=[ibp]"],
     "eval.verifiers=[ibp] does not run crown; add it (eval.verifiers=[ibp,crown])"),
    (["optimized_metric=epochs"], "not a metric this run produces"),
])
def test_an_objective_the_run_does_not_produce_is_refused(compose, overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(compose(overrides))
