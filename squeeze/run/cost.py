"""What a row cost, in three figures that compare like with like (result.json `cost`):

  own        the time and energy the row spent beyond the model it started from: its training when the chain
             trains (imp, qat, kd, rows, heads; the fine-tuning itself for the `none` row), plus the compression
             phase (calibration, pruning or quantization in prepare/finalize). A post-training chain (dq, int8wo,
             gptq, ...) starts from the fine-tuned model, so its own cost is the compression phase alone: dq
             trains nothing, as the thesis counts it.
  total      own + what it started from: the fine-tuned baseline's training (a stored baseline, a distillation
             teacher, or the finished run evaluate.py quantized). The report's grid totals still count a stored
             baseline once (`spent`); `total` is the model's whole cost.
  inference  the evaluation pass's energy per 1,000 test examples (classification, NER, dialog) or scored
             tokens (language modelling).

Seconds are wall time; kWh is facility energy (IT × PUE) from squeeze.measure.energy's phases, None when energy was
not measured. The run calls `compress_phase` around its compression work and `of_training` / `row_cost` at its end.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from squeeze.artifacts import RUN_MODEL
from squeeze.measure import energy
from squeeze.record import RESULT_FILE, read_record


def phase(record: dict[str, Any] | None, name: str) -> dict[str, Any]:
    phases = ((record or {}).get("energy") or {}).get("phases") or {}
    return phases.get(name) or {}


def _add(a: float | None, b: float | None) -> float | None:
    return None if a is None and b is None else float(a or 0.0) + float(b or 0.0)


def started_from(record: dict[str, Any] | None) -> dict[str, Any]:
    """The total cost of a finished record (what a row built on it started from): its `cost.total`, or for
    records older than `cost`, its training time and the energy of its training phase."""
    if not record:
        return {"seconds": None, "kwh": None}
    total = (record.get("cost") or {}).get("total")
    if total:
        return {"seconds": total.get("seconds"), "kwh": total.get("kwh")}
    return {"seconds": record.get("train_seconds"), "kwh": phase(record, "train").get("kwh")}


def row_cost(record: dict[str, Any], trains: bool, own_train_seconds: float,
             base: dict[str, Any] | None, units: tuple[int | None, str]) -> dict[str, Any]:
    """result.json's `cost` for a finished run.

    trains: the run fine-tuned its own model (its training is its own cost); own_train_seconds: that fit's wall
    time; base: the total cost of the model it started from ({seconds, kwh}; None: a pretrained model, nothing
    spent); units: (how many test examples or scored tokens the evaluation pass covered, "examples"|"tokens")."""
    train = phase(record, "train") if trains else {}
    compress = phase(record, "compress")
    measured = bool(((record.get("energy") or {}).get("phases")))
    # Measured, with nothing of its own to spend on (the baseline row on a stored model): 0 kWh, not unknown.
    own_kwh = _add(train.get("kwh"), compress.get("kwh")) if not measured else \
        float(train.get("kwh") or 0.0) + float(compress.get("kwh") or 0.0)
    own = {"seconds": float(own_train_seconds if trains else 0.0) + float(record.get("compress_seconds") or 0.0),
           "kwh": own_kwh}
    base = base or {"seconds": 0.0, "kwh": 0.0}  # a pretrained model: nothing spent on it here
    # An unknown starting cost (a model directory without its record) leaves the total unknown, not own alone.
    total = {"seconds": None if base.get("seconds") is None else own["seconds"] + float(base["seconds"]),
             "kwh": None if own_kwh is None or base.get("kwh") is None else own_kwh + float(base["kwh"])}
    count, unit = units
    eval_kwh = phase(record, "eval").get("kwh")
    per_1k = None if eval_kwh is None or not count else float(eval_kwh) / count * 1000.0
    return {"own": own, "total": total, "inference": {"kwh_per_1k": per_1k, "unit": unit, "count": count}}


def evaluated_units(data, perplexity: dict[str, Any] | None) -> tuple[int | None, str]:
    """What the evaluation pass scored: tokens for perplexity tasks, else test examples."""
    if perplexity and perplexity.get("scored_tokens"):
        return int(perplexity["scored_tokens"]), "tokens"
    test = getattr(data, "datasets", {}).get("test") if hasattr(data, "datasets") else None
    return (len(test) if test is not None else None), "examples"


def of_training(record: dict[str, Any], data, post_training: bool, teacher: dict[str, Any] | None) -> dict[str, Any]:
    """A training run's `cost`. A distilled student started from its `teacher` (that record's total cost). A
    post-training chain fine-tuned here started from that fine-tuned model: its training is what it started
    from, not its own cost."""
    base = (started_from(teacher) if teacher is not None else
            {"seconds": record["train_seconds"], "kwh": phase(record, "train").get("kwh")} if post_training
            else None)
    return row_cost(record, trains=not post_training, own_train_seconds=record["train_seconds"], base=base,
                    units=evaluated_units(data, record.get("perplexity")))


class compress_phase:
    """A chain's compression work (prepare, calibration, finalize) timed into record["compress_seconds"] and
    measured as the energy meter's `compress` phase (summed over the times it is entered): part of a row's own
    cost. Without compressors there is no such phase."""

    def __init__(self, callbacks, record: dict[str, Any], chain):
        self.meter, self.record, self.active = energy.meter(callbacks), record, bool(chain)

    def __enter__(self):
        if self.active and self.meter is not None:
            self.meter.start("compress")
        self.start = time.perf_counter()  # after the meter started: codecarbon's start-up is not compression
        return self

    def __exit__(self, *exc) -> None:
        if not self.active:
            return
        spent = time.perf_counter() - self.start
        if self.meter is not None:
            self.meter.stop("compress")
        self.record["compress_seconds"] = (self.record.get("compress_seconds") or 0.0) + spent


def starting_run(cfg, record: dict[str, Any]) -> dict[str, Any] | None:
    """The finished squeeze run whose saved model this one fine-tuned (model.name_or_path=<run>/model: e.g. a
    model pruned during pre-training, then fine-tuned with its mask kept); its cost is what this row started from,
    so the row's total counts the pre-training (the thesis' "IMP Full"). None for any other starting model."""
    location = OmegaConf.select(cfg, "model.name_or_path")
    if not location:
        return None
    directory = Path(str(location)).expanduser()
    run_dir = directory.parent
    if directory.name != RUN_MODEL or not (run_dir / RESULT_FILE).is_file():
        return None
    started = read_record(run_dir)
    if started.get("status") != "ok":
        return None
    record["started_from"] = str(run_dir.resolve())
    return started
