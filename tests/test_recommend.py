"""python -m squeeze.recommend on hand-made result records: the row a person would pick within a quality budget,
rows it refuses to tell apart, the evidence flags, side-by-side intervals, devices, --json and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_report import imp_at, write_cell

from squeeze import report
from squeeze.errors import SqueezeError
from squeeze.report import recommend

ROOT = Path(__file__).resolve().parents[1]


def known_sweep(root: Path) -> Path:
    """none, int8wo, imp at 0.3 and 0.9, two seeds each: imp 0.9 is far over a 1pt budget, int8wo is the smallest
    row within it (0.35pt below none), imp 0.3 loses nothing but is larger."""
    rows = (("none", None, (0.850, 0.860), 100, (10, 11)), ("int8wo", None, (0.846, 0.857), 27, (8, 9)),
            ("imp", 0.3, (0.853, 0.859), 70, (9, 10)), ("imp", 0.9, (0.700, 0.720), 12, (9, 10)))
    for chain, target, qualities, size, latencies in rows:
        for seed, (q, ms) in enumerate(zip(qualities, latencies)):
            write_cell(root, f"{chain}{target or ''}-{seed}", chain=chain, quality=q, seed=seed, size_mb=size,
                       latency_ms=ms, settings=None if target is None else imp_at(target))
    return root


def only(doc: dict) -> dict:
    [group] = doc["groups"]
    return group


def rows_of(group: dict) -> dict[str, dict]:
    return {r["label"]: r for r in group["rows"]}


@pytest.mark.parametrize("text, budget", [("1pt", (1.0, "pt")), ("0.5pt", (0.5, "pt")), (" 5 % ", (5.0, "%")),
                                          ("0%", (0.0, "%"))])
def test_budgets_parse(text, budget):
    parsed = recommend.parse_budget(text)
    assert (parsed.amount, parsed.unit) == budget


@pytest.mark.parametrize("text", ["1point", "5", "-1pt", "pt", "1pt%", "five%"])
def test_a_bad_budget_is_one_clear_line(text):
    with pytest.raises(SqueezeError, match=r"is not a budget; write points .* as 1pt .* or a relative change as 5%"):
        recommend.parse_budget(text)


def test_the_smallest_row_within_the_budget_is_picked_and_the_smaller_one_over_it_rejected(tmp_path):
    root = known_sweep(tmp_path / "sweep")
    group = only(recommend.run([root], "1pt"))
    assert group["recommended"] == ["int8wo"] and group["tie"] is False
    assert group["rejected"] == [{"label": "imp target=0.9", "reason": "over budget: drops 14.5pt > 1pt"}]
    assert group["pareto"] == ["imp target=0.9", "int8wo", "imp target=0.3"]  # none: as good as imp 0.3, larger
    assert (group["points_scale"], group["budget"]["text"], group["baseline"]) == (100.0, "1pt", "none")
    int8 = rows_of(group)["int8wo"]
    # Paired over seeds 0 and 1: drops of 0.4 and 0.3 points.
    assert int8["drop"]["value"] == pytest.approx(0.35) and int8["drop"]["spread"] == pytest.approx(0.0707107, rel=1e-5)
    assert (int8["drop"]["spread_from"], int8["drop"]["pairs"], int8["verdict"]) == ("paired", 2, "within")
    assert int8["margin"] == pytest.approx(0.65)
    assert int8["objective"]["value"] == 27 and int8["objective"]["delta_pct"] == pytest.approx(-73.0)
    assert "recommended: `int8wo` — size MB 27 ± 0 (-73.0% vs `none`)" in group["summary"]
    # The budget moves the choice: a loose one lets the 90 % pruned row in, a tight one pushes int8wo out.
    assert only(recommend.run([root], "20pt"))["recommended"] == ["imp target=0.9"]
    tight = only(recommend.run([root], "0.3pt"))
    assert tight["recommended"] == ["imp target=0.3"]
    assert rows_of(tight)["int8wo"]["reason"] == "over budget: drops 0.35pt > 0.3pt (by less than its spread)"
    # Relative: 0.35pt of 85.5 is 0.41 %.
    assert only(recommend.run([root], "1%"))["recommended"] == ["int8wo"]
    assert only(recommend.run([root], "0.4%"))["recommended"] == ["imp target=0.3"]


def test_a_lower_is_better_metric_drops_when_it_rises_and_defaults_to_five_percent(tmp_path):
    root = tmp_path / "sweep"
    for chain, ppls, size in (("none", (100.0, 102.0), 100), ("dq", (104.0, 106.0), 30), ("imp", (108.0, 110.0), 20)):
        for seed, ppl in enumerate(ppls):
            write_cell(root, f"{chain}{seed}", model="tiny_gpt2", task="austen", chain=chain, quality=ppl, seed=seed,
                       size_mb=size, settings=None if chain != "imp" else imp_at(0.5))
    group = only(recommend.run([root]))
    assert (group["points_scale"], group["budget"]["text"], group["mode"]) == (1.0, "5%", "min")
    assert group["recommended"] == ["dq"]  # perplexity 105 against 101: +3.96 %
    assert rows_of(group)["dq"]["drop"]["value"] == pytest.approx(4 / 101 * 100)
    assert [r["label"] for r in group["rejected"]] == ["imp"]  # 109 against 101: +7.9 %
    # Points of a metric outside [0, 1] are its own units: 4 perplexity points are over a 3pt budget.
    assert only(recommend.run([root], "3pt"))["recommended"] == ["none"]


def test_rows_whose_intervals_overlap_are_not_told_apart(tmp_path):
    root = tmp_path / "sweep"
    # int8wo 8.5 ± 0.71 ms and int4wo 8.9 ± 0.71 ms: both within budget, their spreads overlap.
    for chain, qualities, latencies in (("none", (0.850, 0.860), (10.0, 11.0)), ("int8wo", (0.849, 0.858), (8.0, 9.0)),
                                        ("int4wo", (0.846, 0.855), (8.4, 9.4))):
        for seed, (q, ms) in enumerate(zip(qualities, latencies)):
            write_cell(root, f"{chain}{seed}", chain=chain, quality=q, seed=seed, latency_ms=ms)
    group = only(recommend.run([root], "1pt", "latency"))
    assert group["tie"] is True and group["recommended"] == ["int8wo", "int4wo"]  # int8wo keeps more margin
    assert group["summary"] == ("`int8wo` and `int4wo` cannot be told apart on latency (intervals overlap); all within "
                                "1pt of `none`, `int8wo` first (most quality margin)")
    assert [d.split(":")[0] for d in group["details"]] == ["`int8wo`", "`int4wo`"]
    # Timed side by side, the paired ratios separate them: int4wo is faster, and it is crowned.
    side = {"schema": 1, "rounds": 10, "device": "cpu", "threads": 2, "groups": [], "rows": []}
    for name, median, ratio in (("none", 10.0, (1.0, 1.0, 1.0)), ("int8wo", 8.0, (0.80, 0.78, 0.82)),
                                ("int4wo", 7.2, (0.72, 0.70, 0.74))):
        side["rows"].append({"model": "tiny_bert", "task": "rotten_tomatoes", "name": name, "chain": name,
                             "runs": [], "latency_ms": {"batch_1": {"median": median, "ci95": [median - 0.1, median + 0.1],
                                                                   "coverage": 0.98}},
                             "decode_tokens_per_s": {}, "ratio_to_baseline": {"latency_batch_1": {
                                 "median": ratio[0], "ci95": list(ratio[1:]), "coverage": 0.98}}})
    (root / "side_by_side.json").write_text(json.dumps(side))
    group = only(recommend.run([root], "1pt", "latency"))
    assert group["recommended"] == ["int4wo"] and group["tie"] is False
    fig = rows_of(group)["int4wo"]["objective"]
    assert (fig["from"], fig["value"], fig["delta_pct"]) == ("side_by_side", 7.2, pytest.approx(-28.0))
    # Ratio intervals that overlap leave them tied again, whatever their medians.
    side["rows"][2]["ratio_to_baseline"]["latency_batch_1"]["ci95"] = [0.70, 0.79]
    (root / "side_by_side.json").write_text(json.dumps(side))
    assert set(only(recommend.run([root], "1pt", "latency"))["recommended"]) == {"int8wo", "int4wo"}
    # A device the records do not have figures for: nothing to recommend, and said.
    cuda = only(recommend.run([root], "1pt", "latency", device="cuda"))
    assert cuda["recommended"] == [] and cuda["summary"].startswith("no recommendation: no row within 1pt")
    assert "no latency ms (b1) on cuda for `none`, `int4wo`, `int8wo`" in cuda["notes"]  # rows in job order


def test_a_row_that_ties_with_the_baseline_leaves_the_baseline_recommended_and_unstarred(tmp_path):
    root = tmp_path / "sweep"
    for chain in ("none", "dq"):  # dq saves nothing on size here
        for seed, q in ((0, 0.850), (1, 0.860)):
            write_cell(root, f"{chain}{seed}", chain=chain, quality=q - 0.002 * (chain == "dq"), seed=seed)
    built = report.build([root], tmp_path / "out", draw=False)
    [group] = built.advice
    assert (group["recommended"], group["tie"], group["tied"]) == (["none"], True, ["none", "dq"])
    assert group["summary"] == ("keep `none`: no row within 1pt is measurably better on size (`dq` cannot be told "
                                "apart from it: intervals overlap)")
    text = built.markdown.read_text()
    assert "| **none** (baseline) |" in text and "| dq |" in text and "★ |" not in text


def test_thin_evidence_is_flagged_or_rejected(tmp_path):
    root = tmp_path / "sweep"
    for seed, q in ((0, 0.850), (1, 0.870)):  # the baseline's seed spread: 1.41 points
        write_cell(root, f"none{seed}", chain="none", quality=q, seed=seed, size_mb=100)
    # One cell, 0.5pt under the baseline: within 1pt, but by less than a seed's noise.
    write_cell(root, "dq0", chain="dq", quality=0.845, seed=0, size_mb=20)
    # Two cells, drops of 0.5 and 1.1pt: within by 0.2pt, less than their spread of 0.42pt.
    for seed, q in ((0, 0.845), (1, 0.859)):
        write_cell(root, f"int8wo{seed}", chain="int8wo", quality=q, seed=seed, size_mb=27)
    group = only(recommend.run([root], "1pt"))
    rows = rows_of(group)
    assert (rows["dq"]["verdict"], rows["dq"]["drop"]["spread_from"]) == ("not_enough_evidence", "baseline")
    assert group["rejected"] == [{"label": "dq", "reason": rows["dq"]["reason"]}]
    assert rows["dq"]["reason"].startswith("not enough evidence: one cell, within budget by 0.5pt")
    assert rows["int8wo"]["verdict"] == "marginal" and rows["int8wo"]["drop"]["spread"] == pytest.approx(0.4242641)
    assert group["recommended"] == ["int8wo"]
    assert "[marginal: within budget by 0.2pt, less than its spread ±0.4243pt]" in group["summary"]


def test_decode_speed_is_maximised_on_the_device_asked_for(tmp_path):
    root = tmp_path / "sweep"
    for chain, ppl, cpu, cuda in (("none", 100.0, 50.0, 500.0), ("dq", 101.0, 40.0, 900.0), ("int8wo", 101.0, 80.0, 600.0)):
        perf = {"device": "cpu", "cpu": {"decode_tokens_per_s": {"batch_1": cpu}},
                "cuda": {"decode_tokens_per_s": {"batch_1": cuda}}}
        write_cell(root, chain, model="tiny_gpt2", task="austen", chain=chain, quality=ppl, perf=perf)
    with pytest.raises(SqueezeError, match="decode speed on cpu and cuda; pick one with --device"):
        recommend.run([root], "5%", "decode")
    assert only(recommend.run([root], "5%", "decode", device="cuda"))["recommended"] == ["dq"]
    on_cpu = only(recommend.run([root], "5%", "decode", device="cpu"))
    assert on_cpu["recommended"] == ["int8wo"] and on_cpu["pareto"] == ["int8wo", "none"]
    assert "one cell per row: quality margins are judged on single values (run more seeds to know them)" in on_cpu["notes"]


def test_without_a_baseline_nothing_is_recommended(tmp_path):
    root = tmp_path / "sweep"
    write_cell(root, "0", chain="dq", quality=0.80)
    group = only(recommend.run([root], "1pt"))
    assert group["recommended"] == [] and group["summary"].startswith("no recommendation: no baseline row")
    assert only(recommend.run([root], "1pt", baseline="dq"))["recommended"] == ["dq"]


def test_the_report_marks_and_explains_the_recommendation(tmp_path):
    built = report.build([known_sweep(tmp_path / "sweep")], tmp_path / "out", draw=False)
    text = built.markdown.read_text()
    assert "| int8wo ★ | 2 | 0 |" in text and "| imp target=0.3 | 2 | 0 |" in text
    assert ("**Recommendation** (quality at most 1pt below `none`, then the smallest size MB; ★ in the table): "
            "`int8wo` — size MB 27 ± 0") in text
    assert "Better on size but rejected: `imp target=0.9` (over budget: drops 14.5pt > 1pt)." in text
    assert [a["recommended"] for a in built.advice] == [["int8wo"]]


def test_the_tradeoff_plot_stars_the_recommended_row():
    from squeeze.report.plots import tradeoff_figure

    fig, _ = tradeoff_figure(["a", "b", "c"], [1.0, 2.0, 3.0], [None] * 3, [0.5, 0.8, 0.9], [None] * 3, [0, 1, 2],
                             "size", "accuracy", "t", recommended={"b"})
    [stars] = [c for c in fig.axes[0].collections if c.get_label() == "recommended (see report)"]
    assert stars.get_offsets().tolist() == [[2.0, 0.8]]
    fig, _ = tradeoff_figure(["a"], [1.0], [None], [0.5], [None], [0], "size", "accuracy", "t")
    assert not [c for c in fig.axes[0].collections if c.get_label() == "recommended (see report)"]


def test_cli_json_shape_and_exit_codes(tmp_path):
    root = known_sweep(tmp_path / "sweep")
    done = subprocess.run([sys.executable, "-m", "squeeze.recommend", str(root), "--max-drop", "1pt", "--json"],
                          cwd=ROOT, check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert set(doc) == {"schema", "objective", "max_drop", "device", "baseline", "skipped", "groups"}
    assert doc["objective"] == {"name": "size", "figure": "size_mb", "direction": "min", "header": "size MB"}
    [group] = doc["groups"]
    assert set(group) == {"model", "task", "hardware", "metric", "mode", "points_scale", "budget", "baseline",
                          "recommended", "tie", "tied", "summary", "details", "pareto", "rejected", "notes", "rows"}
    assert set(group["rows"][0]) == {"label", "chain", "n_ok", "n_failed", "quality", "drop", "margin", "verdict",
                                     "eligible", "reason", "objective"}
    assert set(group["rows"][0]["objective"]) == {"value", "spread", "low", "high", "n", "from", "delta_pct", "ratio"}
    assert group["recommended"] == ["int8wo"]
    bad = subprocess.run([sys.executable, "-m", "squeeze.recommend", str(root), "--max-drop", "1point"],
                         cwd=ROOT, check=False, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == ["error: --max-drop '1point' is not a budget; write points of the quality "
                                               "metric as 1pt (×100 for metrics in [0, 1]) or a relative change as 5%"]


def test_cli_on_a_directory_without_records(tmp_path, capsys):
    from squeeze.recommend import main

    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), "--max-drop", "1pt"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"error: no result.json under {tmp_path / 'empty'}; pass a squeeze sweep or "
                                        "run directory (a run writes its result.json when it ends)"]
    assert main([str(known_sweep(tmp_path / "sweep"))]) == 0
    assert "recommended: `int8wo`" in capsys.readouterr().out
