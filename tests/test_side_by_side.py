"""python -m squeeze.measure: a two-row tiny sweep measured side by side in interleaved rounds, the file it
writes, the report that reads it, run directories as rows, the memory decision and bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from squeeze import report, run
from squeeze.errors import SqueezeError
from squeeze.measure import side_by_side
from squeeze.measure.__main__ import main

from conftest import compose_cfg, fast, read_result

ROOT = Path(__file__).resolve().parents[1]
# Small perf settings, recorded by the cells and so used by the side-by-side measurement.
PERF = ["perf.batch_sizes=[1,2]", "perf.decode_batch_sizes=[1]", "perf.decode_new_tokens=3",
        "perf.decode_prompt_tokens=6", "perf.repeats=1", "perf.warmup=0", "perf.decode_repeats=1"]
QUICK = ["--rounds", "3", "--repeats", "1", "--warmup", "0"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """A sweep directory of two finished tiny GPT-2 × austen cells: the baseline chain and int8wo."""
    root = tmp_path_factory.mktemp("side_by_side") / "multirun" / "sweep"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i, chain in enumerate(("none", "int8wo")):
            overrides = ["model=tiny_gpt2", "task=austen", *fast("austen"), "trainer.max_steps=1",
                         "callbacks.energy=null", f"compress={chain}", *PERF]
            run.train(compose_cfg("train", overrides, root / f"{i}_tiny_gpt2_austen_{chain}"))
            assert read_result(root / f"{i}_tiny_gpt2_austen_{chain}")["status"] == "ok"
    finally:
        torch.set_num_threads(threads)
    return root


def _summary_ok(figure: dict) -> None:
    assert set(figure) == {"median", "ci95", "coverage"}
    lo, hi = figure["ci95"]
    assert 0 < lo <= figure["median"] <= hi


def test_the_median_interval_is_the_order_statistic_one():
    # n = 10: P(Bin(10, ½) ≤ 1) = 11/1024, so [x_(2), x_(9)] covers 1 − 22/1024 ≥ 95 %; [x_(3), x_(8)] does not.
    lo, hi, covered = side_by_side.median_interval([9.0, 1, 8, 2, 7, 3, 6, 4, 5, 10])
    assert (lo, hi) == (2, 9) and covered == pytest.approx(1 - 22 / 1024)
    # Fewer than 6 rounds cannot reach 95 %: the range, with what it covers.
    assert side_by_side.median_interval([3.0, 1, 2, 5, 4]) == (1, 5, pytest.approx(1 - 2 / 32))
    assert side_by_side.median_interval([2.0]) == (2.0, 2.0, 0.0)
    assert side_by_side.summary([1.0, 3.0, 2.0])["median"] == 2.0


def test_a_sweep_measured_side_by_side_feeds_the_report(sweep, capsys):
    # Before: the report says its latency figures were taken cell by cell.
    before = report.build([sweep], draw=False).markdown.read_text()
    assert "measured separately, cell by cell" in before and "side by side in" not in before

    assert main([str(sweep), *QUICK]) == 0
    assert "2 rows, 1 model × task groups, 3 rounds" in capsys.readouterr().out
    data = json.loads((sweep / side_by_side.FILE).read_text())
    assert {"baseline", "rounds", "threads", "machine", "groups", "rows", "ci"} <= set(data)
    assert data["baseline"] == "none" and data["rounds"] == 3 and data["threads"] == torch.get_num_threads()
    assert data["machine"]["logical_cores"] == os.cpu_count()
    (group,) = data["groups"]
    assert (group["model"], group["task"], group["baseline"], group["rows"]) == ("tiny_gpt2", "austen", "none",
                                                                                ["none", "int8wo"])
    assert group["batch_sizes"] == [1, 2] and group["decode"]["batch_sizes"] == [1] and group["resident"]
    rows = {r["name"]: r for r in data["rows"]}
    assert set(rows) == {"none", "int8wo"}
    for name, row in rows.items():
        assert row["runs"] == [row["measured"]] and Path(row["measured"]).name.endswith(name)
        assert set(row["latency_ms"]) == {"batch_1", "batch_2"} and set(row["decode_tokens_per_s"]) == {"batch_1"}
        assert set(row["ratio_to_baseline"]) == {"latency_batch_1", "latency_batch_2", "decode_batch_1"}
        for figure in [*row["latency_ms"].values(), *row["decode_tokens_per_s"].values(),
                       *row["ratio_to_baseline"].values()]:
            _summary_ok(figure)
        assert all(len(v) == 3 for v in row["per_round"].values())
    # The baseline against itself, round by round: exactly 1.
    assert all(r == {"median": 1.0, "ci95": [1.0, 1.0], "coverage": 0.75}
               for r in rows["none"]["ratio_to_baseline"].values())
    # A ratio is the median of the rounds' paired ratios, not the ratio of the medians.
    paired = sorted(a / b for a, b in zip(rows["int8wo"]["per_round"]["latency_batch_1"],
                                          rows["none"]["per_round"]["latency_batch_1"]))
    assert rows["int8wo"]["ratio_to_baseline"]["latency_batch_1"]["median"] == pytest.approx(paired[1])

    # The report uses these figures and says so above the table.
    built = report.build([sweep], draw=False)
    text = built.markdown.read_text()
    assert "Latency/decode measured side by side in 3 interleaved rounds" in text
    assert "ratio to `none` with 95 % CI" in text and "measured separately" not in text
    table = {r["label"]: r for r in built.groups[0].rows}
    assert table["int8wo"]["latency_ms_mean"] == rows["int8wo"]["latency_ms"]["batch_1"]["median"]
    assert table["int8wo"]["latency_ms_delta_pct"] == pytest.approx(
        (rows["int8wo"]["ratio_to_baseline"]["latency_batch_1"]["median"] - 1) * 100)
    decode = rows["none"]["decode_tokens_per_s"]["batch_1"]["median"]
    assert table["none"]["decode_tokens_per_s.cpu.batch_1_mean"] == decode


def test_run_directories_are_rows_and_can_be_loaded_one_at_a_time(sweep, tmp_path):
    # A copy of a run beside its original (the identity check of benchmarks/side_by_side_identity.py),
    # each model loaded before its turn.
    original = sweep / "0_tiny_gpt2_austen_none"
    shutil.copytree(original, tmp_path / "copy")
    out = tmp_path / "out.json"
    document = side_by_side.side_by_side([original, tmp_path / "copy"], baseline=original.name,
                                         explicit_baseline=True, rounds=2, repeats=1, warmup=0,
                                         decode_batch_sizes=[], resident=False)
    side_by_side.write(document, out)
    (group,) = document["groups"]
    assert group["rows"] == [original.name, "copy"] and group["baseline"] == original.name
    assert not group["resident"] and group["decode"] is None
    copy = document["rows"][1]
    assert copy["runs"] == [str((tmp_path / "copy").resolve())] and copy["decode_tokens_per_s"] == {}
    assert set(copy["ratio_to_baseline"]) == {"latency_batch_1", "latency_batch_2"}
    assert json.loads(out.read_text())["rows"][1]["name"] == "copy"



def test_a_row_recorded_before_its_targets_moved_still_builds_its_data(sweep, tmp_path):
    # A cell written when its task classes lived in squeeze.data / squeeze.modules and the CSV logger and the
    # checkpoint callback in squeeze.resume: its test inputs are built from its record as today's (squeeze.record).
    old = tmp_path / "old"
    shutil.copytree(sweep / "0_tiny_gpt2_austen_none", old)
    record = json.loads((old / "result.json").read_text())
    config = record["config"]
    config["task"]["data"]["_target_"] = "squeeze.data.LanguageModelingData"
    config["task"]["module"]["_target_"] = "squeeze.modules.CausalLM"
    config["scheduler"]["_target_"] = "squeeze.modules.linear_warmup_decay"
    config["logger"]["csv"]["_target_"] = "squeeze.resume.CSVLogger"
    config["callbacks"]["resume"]["_target_"] = "squeeze.resume.ResumeCheckpoint"
    (old / "result.json").write_text(json.dumps(record))
    document = side_by_side.side_by_side([old], baseline=old.name, explicit_baseline=True, rounds=1, repeats=1,
                                         warmup=0, decode_batch_sizes=[], resident=False)
    (row,) = document["rows"]
    assert row["name"] == "old" and set(row["latency_ms"]) == {"batch_1", "batch_2"}

def test_the_command_line_writes_the_file(sweep, tmp_path):
    out = tmp_path / "cli.json"
    done = subprocess.run([sys.executable, "-m", "squeeze.measure", str(sweep), *QUICK, "--rounds", "1",
                           "--batch-sizes", "1", "--decode-batch-sizes", "", "--threads", "1", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["threads"] == 1 and data["rounds"] == 1
    assert [set(r["latency_ms"]) for r in data["rows"]] == [{"batch_1"}, {"batch_1"}]
    assert f"side by side: {out}" in done.stdout


def test_models_stay_loaded_only_when_they_fit_comfortably(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "weights").write_bytes(b"\0" * 1000)
    rows = [side_by_side.Row(n, "none", tmp_path, [tmp_path], {"params": p}) for n, p in (("a", 10), ("b", 500))]
    assert side_by_side.estimated_bytes(rows[0]) == 1000 and side_by_side.estimated_bytes(rows[1]) == 2000
    assert side_by_side.keep_loaded(rows, 6000)
    assert not side_by_side.keep_loaded(rows, 5999)
    assert not side_by_side.keep_loaded(rows, None)


def test_bad_input_is_one_line(sweep, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SqueezeError, match="no result.json under"):
        side_by_side.lineups([tmp_path / "empty"])
    failed = tmp_path / "failed" / "0"
    failed.mkdir(parents=True)
    record = read_result(sweep / "0_tiny_gpt2_austen_none")
    (failed / "result.json").write_text(json.dumps({**record, "status": "failed", "error": "RuntimeError: boom"}))
    with pytest.raises(SqueezeError, match=r"no finished run with a saved model under .*\(1 records: failed\)"):
        side_by_side.lineups([failed.parent])
    assert main([str(sweep), "--baseline", "fp16", *QUICK]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --baseline fp16 names no row (rows: none, int8wo); pass one of those names or a chain"]
    with pytest.raises(SqueezeError, match="--rounds 0"):
        side_by_side.side_by_side([sweep], rounds=0)
