"""W&B runs that can be sliced: a run's config, name (its report row's label), tags, summaries and files; the stored
baseline logged once as itself; the report run in its cells' group, linking rows to runs. All offline: the
assertions read the offline run's record log (<run dir>/wandb/offline-run-*/run-<id>.wandb). This wandb (0.31,
wandb-core) writes files/config.yaml and files/wandb-summary.json only when it syncs, so the log is what there is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf, open_dict

from conftest import compose_cfg, fast, read_result, run_cli
from squeeze import report
from squeeze.run import loggers

BLOCK = 32768  # the record log is LevelDB's log format: 32 KiB blocks of records with a 7-byte header


def wandb_log(path: Path) -> dict:
    """What an offline run logged: its run record (name, group, tags, job type), config and summary (the latest
    value of each key), exit code, saved files and artifacts, read from its .wandb record log."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    records, chunk, pos = [], b"", 7
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            records.append(pb.Record.FromString(chunk))
            chunk = b""
    out: dict = {"config": {}, "summary": {}, "files": [], "artifacts": [], "exit": None}

    def items(updates):
        return {(u.key or "/".join(u.nested_key)): json.loads(u.value_json) for u in updates}

    for r in records:
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out["run"] = r.run
            out["config"].update(items(r.run.config.update))
        elif kind == "config":
            out["config"].update(items(r.config.update))
        elif kind == "summary":
            out["summary"].update(items(r.summary.update))
        elif kind == "files":
            out["files"] += [f.path for f in r.files.files]
        elif kind == "artifact":
            out["artifacts"].append(r.artifact)
        elif kind == "exit":
            out["exit"] = r.exit.exit_code
    return out


def offline_run(run_dir: Path) -> tuple[Path, dict]:
    """The one W&B run a squeeze run directory holds: its directory and what it logged."""
    [run] = (Path(run_dir) / "wandb").glob("offline-run-*")
    [log] = run.glob("run-*.wandb")
    return run, wandb_log(log)


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    home = tmp_path / "wandb_home"  # W&B's own config, cache and artifact staging, away from the user's
    return {"WANDB_MODE": "offline", "WANDB_CONFIG_DIR": str(home / "config"), "WANDB_CACHE_DIR": str(home / "cache"),
            "WANDB_DATA_DIR": str(home / "data")}


def test_a_sweep_cell_is_its_report_row_with_its_config_and_figures(tmp_path, wandb_env):
    sweep, store = tmp_path / "sweep", tmp_path / "store"
    # One epoch of 4 steps, so that fit validates (once, at its end).
    overrides = [a for a in fast("austen") if a != "logger=csv" and not a.startswith("task.data.max_examples.train=")]
    done = run_cli("train.py", ["-m", "model=tiny_gpt2", "task=austen", "compress=none,imp", "compress.imp.target=0.5",
                                "logger=wandb", "logger.wandb.log_model=true", "trainer.max_steps=4",
                                "task.data.max_examples.train=32",
                                "perf.decode_batch_sizes=[]", *overrides, f"hydra.sweep.dir={sweep}",
                                f"baseline.store_dir={store}"], cwd=tmp_path, env=wandb_env)
    assert done.returncode == 0, done.stderr[-3000:]
    none_dir, imp_dir = sorted(sweep.glob("*_tiny_gpt2_austen_*"))
    cells = {Path(c["run_dir"]).name: c for c in report.build([sweep], tmp_path / "report", draw=False).cells}

    imp = read_result(imp_dir)
    run, logged = offline_run(imp_dir)
    # The name is the report's row label: imp's target is the same in every imp cell, so the row is plain `imp`
    # (a single run would say `imp target=0.5`).
    assert logged["run"].display_name == cells[imp_dir.name]["row"] == "imp"
    # Not a config value: a sweep rerun with one more setting renames cells but must still find them finished.
    assert imp["config"]["logger"]["wandb"]["name"] is None
    assert logged["run"].run_group == f"sweep-{sweep.name}" and logged["run"].job_type == "train"
    assert {"row:imp", "compress:imp", "model:tiny_gpt2", "task:austen", "hardware:cpu"} <= set(logged["run"].tags)
    config = logged["config"]
    assert len(config) >= 20
    assert config["compress.imp.target"] == 0.5 and config["compress.imp.schedule"] == "cubic"
    assert (config["model.name"], config["task.name"], config["seed"]) == ("tiny_gpt2", "austen", 42)
    assert config["optimizer.lr"] == 5e-5
    assert config["task.data.protocol"] == imp["config"]["task"]["data"]["protocol"]
    assert config["trainer.max_steps"] == 4 and config["choices/hardware"] == "cpu"
    assert config["squeeze/git_commit"] == imp["git_commit"] and config["squeeze/version"]
    summary = logged["summary"]
    assert summary["status"] == "ok" and "error" not in summary
    assert set(summary["val/perplexity"]) == {"min"}  # the monitored metric's best (task.monitor_mode), not its last
    assert summary["result/validation_best"] == pytest.approx(imp["validation"]["best"])
    assert summary["test/perplexity"] == pytest.approx(imp["metrics"]["test/perplexity"])
    assert summary["result/checkpoint_bytes"] == imp["checkpoint_bytes"]
    assert summary["result/sparsity"] == pytest.approx(imp["sparsity"]) == pytest.approx(0.5)
    assert summary["perf/latency_batch_1_ms"] == pytest.approx(imp["perf"]["latency"]["batch_1"]["median_s"] * 1000)
    assert summary["cost/own_seconds"] == pytest.approx(imp["cost"]["own"]["seconds"])
    assert summary["cost/total_kwh"] == pytest.approx(imp["cost"]["total"]["kwh"])
    assert summary["energy/kwh"] == pytest.approx(imp["energy"]["kwh"])
    assert summary["energy/method"] == imp["energy"]["method"]
    assert "result.json" in logged["files"]
    assert json.loads((run / "files" / "result.json").read_text())["status"] == "ok"
    [model] = logged["artifacts"]  # logger.wandb.log_model=true: the saved model directory
    assert model.type == "model" and "config.json" in {c.path for c in model.manifest.contents}
    assert logged["exit"] == 0
    assert not (tmp_path / "wandb").exists()  # W&B's directory is inside each run's, not in the cwd

    # The baseline cell is on the stored baseline: its run is the `none` row; the store entry's training is logged
    # once, in the entry, as itself, not as the cell that triggered it.
    _, none_logged = offline_run(none_dir)
    assert none_logged["run"].display_name == cells[none_dir.name]["row"] == "none"
    assert "row:none" in none_logged["run"].tags
    [entry] = [d for d in store.iterdir() if d.is_dir()]
    key = read_result(none_dir)["baseline"]["key"]
    _, stored = offline_run(entry)
    assert stored["run"].display_name == f"tiny_gpt2-austen baseline {key}"
    assert (stored["run"].run_group, stored["run"].job_type) == ("baselines", "baseline")
    assert {"baseline", "compress:none", "model:tiny_gpt2"} <= set(stored["run"].tags)
    assert not [t for t in stored["run"].tags if t.startswith("row:") or t == "compress:imp"]
    assert "compress.none" in stored["config"] and not any(k.startswith("compress.imp") for k in stored["config"])
    assert stored["summary"]["val/perplexity"]["min"] == pytest.approx(read_result(entry)["validation"]["best"])

    # The report run joins the cells' group; its tables link each row to its cells' W&B runs.
    wb = tmp_path / "wb"
    wb.mkdir()
    env = {**os.environ, **wandb_env, "WANDB_DIR": str(wb)}
    done = subprocess.run([sys.executable, "-m", "squeeze.report", str(sweep), "--out", str(tmp_path / "out"),
                           "--wandb"], cwd=tmp_path, capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    [report_run] = (wb / "wandb").glob("offline-run-*")
    [report_log] = report_run.glob("run-*.wandb")
    assert wandb_log(report_log)["run"].run_group == logged["run"].run_group
    [table] = (report_run / "files" / "media" / "table" / "report").glob("tiny_gpt2-austen_*.table.json")
    rows = json.loads(table.read_text())
    links = {r[rows["columns"].index("label")]: r[rows["columns"].index("wandb_runs")] for r in rows["data"]}
    assert links == {"none": str(offline_run(none_dir)[0]), "imp": str(run)}


def _sweep_cell(tmp_path: Path, cell: list[str], sweep_args: list[str]):
    """A sweep cell's composed config: the cell's own overrides, and the sweep's command line in its multirun.yaml."""
    cfg = compose_cfg("train", ["logger=wandb", "model=tiny_bert", *cell], tmp_path / "cell")
    sweep = tmp_path / "multirun" / "2026-11-23_10-00-00"
    sweep.mkdir(parents=True, exist_ok=True)
    sweeper = {"params": None, "rows": None, "setups": None}
    OmegaConf.save({"hydra": {"overrides": {"task": sweep_args}, "sweeper": sweeper}, "compress": {"none": None}},
                   sweep / "multirun.yaml")
    OmegaConf.set_readonly(cfg.hydra, False)  # HydraConfig froze it; pretend to be that sweep's cell
    with open_dict(cfg):
        cfg.hydra.mode = RunMode.MULTIRUN
        cfg.hydra.sweep.dir = str(sweep)
        cfg.hydra.overrides.task = ["logger=wandb", "model=tiny_bert", *cell]
    HydraConfig.instance().set_config(cfg)
    return cfg


def test_the_run_name_is_its_rows_label_the_settings_that_tell_the_sweeps_cells_apart(tmp_path):
    # The name the logger gives a run (squeeze.run.loggers.wandb_logger without logger.wandb.name).
    cfg = compose_cfg("train", ["logger=wandb", "compress=imp", "compress.imp.target=0.3"], tmp_path / "single")
    assert loggers.row_label(cfg.compress) == "imp target=0.3"  # a single run: the settings its command line gives

    args = ["logger=wandb", "model=tiny_bert", "compress=none,imp", "compress.imp.target=0.3,0.5"]
    cell = _sweep_cell(tmp_path, ["compress=imp", "compress.imp.target=0.3"], args)
    assert loggers.row_label(cell.compress) == "imp target=0.3"  # the target tells the two imp cells apart
    cell = _sweep_cell(tmp_path, ["compress=imp", "compress.imp.target=0.3"], [*args[:3], "compress.imp.target=0.3"])
    assert loggers.row_label(cell.compress) == "imp"  # one imp cell: the chain is the row
    cell = _sweep_cell(tmp_path, ["compress=none"], args)
    assert loggers.row_label(cell.compress) == "none"
    cell = _sweep_cell(tmp_path, ["compress=imp", "compress.imp.target=0.3", "compress.imp.label=AH30"],
                       [*args, "compress.imp.label=AH30,AH50"])
    assert loggers.row_label(cell.compress) == "AH30"  # a label names the row
    cell = _sweep_cell(tmp_path, ["compress=imp", "hardware=cpu"], [*args[:3], "hardware=cpu,gpu"])
    assert loggers.row_label(cell.compress) == "imp @ cpu"  # a model × task on several hardware: rows per hardware


def test_a_failed_run_logs_its_error_line_and_record(tmp_path, wandb_env):
    run_dir = tmp_path / "run"
    overrides = [a for a in fast("rotten_tomatoes") if a != "logger=csv"]
    done = run_cli("train.py", ["model=tiny_bert", "task=rotten_tomatoes", "logger=wandb", *overrides,
                                f"ckpt_path={tmp_path / 'missing' / 'last.ckpt'}", f"hydra.run.dir={run_dir}"],
                   cwd=tmp_path, env=wandb_env)
    assert done.returncode == 2, done.stderr[-3000:]
    record = read_result(run_dir)
    assert record["status"] == "failed" and "does not exist" in record["error"]
    run, logged = offline_run(run_dir)
    assert logged["summary"]["status"] == "failed" and logged["summary"]["error"] == record["error"]
    assert logged["exit"] == 1 and logged["config"]["model.name"] == "tiny_bert"
    assert logged["run"].display_name == "none" and "row:none" in logged["run"].tags
    assert json.loads((run / "files" / "result.json").read_text())["error"] == record["error"]
