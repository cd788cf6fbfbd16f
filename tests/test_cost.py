"""squeeze/run/cost.py: own, total and inference cost of a row from a record's energy phases (pure arithmetic)."""

import pytest

from squeeze.run import cost


def _record(phases: dict | None, compress_seconds: float | None = None) -> dict:
    return {"energy": None if phases is None else {"phases": {k: {"kwh": v} for k, v in phases.items()}},
            "compress_seconds": compress_seconds}


def test_a_post_training_row_owns_its_compression_and_adds_its_starting_model():
    record = _record({"compress": 0.002, "eval": 0.004}, compress_seconds=3.0)
    got = cost.row_cost(record, trains=False, own_train_seconds=0.0, base={"seconds": 100.0, "kwh": 0.05},
                        units=(2000, "tokens"))
    assert got["own"] == {"seconds": 3.0, "kwh": pytest.approx(0.002)}
    assert got["total"] == {"seconds": 103.0, "kwh": pytest.approx(0.052)}
    assert got["inference"] == {"kwh_per_1k": pytest.approx(0.002), "unit": "tokens", "count": 2000}


def test_a_training_row_owns_its_training_from_a_pretrained_model():
    record = _record({"train": 0.03, "compress": 0.001, "eval": 0.002}, compress_seconds=1.0)
    got = cost.row_cost(record, trains=True, own_train_seconds=60.0, base=None, units=(500, "examples"))
    assert got["own"] == got["total"] == {"seconds": 61.0, "kwh": pytest.approx(0.031)}


def test_measured_nothing_of_its_own_is_zero_and_unmeasured_is_unknown():
    # The baseline row on a stored model: energy measured (its eval), no work of its own.
    measured = cost.row_cost(_record({"eval": 0.001}), trains=False, own_train_seconds=0.0,
                             base={"seconds": 90.0, "kwh": 0.04}, units=(10, "examples"))
    assert measured["own"] == {"seconds": 0.0, "kwh": 0.0} and measured["total"]["kwh"] == pytest.approx(0.04)
    unmeasured = cost.row_cost(_record(None), trains=False, own_train_seconds=0.0, base={"seconds": 90.0, "kwh": None},
                               units=(10, "examples"))
    assert unmeasured["own"]["kwh"] is None and unmeasured["total"] == {"seconds": 90.0, "kwh": None}
    assert unmeasured["inference"]["kwh_per_1k"] is None
    # A starting model of unknown cost (a directory without its record) leaves the total unknown.
    unknown = cost.row_cost(_record({"eval": 0.001}), trains=False, own_train_seconds=0.0,
                            base={"seconds": None, "kwh": None}, units=(10, "examples"))
    assert unknown["total"] == {"seconds": None, "kwh": None}


def test_what_a_finished_record_cost_falls_back_to_its_training_for_older_records():
    assert cost.started_from({"cost": {"total": {"seconds": 5.0, "kwh": 0.1}}}) == {"seconds": 5.0, "kwh": 0.1}
    older = {"train_seconds": 7.0, "energy": {"phases": {"train": {"kwh": 0.2}, "eval": {"kwh": 0.01}}}}
    assert cost.started_from(older) == {"seconds": 7.0, "kwh": 0.2}
    assert cost.started_from(None) == {"seconds": None, "kwh": None}
