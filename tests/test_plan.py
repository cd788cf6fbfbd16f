"""`python -m squeeze.plan`: the cells a sweep would run, in the sweeper's own order and directories, what a sweep
directory already holds of them, their use of the baseline store, and the sweep's own one-line errors."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig

from squeeze.run import plan as planner
from squeeze.config import lenient_settings

from conftest import CONF, ROOT, fast, read_result, run_cli


def _swept(args: list[str]) -> list[tuple[int, str, list[str]]]:
    """What the real sweep hands its jobs: Hydra's multirun with squeeze's sweeper and Hydra's basic launcher, whose
    task function records each job's number, directory and overrides instead of training."""
    seen = []

    def record(cfg) -> None:
        hydra = HydraConfig.get()
        seen.append((int(hydra.job.num), str(hydra.runtime.output_dir), list(hydra.overrides.task)))

    handlers, level = logging.root.handlers[:], logging.root.level  # the launcher configures job logging
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF), job_name="train", version_base="1.3"):
            GlobalHydra.instance().hydra.multirun(config_name="train", task_function=record,
                                                  overrides=[*lenient_settings(args), "hydra.mode=MULTIRUN"],
                                                  with_log_configuration=False)
    finally:
        logging.root.handlers[:], logging.root.level = handlers, level
    return seen


def _planned(p) -> list[tuple[int, str, list[str]]]:
    return [(c.num, c.dir, c.overrides) for c in p.cells]


def test_a_presets_plan_is_the_sweepers_cells_in_order_with_their_rows_and_store_use(tmp_path):
    args = ["experiment=gpt2_compression_offline", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    p = planner.plan(args)
    assert _planned(p) == _swept(args)  # cell for cell: number, directory, overrides
    assert [c.row for c in p.cells] == ["none", "8b", "4b", "Distil", "AH67", "Distil+67", "Distil+8b", "Distil+4b",
                                        "AH67+8b", "AH67+4b", "Distil+67+8b", "Distil+67+4b"]
    assert {(c.model, c.task) for c in p.cells} == {("smollm2", "austen")}
    assert [c.chain for c in p.cells][:5] == ["none", "int8wo", "int4wo", "kd", "heads"]
    assert Path(p.cells[10].dir).name == "10_smollm2_austen_kd+heads+int8wo"
    # The sweeper made each cell's directory (its .hydra/), no cell ran: none is finished.
    assert {(c.status, c.action) for c in p.cells} == {("not started", "run")}
    # Chains that train nothing start from the stored fine-tuned model; Distil rows distil from it; heads prune
    # before fine-tuning, so they fine-tune their own. One entry for all: one model × task × training setting.
    assert [c.baseline for c in p.cells] == ["start", "start", "start", "teacher", None, "teacher", "teacher",
                                             "teacher", None, None, "teacher", "teacher"]
    entries = {e["dir"]: e["ready"] for c in p.cells for e in c.stored}
    assert len(entries) == 1 and not any(entries.values())

    args = ["experiment=pruning_rates_offline", f"hydra.sweep.dir={tmp_path / 'rates'}"]
    p = planner.plan(args)
    assert _planned(p) == _swept(args)
    assert [c.row for c in p.cells] == ["none", "pr-0.1", "pr-0.3", "pr-0.5"]


def test_settings_of_a_compressor_reach_only_its_cells_and_repeat_none(tmp_path, capsys):
    args = ["model=tiny_bert", "compress=none,imp", "compress.imp.target=0.3,0.5", f"hydra.sweep.dir={tmp_path}"]
    p = planner.plan(args)
    assert _planned(p) == _swept(args)
    assert [(c.chain, c.row, c.baseline) for c in p.cells] == [
        ("none", "none", "start"), ("imp", "imp target=0.3", None), ("imp", "imp target=0.5", None)]
    assert p.notes == ["compress.imp.target applies to cells 1-2 (their chain has imp), not to cells 0 (none)"]
    capsys.readouterr()  # the launcher's log lines
    assert planner.main([*args, "--json"]) == 0
    cells = json.loads(capsys.readouterr().out)
    assert [c["overrides"] for c in cells] == [["model=tiny_bert", "compress=none"],
                                               ["model=tiny_bert", "compress=imp", "++compress.imp.target=0.3"],
                                               ["model=tiny_bert", "compress=imp", "++compress.imp.target=0.5"]]
    assert planner.main(args) == 0
    text = capsys.readouterr().out
    assert "3 cells: 0 finished, 0 failed, 0 interrupted, 3 not started; 3 to run" in text
    assert "imp target=0.5" in text and "compress.imp.target=0.5" in text  # the row, and the setting as given


def test_a_sweep_directory_tells_finished_cells_from_changed_ones_and_the_store_from_a_fresh_one(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["model=tiny_bert", "task=rotten_tomatoes", "compress=none,int8wo", "trainer.max_steps=2",
            *fast("rotten_tomatoes"), "perf=null", f"hydra.sweep.dir={sweep}"]
    done = run_cli("train.py", ["-m", *args], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    stored = read_result(sweep / "1_tiny_bert_rotten_tomatoes_int8wo")["baseline"]["dir"]

    p = planner.plan(args)  # the same sweep again: both cells are skipped, nothing uses the store
    assert [(c.status, c.action, c.baseline) for c in p.cells] == [("finished", "skip", None)] * 2
    p = planner.plan([*args, "compress.int8wo.embeddings=false"])  # cell 1 changed: runs afresh, its old run aside
    assert [(c.status, c.action) for c in p.cells] == [("finished", "skip"), ("not started", "replace")]
    assert (p.cells[1].baseline, p.cells[1].stored) == ("start", [{"dir": stored, "ready": True}])
    fresh = planner.plan([*args[:-1], f"hydra.sweep.dir={tmp_path / 'fresh'}"])  # another sweep, the same store
    assert [(c.status, c.baseline, c.stored) for c in fresh.cells] == [
        ("not started", "start", [{"dir": stored, "ready": True}])] * 2

    # What a killed or failed cell left: judged as the rerun judges it.
    record_file = sweep / "0_tiny_bert_rotten_tomatoes_none" / "result.json"
    record = json.loads(record_file.read_text())
    record_file.write_text(json.dumps({**record, "status": "running"}))
    first = planner.plan(args).cells[0]
    assert (first.status, first.action) == ("interrupted", "resume")
    record_file.write_text(json.dumps({**record, "status": "failed"}))
    first = planner.plan(args).cells[0]
    assert (first.status, first.action) == ("failed", "skip")
    assert planner.plan([*args, "rerun_failed=true"]).cells[0].action == "rerun"


def test_a_bad_sweep_stops_with_the_sweeps_own_line_and_exit_2(tmp_path, capsys):
    args = ["model=tiny_bert", "compress=none", "compress.imp.target=0.3", f"hydra.sweep.dir={tmp_path}"]
    planned = subprocess.run([sys.executable, "-m", "squeeze.plan", *args], cwd=ROOT, capture_output=True, text=True,
                             timeout=120)
    swept = run_cli("train.py", ["-m", *args], cwd=tmp_path)
    assert (planned.returncode, swept.returncode) == (2, 2)
    assert planned.stdout == "" and len(planned.stderr.splitlines()) == 1
    assert planned.stderr.startswith("error: compress.imp.target: no cell of this sweep uses imp")
    assert planned.stderr.strip() in swept.stderr.splitlines()  # the very line the sweep stops with

    assert planner.main(["model=tiny_bert,nope", f"hydra.sweep.dir={tmp_path}"]) == 2  # a swept value Hydra refuses
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and err.startswith("error: In 'train': Could not find 'model/nope'")
