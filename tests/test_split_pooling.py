"""Pooling a source's splits before carving (issue 27: the thesis' IMDB split, 50/25/25 of train + test)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from squeeze.errors import SqueezeError
from squeeze.tasks.sources import load_splits



def _csv(path: Path, start: int, rows: int) -> str:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(start, start + rows):
            writer.writerow([f"review {i}", i % 2])
    return str(path)


@pytest.fixture
def files(tmp_path):
    return {"train": [_csv(tmp_path / "train.csv", 0, 40)], "test": [_csv(tmp_path / "test.csv", 40, 40)]}


THESIS = {"train": ["train", "test"], "validation": None, "test": None}
HALVES = {"test": 0.25, "validation": 1 / 3}


def test_train_and_test_pooled_then_carved_50_25_25_disjoint_and_seeded(files):
    raw = load_splits("csv", data_files=files, splits=THESIS, carve=HALVES, seed=42)
    sizes = {s: len(raw[s]) for s in ("train", "validation", "test")}
    assert sizes == {"train": 40, "validation": 20, "test": 20}
    texts = {s: set(raw[s]["text"]) for s in sizes}
    assert not texts["train"] & texts["test"] and not texts["train"] & texts["validation"]
    assert not texts["validation"] & texts["test"]
    assert set().union(*texts.values()) == {f"review {i}" for i in range(80)}
    # both source splits end up in every carved split (a shuffle of the pool, not the test file kept whole)
    assert any(int(t.split()[1]) < 40 for t in texts["test"]) and any(int(t.split()[1]) >= 40 for t in texts["test"])
    again = load_splits("csv", data_files=files, splits=THESIS, carve=HALVES, seed=42)
    assert list(again["test"]["text"]) == list(raw["test"]["text"])
    other = load_splits("csv", data_files=files, splits=THESIS, carve=HALVES, seed=7)
    assert set(other["test"]["text"]) != texts["test"]


def test_one_train_split_is_unchanged(files):
    raw = load_splits("csv", data_files=files, splits={"train": "train", "validation": None, "test": "test"},
                      carve={"validation": 0.25}, seed=42)
    assert (len(raw["train"]), len(raw["validation"]), len(raw["test"])) == (30, 10, 40)
    assert set(raw["test"]["text"]) == {f"review {i}" for i in range(40, 80)}


def test_a_split_both_pooled_and_kept_is_refused_with_the_fix(files):
    with pytest.raises(SqueezeError, match=r"splits.test='test' is also pooled into train.*splits.test=null"):
        load_splits("csv", data_files=files, splits={"train": ["train", "test"], "validation": None, "test": "test"},
                    carve=HALVES, seed=42)
    with pytest.raises(SqueezeError, match=r"has no split 'dev' \(has \['train', 'test'\]\); fix task.data.splits.train$"):
        load_splits("csv", data_files=files, splits={"train": ["train", "dev"], "validation": None, "test": None},
                    carve=HALVES, seed=42)
