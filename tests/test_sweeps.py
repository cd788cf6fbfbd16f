"""The CLI as a user runs it: sweeps (a failing cell included), the submitit launcher and W&B offline (DDP on
two CPU processes: test_scale.py). Every test starts `train.py` as a subprocess in its own tmp directory."""

from __future__ import annotations

import netrc
from pathlib import Path

import pytest
from conftest import compose_cfg, fast, read_result, run_cli
from hydra.core.hydra_config import HydraConfig

from squeeze.run import loggers

TEST_METRICS = {
    "rotten_tomatoes": {"test/accuracy", "test/f1", "test/precision", "test/recall", "test/loss"},
    "austen": {"test/perplexity", "test/loss"},
}


def _ok(proc) -> None:
    """Exit code 0, or a failure message that shows what the CLI said."""
    assert proc.returncode == 0, (f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                                  f"\n--- stderr\n{proc.stderr[-6000:]}")


def _cells(sweep_dir: Path) -> dict[tuple[str, str], dict]:
    """{(model, task): result.json} for every cell directory of a sweep."""
    dirs = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    out = {}
    for d in dirs:
        assert (d / "result.json").is_file(), f"cell {d.name} has no result.json: {sorted(x.name for x in d.iterdir())}"
        record = read_result(d)
        key = (record["choices"]["model"], record["choices"]["task"])
        assert key not in out, f"two cells for {key}"
        assert Path(record["run_dir"]).resolve() == d.resolve()
        out[key] = record
    return out


def _assert_ok_cell(record: dict, task: str) -> None:
    assert record["status"] == "ok", record["error"]
    assert record["error"] is None
    assert set(record["metrics"]) == TEST_METRICS[task]
    assert all(isinstance(v, float) for v in record["metrics"].values())
    assert (Path(record["run_dir"]) / "model" / "config.json").is_file()


# -- 1. a sweep records every cell, a failing one included ------------------------------------------
def test_sweep_records_every_cell_and_survives_a_failing_one(tmp_path):
    # Only overrides every cell accepts: fast("rotten_tomatoes") holds no LM-only keys (a
    # task.data.block_size would be an unknown argument for the classification data), so the LM cell
    # keeps austen's own block_size (256); the first 64/32/32 lines of the novels give enough tokens.
    sweep_dir = tmp_path / "multirun" / "sweep"
    proc = run_cli("train.py", ["-m", "model=tiny_bert,tiny_gpt2", "task=rotten_tomatoes,austen",
                                *fast("rotten_tomatoes"), "+trainer.fast_dev_run=true",
                                f"hydra.sweep.dir={sweep_dir}"], cwd=tmp_path, timeout=300)
    _ok(proc)

    assert (sweep_dir / "multirun.yaml").is_file()
    cells = _cells(sweep_dir)
    assert set(cells) == {(m, t) for m in ("tiny_bert", "tiny_gpt2") for t in ("rotten_tomatoes", "austen")}
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith(".")) == [
        "0_tiny_bert_rotten_tomatoes_none", "1_tiny_bert_austen_none",
        "2_tiny_gpt2_rotten_tomatoes_none", "3_tiny_gpt2_austen_none",
    ]

    # The encoder × LM cell fails fast (before data or weights), with the reason, and is recorded.
    failed = cells[("tiny_bert", "austen")]
    assert failed["status"] == "failed"
    assert "causal_lm" in failed["error"] and "encoder" in failed["error"]
    assert failed["error"].startswith("SqueezeError: ")
    assert failed["metrics"] == {} and failed["train_seconds"] is None
    assert not (Path(failed["run_dir"]) / "model").exists()
    assert "cell failed" in proc.stderr + proc.stdout

    for (model, task), record in cells.items():
        if (model, task) != ("tiny_bert", "austen"):
            _assert_ok_cell(record, task)
    lm = cells[("tiny_gpt2", "austen")]
    assert lm["perplexity"]["protocol"] == "blocks" and lm["perplexity"]["scored_tokens"] > 0


# -- 2. the same through hydra-submitit-launcher's local executor ------------------------------------
@pytest.mark.slow  # the suite's time budget: test_scale's cluster launcher goes through the same submitit plugin
def test_sweep_through_submitit_local_launcher(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="hydra-submitit-launcher is not installed")
    sweep_dir = tmp_path / "multirun" / "submitit"
    proc = run_cli("train.py", ["-m", "hydra/launcher=local_parallel", "model=tiny_bert,tiny_gpt2",
                                "task=rotten_tomatoes", *fast("rotten_tomatoes"), "+trainer.fast_dev_run=true",
                                f"hydra.sweep.dir={sweep_dir}"], cwd=tmp_path, timeout=300)
    _ok(proc)
    assert "Submitit 'local' sweep output dir" in proc.stdout + proc.stderr  # really went through submitit
    assert (sweep_dir / ".submitit").is_dir()
    cells = _cells(sweep_dir)
    assert set(cells) == {("tiny_bert", "rotten_tomatoes"), ("tiny_gpt2", "rotten_tomatoes")}
    for record in cells.values():
        _assert_ok_cell(record, "rotten_tomatoes")


# -- 3. DDP over two CPU processes (gloo) -------------------------------------------------------------
# Loaded by every Python process of the run (PYTHONPATH, inherited by Lightning's rank processes):
# notes which rank renames result.json or the model directory into place, the last step of each write.
# -- 4. W&B without a key: offline, inside the run directory ------------------------------------------
@pytest.mark.slow  # the suite's time budget: test_wandb's sweep cell covers offline runs in the cell's directory
def test_wandb_offline_leaves_a_run_directory_with_the_logged_metric(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)  # run_cli passes os.environ on
    wandb_home = tmp_path / "wandb_home"  # W&B's own config/cache, away from the user's
    env = {"WANDB_MODE": "offline", "WANDB_CONFIG_DIR": str(wandb_home / "config"),
           "WANDB_CACHE_DIR": str(wandb_home / "cache"), "WANDB_DATA_DIR": str(wandb_home / "data")}
    run_dir = tmp_path / "run"
    overrides = [arg for arg in fast("rotten_tomatoes") if not arg.startswith("logger=")]
    proc = run_cli("train.py", ["model=tiny_bert", "task=rotten_tomatoes", *overrides, "logger=wandb",
                                "trainer.max_steps=2", f"hydra.run.dir={run_dir}"],
                   cwd=tmp_path, timeout=300, env=env)
    _ok(proc)
    record = read_result(run_dir)
    _assert_ok_cell(record, "rotten_tomatoes")

    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and runs[0].is_dir(), sorted(p.name for p in (run_dir / "wandb").iterdir())
    assert not (tmp_path / "wandb").exists()  # not in the cwd: inside the run's own directory
    logs = list(runs[0].glob("*.wandb"))
    assert len(logs) == 1
    raw = logs[0].read_bytes()  # the binary protobuf record log; metric names are plain UTF-8 in it
    for name in ("train/loss", "test/accuracy", "perf/latency_batch_1_ms", "energy/kwh", "result/params"):
        assert name.encode() in raw, f"{name} not in {logs[0]}"


@pytest.fixture
def no_netrc(monkeypatch):
    def missing(*args, **kwargs):
        raise FileNotFoundError("no ~/.netrc")

    monkeypatch.setattr(loggers.netrc, "netrc", missing)


def test_wandb_logger_goes_offline_without_a_key(tmp_path, monkeypatch, no_netrc):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)  # the decision must come from the missing key
    assert loggers.wandb_has_key() is False
    logger = loggers.wandb_logger(project="squeeze", save_dir=str(tmp_path / "out"), group="g", tags=["a", ""])
    assert logger._offline is True
    assert Path(logger.save_dir) == tmp_path / "out" and (tmp_path / "out").is_dir()
    assert logger._wandb_init["tags"] == ["a"] and logger._wandb_init["group"] == "g"


def test_wandb_logger_netrc_without_wandb_entry_is_no_key(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    rc = tmp_path / "netrc"
    rc.write_text("machine example.com login me password secret\n")
    rc.chmod(0o600)
    real_netrc = netrc.netrc
    monkeypatch.setattr(loggers.netrc, "netrc", lambda file=None: real_netrc(str(rc)))
    assert loggers.wandb_has_key() is False
    assert loggers.wandb_logger(project="squeeze", save_dir=str(tmp_path / "out"))._offline is True


def test_wandb_has_key_with_api_key_in_environment(monkeypatch, no_netrc):
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    assert loggers.wandb_has_key() is True


def test_ddp_inside_a_local_sweep_fails_fast_with_the_reason(tmp_path):
    done = run_cli("train.py", ["-m", "model=tiny_bert", "task=rotten_tomatoes", *fast("rotten_tomatoes"),
                                "hardware=ddp", "trainer.accelerator=cpu", f"hydra.sweep.dir={tmp_path}/sweep"],
                   cwd=tmp_path)
    assert done.returncode == 0  # the sweep itself goes on
    [record] = [read_result(p.parent) for p in (tmp_path / "sweep").rglob("result.json")]
    assert record["status"] == "failed" and "hydra/launcher=cluster" in record["error"]


def test_wandb_runs_are_grouped_by_sweep_and_tagged_by_choice(tmp_path):
    from hydra.types import RunMode
    from omegaconf import OmegaConf, open_dict

    cfg = compose_cfg("train", ["logger=wandb", "compress=none", "model=tiny_bert"], tmp_path)
    assert cfg.logger.wandb.group == "tiny_bert-rotten_tomatoes"  # a single run
    assert list(cfg.logger.wandb.tags) == ["model:tiny_bert", "task:rotten_tomatoes", "compress:none", "hardware:cpu"]
    OmegaConf.set_readonly(cfg.hydra, False)  # HydraConfig froze it; pretend to be a sweep's cell
    with open_dict(cfg):
        cfg.hydra.mode = RunMode.MULTIRUN
        cfg.hydra.sweep.dir = str(tmp_path / "multirun" / "2026-11-23_10-00-00")
    HydraConfig.instance().set_config(cfg)
    assert cfg.logger.wandb.group == "sweep-2026-11-23_10-00-00"
