"""model.json typed: parsed strictly once, written back as read (tscpurify/sidecar.py)."""

import json

import pytest

from tscpurify.errors import CheckpointError
from tscpurify.sidecar import SIDECAR_FORMAT, DataRef, Sidecar, parse_sidecar

FULL = Sidecar(arch="cnn", kwargs={"width": 4, "num_classes": 10}, kind="classifier",
               dataset=DataRef("fashion-mnist", None), attack={"name": "badnets", "target": 0},
               classes=("a", "b"), seed=3, train={"epochs": 5}, poisoned=12,
               tool_version="0.1.0", purified_by={"defense": "tsc"})


def test_a_sidecar_survives_json_unchanged():
    written = json.loads(json.dumps(FULL.to_json()))
    assert next(iter(written)) == "format" and written["format"] == SIDECAR_FORMAT
    assert parse_sidecar(written) == FULL


def test_unset_records_are_left_out_but_a_clean_models_null_attack_is_kept():
    written = Sidecar(arch="cnn").to_json()
    assert written == {"format": SIDECAR_FORMAT, "arch": "cnn", "kwargs": {},
                       "kind": "classifier", "dataset": None, "attack": None}


def test_an_older_writers_empty_dataset_reads_as_unsaid():
    assert parse_sidecar({"format": SIDECAR_FORMAT, "arch": "cnn", "dataset": {}}).dataset is None


@pytest.mark.parametrize("data, message", [
    ({"format": "tscpurify-model/2", "arch": "cnn"}, "not a tscpurify-model/1 sidecar"),
    ({"format": SIDECAR_FORMAT, "arch": "cnn", "kind": "regressor"}, "kind must be one of"),
    ({"format": SIDECAR_FORMAT, "arch": "cnn", "classes": "ab"}, "'classes' must be a JSON "
                                                                  "array, got string"),
    ({"format": SIDECAR_FORMAT, "arch": "cnn", "dataset": {"name": "x", "path": "/"}},
     "dataset must be"),
    ({"format": SIDECAR_FORMAT, "arch": "os:system"}, None),  # a factory: parsed, never imported
])
def test_what_is_refused_and_what_is_not(data, message):
    if message is None:
        assert parse_sidecar(data).arch == "os:system"
        return
    with pytest.raises(CheckpointError, match=message):
        parse_sidecar(data, "m.json")
