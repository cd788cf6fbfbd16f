"""The best_way_to_squeeze report on hand-made records, as the thesis shows it: expected validation performance
against the training budget (config.report.evp_axis), CO2 per technique and per row (all runs against the best
one), Δ% for every figure of the presets' tables, TER as a ratio."""

from __future__ import annotations

import itertools
import json
import random
import statistics
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from squeeze import report
from squeeze.errors import SqueezeError
from squeeze.report import plots
from squeeze.report.aggregate import (EXACT_TRIALS, check_report_section, co2_by_row, expected_best_within_budget,
                                      expected_validation_budget_curve)

from conftest import ROOT
from test_report import read_csv, write_cell

PRESETS = ("best_way_to_squeeze", "best_way_to_squeeze_offline")


def _preset_report(name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "experiment" / f"{name}.yaml").report, resolve=True)


def _with_report(run_dir: Path, section: dict) -> None:
    path = run_dir / "result.json"
    record = json.loads(path.read_text())
    record["config"]["report"] = section
    path.write_text(json.dumps(record))


# -- expected validation against the training budget ----------------------------------------------------------
def _simulated(values, seconds, budget, mode, draws, rng):
    """Random orders, each trial run to its end while the next one fits the budget: the best among those run."""
    pick, total = (max if mode == "max" else min), 0.0
    for _ in range(draws):
        spent, best = 0.0, None
        for i in rng.sample(range(len(values)), len(values)):
            if spent + seconds[i] > budget:
                break
            spent += seconds[i]
            best = values[i] if best is None else pick(best, values[i])
        total += best
    return total / draws


@pytest.mark.parametrize("mode", ["max", "min"])
def test_budget_curve_is_the_expected_best_over_random_orders(mode):
    values, seconds = [0.61, 0.74, 0.80, 0.52, 0.91], [30.0, 10.0, 25.0, 12.0, 40.0]
    budgets, curve = expected_validation_budget_curve(values, seconds, mode)
    # From the longest trial (every order runs one) to the row's own cost (all run: the best of all).
    assert budgets[0] == 40.0 and budgets[-1] == sum(seconds)
    assert curve[-1] == pytest.approx(max(values) if mode == "max" else min(values))
    rng = random.Random(0)
    for budget in (40.0, 52.0, 67.0, 100.0):
        exact = expected_best_within_budget(values, seconds, budget, mode)
        assert exact == pytest.approx(_simulated(values, seconds, budget, mode, 30_000, rng), abs=4e-3), budget
    better = [b - a for a, b in itertools.pairwise(curve)]
    assert all(d >= -1e-12 for d in better) if mode == "max" else all(d <= 1e-12 for d in better)
    with pytest.raises(ValueError, match="below the longest trial"):
        expected_best_within_budget(values, seconds, 39.0, mode)


def test_equal_train_times_give_the_best_of_k_cells_drawn_without_replacement():
    values = [0.6, 0.8, 0.7, 0.75]
    budgets, curve = expected_validation_budget_curve(values, [10.0] * 4)
    assert budgets == [10.0, 20.0, 30.0, 40.0]
    for k, value in enumerate(curve, start=1):
        assert value == pytest.approx(statistics.fmean(max(s) for s in itertools.combinations(values, k)))
    assert curve[0] == pytest.approx(statistics.fmean(values))


def test_more_trials_than_the_exact_limit_are_sampled_close_to_the_exact_value():
    values = [0.5 + 0.03 * i for i in range(EXACT_TRIALS + 2)]
    k = 3  # equal times: a budget of 3 trials is the best of a random 3-subset
    exact = statistics.fmean(max(s) for s in itertools.combinations(values, k))
    assert expected_best_within_budget(values, [1.0] * len(values), float(k)) == pytest.approx(exact, abs=5e-3)


def _lr_grid(root: Path, section: dict | None = None) -> None:
    """A BERT sentiment grid: none and IMP over three learning rates, IMP slower; one IMP run failed; DQ with its
    own (short) train time."""
    for i, (lr, q, s) in enumerate(((2e-5, 0.80, 100.0), (3e-5, 0.84, 110.0), (5e-5, 0.82, 105.0))):
        write_cell(root, f"none{i}", chain="none", lr=lr, quality=q, validation=q, train_s=s, kwh=0.01 * (i + 1))
        write_cell(root, f"imp{i}", chain="imp", lr=lr, quality=q - 0.03, validation=q - 0.02, train_s=2 * s,
                   kwh=0.02 * (i + 1), settings={"imp": {"target": 0.5, "label": "IMP"}})
        write_cell(root, f"dq{i}", chain="dq", lr=lr, quality=q - 0.01, validation=q - 0.01, train_s=1.0, kwh=0.001,
                   settings={"dq": {"label": "DQ"}})
    failed = write_cell(root, "imp-failed", chain="imp", lr=1e-4, status="failed", error="RuntimeError: nan",
                        settings={"imp": {"target": 0.5, "label": "IMP"}},
                        energy={"kwh": 0.005, "co2_kg": 0.005 * 0.275, "pue": 1.59, "co2": "eea",
                                "co2_kg_per_kwh": 0.275})
    for run_dir in root.iterdir():
        record = json.loads((run_dir / "result.json").read_text())
        if run_dir != failed and record.get("energy"):  # the EU factor, as the presets record it
            record["energy"].update(co2_kg=record["energy"]["kwh"] * 0.275, co2="eea", co2_kg_per_kwh=0.275)
            (run_dir / "result.json").write_text(json.dumps(record))
        if section is not None:
            _with_report(run_dir, section)


@pytest.fixture
def saved_figures(monkeypatch):
    """Every figure the plots save, by file name."""
    saved = {}
    real = plots._save

    def keep(fig, path, layout=True):
        saved[path.name] = fig
        return real(fig, path, layout)

    monkeypatch.setattr(plots, "_save", keep)
    return saved


@pytest.mark.parametrize("axis", [None, "trials", "train_seconds"])
def test_the_report_section_picks_the_expected_validation_axis_and_the_plot_says_which(axis, tmp_path,
                                                                                      saved_figures):
    root = tmp_path / "sweep"
    _lr_grid(root, None if axis is None else {"evp_axis": axis})
    built = report.build([root], tmp_path / "out")
    [group] = built.groups
    assert group.evp_axis == (axis or "trials")
    path = group.plots["expected validation performance"]
    assert path.name == "tiny_bert-rotten_tomatoes-expected-validation.png"
    ax = saved_figures[path.name].axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"none", "IMP", "DQ"}
    if axis == "train_seconds":
        assert ax.get_xlabel().startswith(plots.BUDGET_AXIS) and ax.get_title().endswith("vs training budget")
        assert ax.get_xscale() == "log"  # DQ's seconds beside IMP's minutes
        # IMP's finished runs took 200, 220 and 210 s: its curve runs from the longest to their sum, to the best.
        assert list(lines["IMP"].get_xdata()) == [220.0, 410.0, 420.0, 430.0, 630.0]
        assert lines["IMP"].get_ydata()[-1] == pytest.approx(0.82)
    else:
        assert ax.get_xlabel() == plots.TRIALS_AXIS and ax.get_title().endswith("vs cells tried")
        assert list(lines["IMP"].get_xdata()) == [1, 2, 3]


def test_a_misspelt_axis_is_one_line_before_the_run_and_in_the_report(tmp_path):
    message = r"^config.report.evp_axis='hours': use one of \['trials', 'train_seconds'\]"
    with pytest.raises(SqueezeError, match=message):
        check_report_section({"evp_axis": "hours"})
    root = tmp_path / "sweep"
    _lr_grid(root, {"evp_axis": "hours"})
    with pytest.raises(SqueezeError, match=message):
        report.build([root], tmp_path / "out", draw=False)


# -- CO2 ------------------------------------------------------------------------------------------------------
def test_co2_per_row_sets_all_runs_against_the_best_one_and_per_technique_over_the_grid(tmp_path):
    root = tmp_path / "sweep"
    _lr_grid(root)
    # The same techniques on a second model × task: the per-technique table sums over both.
    write_cell(root, "ner-none", task="wnut16", chain="none", quality=0.4, validation=0.4, kwh=0.1,
               energy={"kwh": 0.1, "co2_kg": 0.0275, "pue": 1.59, "co2": "eea", "co2_kg_per_kwh": 0.275})
    built = report.build([root], tmp_path / "out", draw=False)
    sentiment = next(g for g in built.groups if g.task == "rotten_tomatoes")
    rows = {r["label"]: r for r in co2_by_row(sentiment)}
    imp = rows["IMP"]
    # Four runs (three lrs and the failed one): 0.02 + 0.04 + 0.06 + 0.005 kWh at 0.275 kg/kWh.
    assert (imp["runs"], imp["failed"], imp["lrs"]) == (4, 1, [2e-5, 3e-5, 5e-5, 1e-4])
    assert imp["kwh"] == pytest.approx(0.125) and imp["co2_kg"] == pytest.approx(0.125 * 0.275)
    assert imp["factors"] == [("eea", 0.275)]
    # Its best run by validation is lr 3e-5 (0.82): 0.04 kWh.
    assert (imp["best"]["lr"], imp["best"]["co2_kg"]) == (3e-5, pytest.approx(0.04 * 0.275))
    text = built.markdown.read_text()
    section = text.split("## tiny_bert × rotten_tomatoes")[1].split("## ")[0]
    assert "as recorded at kg/kWh eea 0.275" in section and "by validation (`val/accuracy`" in section
    line = next(x for x in section.splitlines() if x.startswith("| IMP | 4 | 1 |"))
    assert line == ("| IMP | 4 | 1 | 2e-05, 3e-05, 5e-05, 0.0001 | 0.125 | 0.03438 | lr 3e-05, seed 0 | 0.011 "
                    "| 3.12× |")
    grid = text.split("CO2 per technique over the whole grid")[1].split("## ")[0]
    none = next(x for x in grid.splitlines() if x.startswith("| none |"))
    # 0.01 + 0.02 + 0.03 kWh (sentiment) + 0.1 (NER) = 0.16 kWh, 0.044 kg.
    assert none == "| none | tiny_bert × rotten_tomatoes, tiny_bert × wnut16 | 4 | 0 | 0.16 | 0.044 |"
    assert "| IMP | tiny_bert × rotten_tomatoes | 4 | 1 | 0.125 | 0.03438 |" in grid


def test_no_co2_tables_without_energy(tmp_path):
    root = tmp_path / "sweep"
    write_cell(root, "0", chain="none", quality=0.8)
    write_cell(root, "1", chain="none", quality=0.7, lr=1e-4)
    text = report.build([root], tmp_path / "out", draw=False).markdown.read_text()
    assert "CO2 per row" not in text and "CO2 per technique" not in text


# -- the presets' tables --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PRESETS)
def test_the_presets_give_every_figure_of_their_table_a_delta(name):
    section = _preset_report(name)
    check_report_section(section)
    assert section["evp_axis"] == "train_seconds"
    table = section["table"]
    assert [k for k, delta in table.items() if not delta] == ["sparsity"]  # the baseline's is 0: no Δ%
    for figure in ("quality", "accuracy", "precision", "recall", "f1", "token_accuracy", "hits_1", "hits_5",
                   "hits_10", "bleu", "ter", "bertscore_f1", "size_mb", "latency_ms.cpu.batch_1",
                   "latency_ms.cuda.batch_1", "train_s", "energy_kwh", "it_energy_kwh", "co2_kg"):
        assert table[figure] is True, figure
    assert _preset_report("best_way_to_squeeze") == _preset_report("best_way_to_squeeze_offline")


TASK_METRICS = {  # what each of the thesis' tasks records (its quality metric among them)
    "rotten_tomatoes": {"test/accuracy": 0.8, "test/precision": 0.79, "test/recall": 0.81, "test/f1": 0.8},
    "wnut16": {"test/f1": 0.4, "test/precision": 0.5, "test/recall": 0.35, "test/token_accuracy": 0.93},
    "austen": {"test/perplexity": 20.0, "test/hits@1": 0.3, "test/hits@5": 0.6, "test/hits@10": 0.8,
               "test/bleu": 1.2, "test/ter": 1.016, "test/bertscore_f1": 0.4},
}


@pytest.mark.parametrize("task, headers", [
    ("rotten_tomatoes", ["test/accuracy", "precision", "recall", "F1"]),
    ("wnut16", ["test/f1", "token accuracy", "precision", "recall"]),
    ("austen", ["test/perplexity", "Hits@1", "Hits@5", "Hits@10", "BLEU", "TER", "BERTScore F1"]),
])
def test_one_preset_table_shows_each_tasks_metrics_each_with_its_delta(task, headers, tmp_path):
    """One preset-wide layout: a metric the task does not record drops out of its table, its quality metric is the
    quality column, and every figure shown but sparsity has a Δ% (in the CSV too)."""
    root = tmp_path / "sweep"
    section = _preset_report("best_way_to_squeeze")
    for name, chain, scale in (("0", "none", 1.0), ("1", "dq", 0.9)):
        metrics = {k: v * scale for k, v in TASK_METRICS[task].items()}
        quality = next(v for k, v in metrics.items() if k.split("/")[1] in ("accuracy", "f1", "perplexity"))
        run_dir = write_cell(root, name, task=task, chain=chain, quality=quality, latency_ms=10 * scale,
                             kwh=0.01 * scale, sparsity=0.0 if chain == "none" else 0.5,
                             metrics={**metrics, "test/loss": 0.5}, **({"hits_rank": "mc"} if task == "austen" else {}))
        _with_report(run_dir, section)
    built = report.build([root], tmp_path / "out", draw=False)
    table = built.markdown.read_text().split(f"## tiny_bert × {task}")[1]
    # which ranking the Hits@k columns are, said once under the table's protocol (dialog only)
    ranked = "Hits@k: candidates ranked by the multiple-choice head, as a double-heads model ranks them"
    assert (ranked in table) == (task == "austen")
    header = next(x for x in table.splitlines() if x.startswith("| row |")).strip("| ").split(" | ")
    for name in headers:
        assert header[header.index(name) + 1] == "Δ%", name
    for name in ("size MB", "latency ms b1 (cpu)", "train s", "IT kWh", "energy kWh", "CO2 kg", "total kWh"):
        assert header[header.index(name) + 1] == "Δ%", name
    assert "sparsity" in header and header[header.index("sparsity") + 1] != "Δ%"
    shown = {"Hits@1", "BLEU", "TER", "precision", "token accuracy", "accuracy"} - set(headers)
    assert not shown & set(header)  # other tasks' metrics drop out
    dq = next(x for x in table.splitlines() if x.startswith("| dq |"))
    assert dq.count("-10.0%") >= len(headers) + 5  # every metric and cost scaled by 0.9
    row = next(r for r in read_csv(tmp_path / "out" / f"tiny_bert-{task}.csv") if r["chain"] == "dq")
    for name in ("quality", "size_mb", "co2_kg", "energy_kwh", "it_energy_kwh", "train_s"):
        assert row[f"{name}_delta_pct"] != "", name
    if task == "austen":
        assert float(row["ter_delta_pct"]) == pytest.approx(-10.0) and "| 0.9144 | -10.0% |" in dq  # TER, a ratio
    else:
        assert float(row["precision_delta_pct"]) == pytest.approx(-10.0)


# -- TER --------------------------------------------------------------------------------------------------------
def test_dialog_ter_is_a_ratio_and_bleu_stays_on_sacrebleus_scale():
    from types import SimpleNamespace

    import torch
    from torchmetrics.text import Perplexity, TranslationEditRate

    from squeeze.tasks.base import IGNORE_INDEX
    from squeeze.tasks.dialog.metrics import CorpusBLEU, HitsAtK
    from squeeze.tasks.dialog.module import DialogModule

    metrics = {"perplexity": Perplexity(ignore_index=IGNORE_INDEX), "hits": HitsAtK((1,)), "bleu": CorpusBLEU(),
               "ter": TranslationEditRate()}
    metrics["perplexity"].update(torch.zeros(1, 2, 4), torch.tensor([[1, 2]]))
    metrics["hits"].update(torch.tensor([[0.1, 0.9]]))  # the gold reply (last) ranked first
    replies, references = ["the cat sat on the mat"], [["the cat sat on the mat"]]
    metrics["bleu"].update(replies, references)
    # 3 words to insert into a 6-word reference: TER 0.5 (50 on sacreBLEU's ×100 scale)
    metrics["ter"].update(["the cat sat"], references)
    module = SimpleNamespace(metrics={"val": {}, "test": metrics}, _generation={})
    out = DialogModule.compute_metrics(module, metrics)
    assert float(out["ter"]) == pytest.approx(0.5)
    assert float(out["bleu"]) == pytest.approx(100.0)


@pytest.mark.parametrize("name", PRESETS)
def test_the_presets_report_section_passes_the_check_before_a_run_loads(name, tmp_path):
    from squeeze import config
    from conftest import compose_cfg

    cfg = compose_cfg("train", [f"experiment={name}"], tmp_path)
    assert cfg.report.evp_axis == "train_seconds" and cfg.report.table.ter is True
    config.check_before_loading(cfg)


# -- latency on CPU and GPU side by side ------------------------------------------------------------------------
def _perf(cpu_ms: float, gpu_ms: float | None) -> dict:
    def on(ms):
        return {"latency": {"batch_1": {"median_s": ms / 1e3, "p10_s": 0.0, "p90_s": 1.0, "repeats": 3}}}
    by_device = {"cpu": on(cpu_ms), **({} if gpu_ms is None else {"cuda": on(gpu_ms)})}
    return {"device": "cpu", **on(cpu_ms), **({"by_device": by_device} if gpu_ms is not None else {}), **by_device}


@pytest.mark.parametrize("with_gpu", [True, False])
def test_the_thesis_table_shows_cpu_and_gpu_latency_where_both_were_measured(with_gpu, tmp_path):
    section = _preset_report("best_way_to_squeeze")
    root = tmp_path / "sweep"
    for name, chain, cpu, gpu in (("a", "none", 40.0, 4.0), ("b", "dq", 20.0, 5.0)):
        _with_report(write_cell(root, name, chain=chain, quality=0.8, validation=0.8,
                                perf=_perf(cpu, gpu if with_gpu else None)), section)
    built = report.build([root], tmp_path / "out", draw=False)
    [group] = built.groups
    table = built.markdown.read_text().split("## tiny_bert × rotten_tomatoes")[1]
    header = next(line for line in table.splitlines() if line.startswith("| row |") and "latency" in line)
    cells = [c.strip() for c in header.split("|")]
    assert "latency ms b1 (cpu)" in cells
    assert ("latency ms b1 (cuda)" in cells) == with_gpu
    dq = next(line for line in table.splitlines() if line.startswith("| dq"))
    values = [c.strip() for c in dq.split("|")]
    at = cells.index("latency ms b1 (cpu)")
    assert values[at] == "20" and values[at + 1] == "-50.0%"  # the CPU latency and its Δ% against none
    if with_gpu:
        at = cells.index("latency ms b1 (cuda)")
        assert values[at] == "5" and values[at + 1] == "+25.0%"
