"""Model selection on the validation split keeps the test set out of training and out of the
choice: the held-out examples are disjoint from the training examples, the selection reads only
them, and the test loader is first touched by the final evaluation."""
from __future__ import annotations

import pytest

from fastcert.pipeline import run
from test_validation_split import _base_indices

from conftest import TINY, compose_config

#: 3 epochs at the test radius (ramp 0+1), each scored on 30 held-out examples
SELECT_VAL = TINY + ["model.widths=[16,16]", "epochs=3", "schedule.start=0",
                     "schedule.length=1", "data.val_size=30", "select.metric=ibp_verified_acc",
                     "select.split=val"]


@pytest.mark.parametrize("aids", [[], ["aids.precise_bn=true", "aids.swa.start=1",
                                       "aids.swa.every=1"]])
def test_selection_on_val_never_trains_on_it_and_reads_the_test_set_last(tmp_path, loader_watch,
                                                                         aids):
    results = run(compose_config("config", SELECT_VAL + aids), tmp_path)

    (train, val), = loader_watch.loaded
    splits = {"train": _base_indices(train.dataset), "val": _base_indices(val.dataset)}
    events = loader_watch.events
    assert len(splits["val"]) == 30 and not set(splits["train"]) & set(splits["val"])
    during = events[:events.index("fit")]
    assert "test" not in during and "test.dataset" not in during
    assert during.count("val") == 3                # one selection pass after each epoch
    after = loader_watch.passes()[loader_watch.passes().index("fit"):]
    assert after == ["fit", "val", "test"]         # the kept model on val, then the test set
    assert results["selection"]["split"] == "val" and "warning" not in results["selection"]
    assert results["n_val"] == 30
