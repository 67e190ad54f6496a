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


class _Watched:
    """A loader that records each pass over it and each read of its data set."""

    def __init__(self, loader, name: str, events: list):
        self._loader, self._name, self._events = loader, name, events

    def __iter__(self):
        self._events.append(self._name)
        return iter(self._loader)

    def __len__(self):
        return len(self._loader)

    @property
    def dataset(self):
        self._events.append(f"{self._name}.dataset")
        return self._loader.dataset

    def __getattr__(self, key):
        return getattr(self._loader, key)


@pytest.mark.parametrize("aids", [[], ["aids.precise_bn=true", "aids.swa.start=1",
                                       "aids.swa.every=1"]])
def test_selection_on_val_never_trains_on_it_and_reads_the_test_set_last(tmp_path, monkeypatch,
                                                                         aids):
    import fastcert.data.source as source
    import fastcert.pipeline as pipeline

    events, splits = [], {}
    load = source.DataSource.load

    def watched(self, *args, **kwargs):
        bundle = load(self, *args, **kwargs)
        splits["train"] = _base_indices(bundle.train.dataset)
        splits["val"] = _base_indices(bundle.val.dataset)
        bundle.test = _Watched(bundle.test, "test", events)
        bundle.val = _Watched(bundle.val, "val", events)
        return bundle

    fit = pipeline.fit
    monkeypatch.setattr(source.DataSource, "load", watched)
    monkeypatch.setattr(pipeline, "fit", lambda *a, **k: (fit(*a, **k), events.append("fit"))[0])
    results = run(compose_config("config", SELECT_VAL + aids), tmp_path)

    assert len(splits["val"]) == 30 and not set(splits["train"]) & set(splits["val"])
    during = events[:events.index("fit")]
    assert "test" not in during and "test.dataset" not in during
    assert during.count("val") == 3                # one selection pass after each epoch
    after = [e for e in events[events.index("fit"):] if not e.endswith(".dataset")]
    assert after == ["fit", "val", "test"]         # the kept model on val, then the test set
    assert results["selection"]["split"] == "val" and "warning" not in results["selection"]
    assert results["n_val"] == 30
