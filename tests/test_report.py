"""python -m squeeze.report on hand-made result records: Δ%, Pareto sets, expected validation
performance, failed cells, missing baselines, plots, bad input and W&B offline."""

from __future__ import annotations

import csv
import itertools
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from squeeze import report
from squeeze.run import loggers
from squeeze.errors import SqueezeError

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"
TASKS = {"rotten_tomatoes": ("val/accuracy", "max"), "austen": ("val/perplexity", "min"), "wnut16": ("val/f1", "max")}


def write_cell(sweep: Path, name: str, model: str = "tiny_bert", task: str = "rotten_tomatoes",
               chain: str = "none", quality: float | None = 0.8, status: str = "ok", error: str | None = None,
               seed: int = 0, lr: float | None = 5e-5, size_mb: float = 100.0, latency_ms: float | None = None,
               train_s: float = 100.0, kwh: float | None = None, validation: float | None = None,
               sparsity: float | None = None, settings: dict | None = None, **extra) -> Path:
    """A result.json shaped like squeeze/record.py's, with the optional perf/energy/sparsity keys;
    `settings` is config.compress (the chain's compressors' settings, `label` included)."""
    monitor, mode = TASKS[task]
    metric = "test/" + monitor.split("/")[1]
    record = {
        "schema": 1, "status": status, "error": error, "run_dir": str(sweep / name),
        "choices": {"model": model, "task": task, "compress": chain, "hardware": "cpu"}, "seed": seed,
        "config": {"seed": seed, "optimizer": {"lr": lr}, "task": {"name": task, "monitor": monitor,
                                                                   "monitor_mode": mode},
                   **({} if settings is None else {"compress": settings})},
        "metrics": {} if status != "ok" else {"test/loss": 0.5, **({} if quality is None else {metric: quality})},
        "validation": None if validation is None else {"monitor": monitor, "mode": mode, "best": validation},
        "params": 1000, "nonzero_params": 1000 if sparsity is None else int(1000 * (1 - sparsity)),
        "checkpoint_bytes": None if status != "ok" else int(size_mb * 1e6),
        "train_seconds": None if status != "ok" else train_s, "eval_seconds": 1.0,
        "peak_memory_bytes": 2e8, "compress": {"chain": [] if chain == "none" else chain.split("+")},
    }
    if latency_ms is not None:
        record["perf"] = {"device": "cpu", "latency": {"batch_1": {"median_s": latency_ms / 1e3, "p10_s": 0.0,
                                                                   "p90_s": 1.0, "repeats": 5}},
                          "throughput": {"examples_per_s": 1000.0 / latency_ms, "tokens_per_s": 64000.0 / latency_ms}}
    if kwh is not None:
        record["energy"] = {"kwh": kwh, "co2_kg": kwh * 0.43, "method": "estimated", "pue": 1.59, "co2": "epa",
                            "co2_kg_per_kwh": 0.43}
    if sparsity is not None:
        record["sparsity"] = sparsity
    if status == "ok":  # a run that trained its own model from a pretrained one: own cost = total cost
        record["cost"] = {"own": {"seconds": train_s, "kwh": kwh}, "total": {"seconds": train_s, "kwh": kwh},
                          "inference": {"kwh_per_1k": None, "unit": "examples", "count": 100}}
    record.update(extra)
    run_dir = sweep / name
    run_dir.mkdir(parents=True)
    (run_dir / "result.json").write_text(json.dumps(record))
    return run_dir


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """Two models × tasks: a BERT classification grid with a baseline, a failed cell and a chain that only
    failed; a GPT-2 language-modelling grid (perplexity, lower is better) without a baseline."""
    root = tmp_path / "multirun" / "2026-11-23_10-00-00"
    write_cell(root, "0", chain="none", quality=0.80, seed=0, size_mb=100, latency_ms=10, train_s=100, kwh=0.01,
               validation=0.81)
    write_cell(root, "1", chain="none", quality=0.90, seed=1, size_mb=100, latency_ms=12, train_s=120, kwh=0.03,
               validation=0.88)
    imp = {"imp": {"_target_": "squeeze.compress.pruning.IterativeMagnitudePruning", "target": 0.5}}
    write_cell(root, "2", chain="imp", quality=0.76, seed=0, size_mb=50, latency_ms=8, train_s=150, kwh=0.02,
               validation=0.75, sparsity=0.5, settings=imp)
    write_cell(root, "3", chain="imp", quality=0.78, seed=1, size_mb=50, latency_ms=8, train_s=150, kwh=0.02,
               validation=0.79, compress={"chain": ["imp"], "imp": {"sparsity": 0.6}},  # the pruner's own figure
               settings=imp)
    write_cell(root, "4", chain="imp", status="failed", error="RuntimeError: imp blew up", seed=2, settings=imp)
    write_cell(root, "5", chain="pkd+dq", status="failed", error="SqueezeError: dq needs | a CPU", seed=0)
    write_cell(root, "6", model="tiny_gpt2", task="austen", chain="imp", quality=120.0, size_mb=40)
    write_cell(root, "7", model="tiny_gpt2", task="austen", chain="dq", quality=150.0, size_mb=20)
    (root / "8" / ".hydra").mkdir(parents=True)  # a cell still running: no result.json yet
    return root


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# -- pure functions -------------------------------------------------------------------------------------
def test_pareto_set_keeps_only_points_nothing_beats():
    points = [(1.0, 0.70), (2.0, 0.90), (3.0, 0.85), (2.0, 0.80), (0.5, 0.60), (4.0, 0.95), (4.0, 0.95),
              (4.5, 0.95)]
    # (3, .85) loses to (2, .90); (2, .80) to (2, .90) (same cost); (4.5, .95) to (4, .95) (same quality);
    # the two equal (4, .95) both stay.
    assert report.pareto_set(points, "max") == [4, 0, 1, 5, 6]
    perplexity = [(10.0, 30.0), (5.0, 40.0), (8.0, 45.0), (20.0, 25.0), (20.0, 26.0)]
    assert report.pareto_set(perplexity, "min") == [1, 0, 3]
    assert report.pareto_set([], "max") == []
    with pytest.raises(ValueError):
        report.pareto_set(points, "up")


def _monte_carlo_best(values, n, mode, draws, rng):
    pick = max if mode == "max" else min
    return sum(pick(rng.choices(values, k=n)) for _ in range(draws)) / draws


@pytest.mark.parametrize("mode", ["max", "min"])
def test_expected_validation_matches_simulation_and_is_monotone(mode):
    rng = random.Random(0)
    values = [0.61, 0.74, 0.74, 0.80, 0.52, 0.91, 0.66]  # a tie included
    curve = report.expected_validation_curve(values, mode, n_max=12)
    assert len(curve) == 12
    for n in (1, 2, 3, 5, 12):
        simulated = _monte_carlo_best(values, n, mode, 40_000, rng)
        assert abs(curve[n - 1] - simulated) < 4e-3, (n, curve[n - 1], simulated)
    steps = [b - a for a, b in itertools.pairwise(curve)]
    assert all(s > 0 for s in steps) if mode == "max" else all(s < 0 for s in steps)
    assert curve[0] == pytest.approx(sum(values) / len(values))  # one draw: the mean
    assert report.expected_best(values, 500, mode) == pytest.approx(max(values) if mode == "max" else min(values))
    assert report.expected_validation_curve([0.7], mode) == [pytest.approx(0.7)]


# -- tables -------------------------------------------------------------------------------------------------
def test_table_delta_percent_against_the_baseline(sweep, tmp_path):
    out = tmp_path / "out"
    built = report.build([sweep], out, draw=False)
    rows = {r["chain"]: r for r in read_csv(out / "tiny_bert-rotten_tomatoes.csv")}
    assert list(rows) == ["none", "imp", "pkd+dq"]  # baseline first
    base, imp = rows["none"], rows["imp"]
    assert base["baseline"] == "True" and float(base["quality_delta_pct"]) == pytest.approx(0.0)
    assert float(base["quality_mean"]) == pytest.approx(0.85)
    assert float(base["quality_std"]) == pytest.approx(0.0707107, rel=1e-5)  # sample std of .80 and .90
    # By hand: accuracy .77 vs .85, size 50 vs 100 MB, latency 8 vs 11 ms, train 150 vs 110 s, energy .02 vs .02.
    assert float(imp["quality_delta_pct"]) == pytest.approx(-9.411765, rel=1e-5)
    assert float(imp["size_mb_delta_pct"]) == pytest.approx(-50.0)
    assert float(imp["latency_ms_delta_pct"]) == pytest.approx(-27.272727, rel=1e-5)
    assert float(imp["own_s_delta_pct"]) == pytest.approx(36.363636, rel=1e-5)
    assert float(imp["own_kwh_delta_pct"]) == pytest.approx(0.0, abs=1e-9)
    assert float(imp["total_s_delta_pct"]) == pytest.approx(36.363636, rel=1e-5)
    assert (imp["n_ok"], imp["n_failed"]) == ("2", "1")
    # One setting (imp target=0.5) over seeds 0 and 1: the sparsity each seed reached (top-level 0.5, the
    # pruner's own compress.imp.sparsity 0.6) averages. Another target would be another row (below).
    assert imp["setting"] == "" and imp["label"] == "imp"
    assert float(imp["sparsity_mean"]) == pytest.approx(0.55)

    text = built.markdown.read_text()
    section = text.split("## tiny_bert × rotten_tomatoes")[1].split("## ")[0]
    imp_line = next(line for line in section.splitlines() if line.startswith("| imp |"))
    assert "-9.4%" in imp_line and "-50.0%" in imp_line and "-27.3%" in imp_line and "+36.4%" in imp_line
    assert "0.85 ± 0.07071" in section
    assert "| test/accuracy | Δ% | size MB | Δ% |" in section


def imp_at(target: float, **more) -> dict:
    return {"imp": {"_target_": "squeeze.compress.pruning.IterativeMagnitudePruning", "target": target,
                    "schedule": "cubic", **more}}


def test_a_sweep_over_a_setting_gets_a_row_per_setting_with_delta_over_the_same_seeds(tmp_path):
    # compress.imp.target=0.3,0.5 seed=0,1 beside compress=none seed=0,1,2.
    root = tmp_path / "sweep"
    for seed, q in ((0, 0.80), (1, 0.90), (2, 0.50)):
        write_cell(root, f"none{seed}", chain="none", quality=q, seed=seed, size_mb=100, validation=q)
    for target, qs in ((0.3, (0.84, 0.86)), (0.5, (0.70, 0.74))):
        for seed, q in enumerate(qs):
            write_cell(root, f"imp{target}-{seed}", chain="imp", quality=q, seed=seed, size_mb=100 * (1 - target),
                       validation=q, sparsity=target, settings=imp_at(target))
    out = tmp_path / "out"
    built = report.build([root], out)
    rows = {r["label"]: r for r in read_csv(out / "tiny_bert-rotten_tomatoes.csv")}
    assert list(rows) == ["none", "imp target=0.3", "imp target=0.5"]
    low, high = rows["imp target=0.3"], rows["imp target=0.5"]
    assert (low["chain"], low["setting"], low["n_ok"]) == ("imp", "target=0.3", "2")
    assert float(low["quality_mean"]) == pytest.approx(0.85)
    assert float(low["quality_std"]) == pytest.approx(0.0141421, rel=1e-5)
    assert float(high["quality_mean"]) == pytest.approx(0.72)
    # Δ% against `none` over the seeds both ran (0 and 1: 0.85), not over its three seeds (0.7333).
    assert float(rows["none"]["quality_mean"]) == pytest.approx(0.733333, rel=1e-5)
    assert float(low["quality_delta_pct"]) == pytest.approx(0.0, abs=1e-9)
    assert float(high["quality_delta_pct"]) == pytest.approx((0.72 - 0.85) / 0.85 * 100)
    assert float(high["size_mb_delta_pct"]) == pytest.approx(-50.0)
    text = built.markdown.read_text()
    assert "| imp target=0.5 | 2 | 0 | 0.72 ± 0.02828 | -15.3% |" in text
    assert "Δ% of `imp target=0.3` is over the 2 seed/lr setting(s) it shares with `none`" in text
    # The expected-validation curves and sparsity series run per row, over its seeds.
    cells = read_csv(out / "cells.csv")
    assert {c["row"] for c in cells} == {"none", "imp target=0.3", "imp target=0.5"}
    assert {c["compress.imp.target"] for c in cells if c["chain"] == "imp"} == {"0.3", "0.5"}
    assert set(built.groups[0].plots) >= {"expected validation performance", "sparsity vs quality"}


def test_learning_rates_pair_like_seeds(tmp_path):
    root = tmp_path / "sweep"
    write_cell(root, "a", chain="none", quality=0.90, seed=0, lr=1e-4)
    write_cell(root, "b", chain="none", quality=0.80, seed=0, lr=5e-5)
    write_cell(root, "c", chain="imp", quality=0.80, seed=0, lr=5e-5, settings=imp_at(0.5))
    [group] = report.build([root], tmp_path / "out", draw=False).groups
    imp = next(r for r in group.rows if r["chain"] == "imp")
    assert imp["label"] == "imp" and imp["quality_delta_pct"] == pytest.approx(0.0, abs=1e-9)  # vs lr 5e-5 only


def test_a_label_names_a_row(tmp_path):
    root = tmp_path / "sweep"
    write_cell(root, "0", chain="none", quality=0.80)
    write_cell(root, "1", chain="imp", quality=0.78, settings=imp_at(0.9, label="pr .9"))
    write_cell(root, "2", chain="imp", quality=0.70, settings=imp_at(0.95))
    distil = {"pkd": {"alpha": 0.5, "label": "Distil"}, **imp_at(0.9, label="90")}
    write_cell(root, "3", chain="pkd+imp", quality=0.75, settings=distil)
    write_cell(root, "4", chain="pkd+imp", quality=0.74, settings={**distil, "pkd": {"alpha": 0.9, "label": "Distil"}})
    out = tmp_path / "out"
    built = report.build([root], out, draw=False)
    labels = [r["label"] for r in built.groups[0].rows]
    # A labelled row takes its label; chained labels join with '+'; one label on several settings keeps
    # them apart with the chain and its settings (named `<compressor>.<key>` in a chain of several).
    # Rows of a chain come in the order of their settings' values.
    assert labels == ["none", "pr .9", "imp target=0.95", "Distil+90 (pkd+imp pkd.alpha=0.5)",
                      "Distil+90 (pkd+imp pkd.alpha=0.9)"]
    assert "| pr .9 | 1 | 0 | 0.78 | -2.5% |" in built.markdown.read_text()
    assert "compress.imp.label" not in read_csv(out / "cells.csv")[0]  # a name, not a setting


def test_distillation_cells_are_told_apart_by_their_resolved_teacher(tmp_path):
    """teacher=auto, teacher_best_of={seed: [42]} and the stored baseline's path are one teacher: one row."""
    root = tmp_path / "sweep"
    stored, other = "/cache/baselines/minilm_rotten-tomatoes_4ae6", "/runs/another-teacher"
    write_cell(root, "0", chain="none", quality=0.82)

    def kd(name, seed, quality, teacher, best_of, source):
        write_cell(root, name, chain="kd", quality=quality, seed=seed,
                   settings={"kd": {"teacher": teacher, "teacher_best_of": best_of, "alpha": 0.5, "label": "kd"}},
                   compress={"chain": ["kd"], "kd": {"teacher": {"source": source, "layers": 6}}})

    kd("1", 0, 0.80, "auto", None, stored)
    kd("2", 1, 0.82, "auto", {"seed": [0]}, stored)
    kd("3", 2, 0.81, stored, None, stored)
    kd("4", 0, 0.70, other, None, other)
    built = report.build([root], tmp_path / "out", draw=False)
    rows = {r["label"]: r for r in built.groups[0].rows}
    assert set(rows) == {"none", f"kd (kd teacher={stored})", f"kd (kd teacher={other})"}
    assert rows[f"kd (kd teacher={stored})"]["n_ok"] == 3
    assert rows[f"kd (kd teacher={stored})"]["quality_mean"] == pytest.approx(0.81)


def test_optional_columns_are_shown_where_recorded_and_blank_where_not(tmp_path):
    root = tmp_path / "sweep"
    write_cell(root, "0", chain="none", quality=0.80, train_s=10.0)
    perf = {"device": "cpu", "latency": {"batch_1": {"median_s": 0.01, "peak_memory_bytes": 3e8}},
            "throughput": {"batch_size": 12, "examples_per_s": 100.0, "tokens_per_s": 6400.0},
            "batch_12": {"peak_memory_bytes": 9e8}, "decode_tokens_per_s": {"batch_1": 50.0, "batch_12": 400.0},
            "by_device": {"cuda": {"batch_1": {"peak_memory_bytes": 1e9}}}}
    write_cell(root, "1", chain="dq", quality=0.79, perf=perf, train_tokens_per_s=2000.0, eval_seconds=4.0,
               metrics={"test/accuracy": 0.79, "test/f1": 0.78, "test/precision": 0.77, "test/recall": 0.76},
               speculative={"speedup": 1.8, "speculative": {"acceptance_rate": 0.7}})  # today's layout
    write_cell(root, "2", chain="qat", quality=0.78, speculative={"acceptance_rate": 0.6, "speedup": 1.5})
    write_cell(root, "3", model="tiny_gpt2", task="austen", chain="none", quality=30.0)
    out = tmp_path / "out"
    built = report.build([root], out, draw=False)
    text = built.markdown.read_text()
    bert = text.split("## tiny_bert × rotten_tomatoes")[1].split("## ")[0]
    gpt = text.split("## tiny_gpt2 × austen")[1]
    header = next(line for line in bert.splitlines() if line.startswith("| row |"))
    # The markdown table: the columns to decide from (decoding at batch 1 only); the CSV has every figure.
    assert header == ("| row | ok | failed | test/accuracy | Δ% | F1 | size MB | Δ% | latency ms (b1) | Δ% | "
                      "decode tok/s b1 (cpu) | own s | Δ% | spec. acceptance | spec. speed-up |")
    dq = next(line for line in bert.splitlines() if line.startswith("| dq |"))
    assert "| 0.78 | 100 |" in dq and "| 10 |  | 50 |" in dq and "| 0.7 | 1.8 |" in dq
    none = next(line for line in bert.splitlines() if line.startswith("| **none** (baseline) |"))
    assert "| 0.8 | +0.0% |  | 100 |" in none  # no F1 in its record: blank
    qat = next(line for line in bert.splitlines() if line.startswith("| qat |"))
    assert qat.endswith("| 0.6 | 1.5 |")
    # The language-modelling table shows none of them.
    assert "F1" not in gpt and "decode tok/s" not in gpt and "spec." not in gpt
    rows = {r["label"]: r for r in read_csv(out / "tiny_bert-rotten_tomatoes.csv")}
    assert float(rows["dq"]["precision_mean"]) == 0.77 and float(rows["dq"]["recall_mean"]) == 0.76
    assert float(rows["dq"]["peak_memory_mb.cpu.batch_12_mean"]) == pytest.approx(900.0)
    assert float(rows["dq"]["decode_tokens_per_s.cpu.batch_12_mean"]) == 400.0
    assert float(rows["dq"]["peak_memory_mb.cuda.batch_1_mean"]) == pytest.approx(1000.0)
    assert rows["none"]["decode_tokens_per_s.cpu.batch_12_mean"] == "" and rows["none"]["precision_mean"] == ""
    cell = next(c for c in read_csv(out / "cells.csv") if c["chain"] == "dq")
    assert float(cell["decode_tokens_per_s.cpu.batch_1"]) == 50.0 and float(cell["train_tokens_per_s"]) == 2000.0


def test_totals_over_the_grid_and_the_co2_presets(sweep, tmp_path):
    from squeeze.measure.energy import CO2_PRESETS

    assert report.CO2_PRESETS == CO2_PRESETS == {"epa": 0.430, "eea": 0.275}  # what the README names
    built = report.build([sweep], tmp_path / "out", draw=False)
    text = built.markdown.read_text()
    # Train 100+120+150+150 (bert) + 100+100 (gpt2) s; eval 1 s × 8; 0.01+0.03+0.02+0.02 kWh.
    grid = next(line for line in text.splitlines() if line.startswith("Totals over the whole grid"))
    assert grid.startswith("Totals over the whole grid (8 records, failed ones included): train time 0.2 h (720 s); "
                           "eval time 0.00222 h (8 s); energy 0.08 kWh (facility, PUE 1.59; 4 of 8 records have it)")
    assert "CO2 0.0344 kg as recorded (kg/kWh: epa 0.430); 0.0344 kg at epa 0.430, 0.022 kg at eea 0.275." in grid
    assert "Totals over tiny_gpt2 × austen (2 records, failed ones included): train time 0.0556 h (200 s)" in text


def test_an_evaluated_checkpoint_has_no_train_cost_of_its_own(sweep, tmp_path):
    # evaluate.py ckpt=<the baseline> compress=dq: train_seconds 0, energy of the evaluation only; its own cost is
    # the quantization (2 s), its total adds the checkpoint's (seed 0's 100 s).
    cost = {"own": {"seconds": 2.0, "kwh": 0.0002}, "total": {"seconds": 102.0, "kwh": 0.0102},
            "inference": {"kwh_per_1k": 0.01, "unit": "examples", "count": 100}}
    write_cell(sweep.parent / "eval", "dq", chain="dq", quality=0.84, size_mb=25, latency_ms=5, train_s=0.0,
               kwh=0.001, ckpt=str(sweep / "0"), cost=cost)
    out = tmp_path / "out"
    report.build([sweep, sweep.parent / "eval"], out, draw=False)
    dq = next(r for r in read_csv(out / "tiny_bert-rotten_tomatoes.csv") if r["chain"] == "dq")
    assert float(dq["size_mb_delta_pct"]) == pytest.approx(-75.0)  # its own figures still compare
    assert dq["train_s_mean"] == dq["energy_kwh_mean"] == ""
    # Like with like: own against the baseline's own (seed 0: 100 s, 0.01 kWh), total against its total.
    assert float(dq["own_s_delta_pct"]) == pytest.approx(-98.0) and float(dq["own_kwh_delta_pct"]) == pytest.approx(-98.0)
    assert float(dq["total_s_delta_pct"]) == pytest.approx(2.0) and float(dq["total_kwh_delta_pct"]) == pytest.approx(2.0)
    cell = next(c for c in read_csv(out / "cells.csv") if c["chain"] == "dq" and c["model"] == "tiny_bert")
    assert float(cell["eval_energy_kwh"]) == pytest.approx(0.001) and cell["evaluated_from"] == str(sweep / "0")
    assert cell["train_s"] == cell["energy_kwh"] == ""


def test_failed_cells_are_shown_not_dropped(sweep, tmp_path):
    built = report.build([sweep], tmp_path / "out", draw=False)
    text = built.markdown.read_text()
    section = text.split("## tiny_bert × rotten_tomatoes")[1].split("## ")[0]
    only_failed = next(line for line in section.splitlines() if line.startswith("| pkd+dq |"))
    assert "failed: SqueezeError: dq needs \\| a CPU" in only_failed and "| 0 | 1 |" in only_failed
    assert "Failed cells:" in section
    assert "`imp` (seed 2, lr 5e-05)" in section and "RuntimeError: imp blew up" in section
    cells = read_csv(tmp_path / "out" / "cells.csv")
    assert len(cells) == 8  # every record, ok and failed; the running cell has none yet
    failed = [c for c in cells if c["status"] == "failed"]
    assert sorted(c["error"] for c in failed) == ["RuntimeError: imp blew up", "SqueezeError: dq needs | a CPU"]
    assert {c["chain"] for c in cells} == {"none", "imp", "pkd+dq", "dq"}
    assert "8 records (6 ok, 2 failed)" in text


def test_mixed_tasks_get_their_own_tables_and_a_missing_baseline_is_explained(sweep, tmp_path):
    out = tmp_path / "out"
    built = report.build([sweep], out, draw=False)
    assert [(g.model, g.task, g.metric, g.mode) for g in built.groups] == [
        ("tiny_bert", "rotten_tomatoes", "test/accuracy", "max"), ("tiny_gpt2", "austen", "test/perplexity", "min")]
    text = built.markdown.read_text()
    gpt = text.split("## tiny_gpt2 × austen")[1]
    assert "`test/perplexity` (lower is better)" in gpt and "test/accuracy" not in gpt
    assert "no `none` cell for tiny_gpt2 × austen, so Δ% is blank" in gpt
    rows = read_csv(out / "tiny_gpt2-austen.csv")
    # In the order the sweep ran them (job 6 before job 7), not by name.
    assert [(r["chain"], r["quality_mean"], r["quality_delta_pct"]) for r in rows] == [
        ("imp", "120.0", ""), ("dq", "150.0", "")]
    # The same records with another baseline chain: Δ% against it.
    rebased = report.build([sweep], tmp_path / "rebased", baseline="imp", draw=False)
    imp_base = {r["chain"]: r for r in rebased.groups[1].rows}
    assert imp_base["dq"]["quality_delta_pct"] == pytest.approx(25.0)
    assert imp_base["dq"]["size_mb_delta_pct"] == pytest.approx(-50.0)
    assert "no `imp`" not in rebased.markdown.read_text().split("## tiny_gpt2")[1]


def test_cells_on_other_hardware_get_their_own_rows_and_baseline(tmp_path):
    root = tmp_path / "sweep"
    write_cell(root, "0", chain="none", quality=0.80, latency_ms=20)
    write_cell(root, "1", chain="imp", quality=0.78, latency_ms=15)
    write_cell(root, "2", chain="none", quality=0.82, latency_ms=4, choices={
        "model": "tiny_bert", "task": "rotten_tomatoes", "compress": "none", "hardware": "gpu"})
    write_cell(root, "3", chain="imp", quality=0.80, latency_ms=1, choices={
        "model": "tiny_bert", "task": "rotten_tomatoes", "compress": "imp", "hardware": "gpu"})
    [group] = report.build([root], tmp_path / "out").groups
    rows = {r["label"]: r for r in group.rows}
    assert list(rows) == ["none @ cpu", "imp @ cpu", "none @ gpu", "imp @ gpu"]
    assert [r["is_baseline"] for r in rows.values()] == [True, False, True, False]
    assert rows["imp @ cpu"]["latency_ms_delta_pct"] == pytest.approx(-25.0)
    assert rows["imp @ gpu"]["latency_ms_delta_pct"] == pytest.approx(-75.0)
    assert rows["imp @ gpu"]["quality_delta_pct"] == pytest.approx((0.80 - 0.82) / 0.82 * 100)
    assert "| **none @ gpu** (baseline) |" in (tmp_path / "out" / "report.md").read_text()


def test_unreadable_record_is_left_out_and_named(sweep, tmp_path):
    broken = sweep / "9"
    broken.mkdir()
    (broken / "result.json").write_text('{"status": "ok", ')
    built = report.build([sweep], tmp_path / "out", draw=False)
    assert len(built.cells) == 8 and len(built.skipped) == 1
    assert "Unreadable result.json files" in built.markdown.read_text() and str(broken) in built.skipped[0]


# -- plots ----------------------------------------------------------------------------------------------
def test_plots_are_valid_pngs_and_missing_figures_are_said(sweep, tmp_path):
    out = tmp_path / "out"
    built = report.build([sweep, sweep / "0"], out)  # overlapping paths: each record once
    assert len(built.cells) == 8
    bert, gpt = built.groups
    assert set(bert.plots) == {"quality vs size", "quality vs latency", "quality vs energy",
                               "expected validation performance", "sparsity vs quality"}
    for path in [*bert.plots.values(), *gpt.plots.values()]:
        data = path.read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000, path
    assert set(gpt.plots) == {"quality vs size"}
    assert "quality vs latency (no finished record has perf.latency.batch_1)" in gpt.skipped_plots
    assert "expected validation performance (no finished record has validation.best)" in gpt.skipped_plots
    text = built.markdown.read_text()
    assert "![quality vs size](plots/tiny_bert-rotten_tomatoes-quality-vs-size.png)" in text
    assert "Plots not drawn: quality vs latency (no finished record has perf.latency.batch_1)" in text
    # Old records without perf/energy: their columns are left out of the table, and said so.
    assert "Not in these records (column left out): latency ms (b1), total kWh, inference kWh/1k." in text


def _overlaps(boxes) -> list:
    return [(i, j) for i, a in enumerate(boxes) for j, b in enumerate(boxes) if i < j and a.overlaps(b)]


@pytest.mark.parametrize("spread", [1.0, 0.0])
def test_point_labels_do_not_overlap(spread):
    from squeeze.report import plots

    # Rows whose sizes and accuracies nearly coincide (spread 0: on one spot), one far away.
    labels = ["none", "imp target=0.3", "imp target=0.5", "heads amount=0.1", "heads amount=0.2", "AH90", "qat bits=4"]
    cost = [100, 100 - 0.5 * spread, 100 - spread, 98.7, 100 - 2.5 * spread, 99.9, 30]
    quality = [0.85, 0.85 - 0.005 * spread, 0.84, 0.85, 0.85 - 0.02 * spread, 0.849, 0.80]
    front = report.pareto_set(list(zip(cost, quality)), "max")
    fig, texts = plots.tradeoff_figure(labels, cost, [None] * 7, quality, [None] * 7, front, "size MB",
                                       "accuracy", "t", labels)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [plots.text_box(t, renderer) for t in texts]
    assert [t.get_text() for t in texts] == labels
    assert _overlaps(boxes) == []
    ax_box = fig.axes[0].get_window_extent(renderer)
    assert all(ax_box.x0 <= b.x0 and b.x1 <= ax_box.x1 and ax_box.y0 <= b.y0 and b.y1 <= ax_box.y1 for b in boxes)
    # No name covers a point; a moved name has its leader line.
    points = [fig.axes[0].transData.transform((x, y)) for x, y in zip(cost, quality)]
    assert not any(b.contains(x, y) for b in boxes for x, y in points)
    assert any(t.arrow_patch.get_visible() for t in texts)


# -- bad input and the command line -------------------------------------------------------------------------
def test_bad_input_is_one_clear_line(tmp_path):
    with pytest.raises(SqueezeError, match="does not exist"):
        report.build([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SqueezeError, match="no result.json under"):
        report.build([tmp_path / "empty"])
    write_cell(tmp_path / "sweep", "0", quality=None)
    with pytest.raises(SqueezeError, match="without its quality metric test/accuracy .metrics: test/loss"):
        report.build([tmp_path / "sweep"])


def test_cli_exits_2_with_a_message_on_an_empty_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    done = subprocess.run([sys.executable, "-m", "squeeze.report", str(tmp_path / "empty")], cwd=ROOT,
                          check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    expected = (f"error: no result.json under {tmp_path / 'empty'}; pass a squeeze sweep or run directory "
                "(a run writes its result.json when it ends)")
    assert done.stderr.strip().splitlines() == [expected]


def test_cli_writes_the_report_beside_the_sweep_by_default(sweep, capsys):
    assert report.main([str(sweep)]) == 0
    assert "2 model × task tables" in capsys.readouterr().out
    assert (sweep / "report" / "report.md").is_file() and (sweep / "report" / "cells.csv").is_file()
    assert report.main([str(sweep / "missing")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_report_imports_no_model_code():
    # Every module of the package, whatever it is split into (plots and W&B logging included).
    code = ("import importlib, json, pkgutil, sys, squeeze.report as r; "
            "walked = [m.name for m in pkgutil.walk_packages(r.__path__, 'squeeze.report.') "
            "if not m.name.endswith('__main__')]; "
            "[importlib.import_module(m) for m in walked]; "
            "print(json.dumps([walked, [m for m in ('torch', 'transformers', 'lightning') if m in sys.modules]]))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=False, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    walked, model_code = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(walked) >= 2  # the walk found the package's modules (named by behaviour, not by file)
    assert model_code == []


def test_wandb_mode_offline_without_a_key_and_env_honoured(monkeypatch):
    monkeypatch.setattr(loggers.netrc, "netrc", lambda *a: (_ for _ in ()).throw(FileNotFoundError("no netrc")))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert report.wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    assert report.wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert report.wandb_mode() is None  # W&B reads WANDB_MODE itself


def test_wandb_offline_run_holds_the_tables_and_plots(sweep, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    home = tmp_path / "wandb_home"  # W&B's own config, cache and staging, away from the user's
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wb"),
           "WANDB_CONFIG_DIR": str(home / "config"), "WANDB_CACHE_DIR": str(home / "cache"),
           "WANDB_DATA_DIR": str(home / "data")}
    (tmp_path / "wb").mkdir()
    done = subprocess.run([sys.executable, "-m", "squeeze.report", str(sweep), "--out", str(tmp_path / "out"),
                           "--wandb"], cwd=tmp_path, check=False, capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stderr
    [run] = (tmp_path / "wb" / "wandb").glob("offline-run-*")
    # Offline, W&B writes each logged table as JSON under files/media/table/<key>_<step>_<hash>.table.json.
    [table] = (run / "files" / "media" / "table" / "report").glob("tiny_bert-rotten_tomatoes_*.table.json")
    logged = json.loads(table.read_text())
    chain, quality = logged["columns"].index("chain"), logged["columns"].index("quality_mean")
    assert [(row[chain], row[quality]) for row in logged["data"]][:2] == [("none", pytest.approx(0.85)),
                                                                         ("imp", pytest.approx(0.77))]
    assert list((run / "files" / "media" / "table" / "report").glob("cells_*.table.json"))
    images = list((run / "files" / "media" / "images").rglob("*.png"))
    assert len(images) == 6  # five for tiny_bert × rotten_tomatoes, one for tiny_gpt2 × austen
    [log] = run.glob("*.wandb")
    assert b"report/tiny_bert-rotten_tomatoes" in log.read_bytes()  # the key, in the run's record log


def test_expected_validation_needs_more_than_one_cell_a_row(tmp_path):
    root = tmp_path / "multirun" / "one_each"
    write_cell(root, "0", chain="none", quality=0.80, seed=0, size_mb=100, validation=0.81)
    write_cell(root, "1", chain="dq", quality=0.79, seed=0, size_mb=30, validation=0.81)
    (group,) = report.build([root], tmp_path / "out").groups
    assert "expected validation performance" not in group.plots
    assert any(s.startswith("expected validation performance (one cell per row") for s in group.skipped_plots)


def test_dialog_tables_carry_hits_bleu_ter_and_bertscore(tmp_path):
    root = tmp_path / "multirun" / "dialog"
    for name, chain, hits1 in (("0", "none", 0.25), ("1", "dq", 0.20)):
        cell = write_cell(root, name, model="smollm2", task="austen", chain=chain, quality=13.0)
        record = json.loads((cell / "result.json").read_text())
        record["metrics"].update({"test/hits@1": hits1, "test/hits@5": 0.6, "test/hits@10": 0.8, "test/bleu": 0.012,
                                  "test/ter": 1.4, "test/bertscore_f1": 0.41})
        (cell / "result.json").write_text(json.dumps(record))
    text = report.build([root], tmp_path / "out", draw=False).markdown.read_text()
    header = next(line for line in text.splitlines() if line.startswith("| row"))
    for column in ("Hits@1", "Hits@5", "Hits@10", "BLEU", "TER", "BERTScore F1"):
        assert f"| {column} |" in header
    dq = next(line for line in text.splitlines() if line.startswith("| dq"))
    assert "| 0.2 |" in dq and "| 0.41 |" in dq


def test_it_energy_is_the_facility_energy_without_the_pue(tmp_path):
    root = tmp_path / "multirun" / "energy"
    write_cell(root, "0", chain="none", kwh=0.0159)  # write_cell's records say PUE 1.59
    report.build([root], tmp_path / "out", draw=False)
    row = read_csv(tmp_path / "out" / "tiny_bert-rotten_tomatoes.csv")[0]
    assert float(row["it_energy_kwh_mean"]) == pytest.approx(0.01)


def test_every_metric_a_task_records_reaches_its_table(tmp_path):
    # NER records token accuracy (not test/accuracy) beside entity F1, precision and recall.
    root = tmp_path / "sweep"
    ner = {"test/f1": 0.41, "test/precision": 0.5, "test/recall": 0.35, "test/token_accuracy": 0.93, "test/loss": 0.3}
    write_cell(root, "0", task="wnut16", chain="none", quality=0.41, metrics=ner)
    built = report.build([root], tmp_path / "out", draw=False)
    section = built.markdown.read_text().split("## tiny_bert × wnut16")[1]
    header = next(line for line in section.splitlines() if line.startswith("| row |"))
    assert "| test/f1 | Δ% | token accuracy |" in header
    row = read_csv(tmp_path / "out" / "tiny_bert-wnut16.csv")[0]
    assert float(row["token_accuracy_mean"]) == 0.93 and float(row["loss_mean"]) == 0.3
    assert float(row["precision_mean"]) == 0.5 and float(row["recall_mean"]) == 0.35
    # multiple choice: accuracy (summed log-likelihood) is the quality, acc_norm (per character) beside it
    write_cell(root, "1", model="tiny_gpt2", task="rotten_tomatoes", chain="none", quality=0.4,
               metrics={"test/accuracy": 0.4, "test/accuracy_norm": 0.55, "test/loss": 2.0})
    section = report.build([root], tmp_path / "out2", draw=False).markdown.read_text().split("## tiny_gpt2 ×")[1]
    assert "| test/accuracy | Δ% | acc_norm |" in section and "| 0.4 | +0.0% | 0.55 |" in section


def test_a_pipeline_run_is_a_row_beside_the_one_process_run(tmp_path):
    root = tmp_path / "sweep"
    write_cell(root, "0", task="austen", chain="none", quality=40.0, train_s=100.0)
    pipelined = {"stages": 2, "microbatches": 4, "schedule": "gpipe", "loss": 3.9, "tokens_per_s": 800.0,
                 "per_stage": [{"stage": 0, "peak_memory_bytes": 6e8}, {"stage": 1, "peak_memory_bytes": 8e8}]}
    write_cell(root, "1", task="austen", chain="none", quality=41.0, train_s=80.0, pipeline=pipelined,
               train_tokens_per_s=800.0, choices={"model": "tiny_bert", "task": "austen", "compress": "none",
                                                  "hardware": "pipeline"})
    built = report.build([root], tmp_path / "out", draw=False)
    rows = {r["label"]: r for r in built.groups[0].rows}
    assert list(rows) == ["none", "none [pipeline 2 stages gpipe]"]
    row = rows["none [pipeline 2 stages gpipe]"]
    assert row["quality_delta_pct"] == pytest.approx(2.5) and row["own_s_delta_pct"] == pytest.approx(-20.0)
    assert row["stage_peak_mb_mean"] == pytest.approx(800.0)
    header = next(line for line in built.markdown.read_text().splitlines() if line.startswith("| row |"))
    assert "| train tokens/s | peak MB per stage |" in header


@pytest.mark.parametrize("qualities, scale", [([20.0, 35.0, 21000.0], "log"), ([20.0, 35.0, 150.0], "linear")])
def test_quality_axes_go_log_when_values_span_more_than_ten_times(qualities, scale):
    from squeeze.report.plots import tradeoff_figure

    fig, _ = tradeoff_figure(["a", "b", "c"], [1.0, 2.0, 3.0], [None] * 3, qualities, [None] * 3, [0], "size",
                             "perplexity", "t")
    ax = fig.axes[0]
    assert ax.get_yscale() == scale and ax.get_ylabel().endswith("(log scale)") == (scale == "log")


def test_a_presets_table_layout_and_protocol_shape_its_section(tmp_path):
    """config.report.table: the markdown columns in that order, Δ% where asked (the evaluation pass's time and
    energy here, as the GPT-2 study's runtime/energy columns); config.report.protocol and the recorded
    perplexity protocol above the table; an unknown figure is one line."""
    root = tmp_path / "sweep"
    table = {"quality": True, "size_mb": False, "eval_s": True, "eval_kwh": True}
    protocol = "GPT-2 study: evaluation-pass runtime and energy"
    for name, chain, quality, eval_s, kwh in (("0", "none", 30.0, 10.0, 0.002), ("1", "int8wo", 31.0, 25.0, 0.001)):
        rec = write_cell(root, name, model="tiny_gpt2", task="austen", chain=chain, quality=quality, eval_seconds=eval_s,
                         energy={"kwh": 0.01, "phases": {"eval": {"kwh": kwh}}},
                         perplexity={"protocol": "blocks", "block_size": 1024, "stride": None, "scored_tokens": 5000})
        record = json.loads((rec / "result.json").read_text())
        record["config"]["report"] = {"table": table, "protocol": protocol}
        (rec / "result.json").write_text(json.dumps(record))
    out = tmp_path / "out"
    section = report.build([root], out, draw=False).markdown.read_text().split("## tiny_gpt2 × austen")[1]
    assert "| row | ok | failed | test/perplexity | Δ% | size MB | eval s | Δ% | eval kWh | Δ% |" in section
    line = next(x for x in section.splitlines() if x.startswith("| int8wo |"))
    assert "+3.3%" in line and "+150.0%" in line and "-50.0%" in line  # perplexity, eval time, eval energy
    assert protocol in section and "non-overlapping blocks of 1024 tokens, 5000 test tokens scored" in section
    assert "Not in these records" not in section  # the preset left those columns out, the records have them
    record["config"]["report"]["table"] = {"quality": True, "eval_energy": True}
    (rec / "result.json").write_text(json.dumps(record))
    with pytest.raises(SqueezeError, match=r"config.report.table: 'eval_energy' is not a report figure; known: "):
        report.build([root], tmp_path / "out2", draw=False)


def test_whole_model_and_pruned_matrix_counts_are_both_named(tmp_path):
    """pruning_rates: the whole model's parameters and the pruned matrices' (the study's count), side by side."""
    root = tmp_path / "sweep"
    write_cell(root, "0", model="tiny_gpt2", task="austen", chain="none", quality=30.0)
    write_cell(root, "1", model="tiny_gpt2", task="austen", chain="imp", quality=33.0, sparsity=0.5,
               compress={"chain": ["imp"], "imp": {"pruned_params": 600, "sparsity": 0.5}},
               config={"seed": 0, "optimizer": {"lr": 5e-5}, "task": {"name": "austen", "monitor": "val/perplexity",
                                                                       "monitor_mode": "min"},
                       "report": {"table": {"quality": True, "nonzero_params": True, "pruned_matrices_params": False,
                                            "pruned_matrices_nonzero": True}}})
    section = report.build([root], tmp_path / "out", draw=False).markdown.read_text().split("## tiny_gpt2 × austen")[1]
    assert "| nonzero params | Δ% | pruned-matrix params | pruned-matrix nonzero | Δ% |" in section
    line = next(x for x in section.splitlines() if x.startswith("| imp |"))
    assert "| 500 | " in line and "| 600 | 300 |" in line  # whole model 1000 → 500 nonzero; matrices 600 → 300


def test_a_pruners_rounds_are_plotted_against_the_weights_left(tmp_path):
    """nanoGPT's trajectory: the validation after each round's retraining and its train throughput, per cell."""
    root = tmp_path / "sweep"
    write_cell(root, "0", model="tiny_gpt2", task="austen", chain="none", quality=30.0)
    points = [{"sparsity": 0.0, "step": 2, "val/perplexity": 30.0, "train_tokens_per_s": 900.0}] + [
        {"sparsity": s, "pruned_at": 2 * i, "step": 2 * i + 2, "val/perplexity": 30.0 + 40 * s, "train_tokens_per_s": 1000.0}
        for i, s in enumerate((0.1, 0.2, 0.3), start=1)]
    write_cell(root, "1", model="tiny_gpt2", task="austen", chain="imp", quality=42.0, sparsity=0.3,
               compress={"chain": ["imp"], "imp": {"sparsity": 0.3, "trajectory": points}})
    built = report.build([root], tmp_path / "out")
    group = built.groups[0]
    path = group.plots["pruning rounds"]
    assert path.name == "tiny_gpt2-austen-pruning-rounds.png" and path.read_bytes().startswith(PNG)
    assert "![pruning rounds](plots/tiny_gpt2-austen-pruning-rounds.png)" in built.markdown.read_text()
    assert next(c for c in built.cells if c["chain"] == "imp")["trajectory"] == points


@pytest.mark.parametrize("section, message", [
    ({"tabel": {"quality": True}},
     r"^report.tabel is not a report setting; use one of \['table', 'protocol', 'evp_axis'\]"),
    ({"table": {"qualty": True}}, r"^config.report.table: 'qualty' is not a report figure; known: "),
])
def test_a_misspelt_report_section_stops_before_the_run_loads(section, message, tmp_path):
    from omegaconf import OmegaConf, open_dict
    from squeeze import config
    from conftest import compose_cfg

    cfg = compose_cfg("train", ["model=tiny_gpt2", "task=austen"], tmp_path)
    with open_dict(cfg):
        cfg.report = OmegaConf.create(section)
    with pytest.raises(SqueezeError, match=message):
        config.check_before_loading(cfg)
