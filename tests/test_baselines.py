"""The baseline store (squeeze/run/baselines.py): a model × task × training setting fine-tuned once, reused by
post-training cells and by `teacher=auto` distillation, trained once even when cells ask for it at once."""

import json
import threading
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from squeeze.run import baselines
from squeeze.errors import SqueezeError

from conftest import fast, read_result, run_cli


def _cfg(store: Path, lr: float = 1e-4, **extra):
    return OmegaConf.create({
        "model": {"name": "tiny_bert"}, "task": {"name": "rotten_tomatoes", "data": {"batch_size": 8}},
        "trainer": {"max_steps": 3}, "optimizer": {"lr": lr}, "scheduler": None, "seed": 1,
        "logger": {"csv": {"save_dir": "/runs/cell_7"}}, "perf": {"batch_sizes": [1]},
        "baseline": {"reuse": "multirun", "store_dir": str(store)}, **extra})


def _fake_train(calls: list, validation: dict | None = None, sleep: float = 0.0):
    """Stands in for the recipe fine-tuning a store entry (baselines._fine_tuner): writes a finished entry the way a run does."""
    def train(config, entry: Path):
        calls.append(entry)
        time.sleep(sleep)
        (entry / "model").mkdir(parents=True, exist_ok=True)
        best = (validation or {}).get(config.optimizer.lr, 0.5)
        record = {"status": "ok", "train_seconds": 2.0, "validation": {"best": best, "mode": "max"},
                  "config_seen": OmegaConf.to_container(config)}
        (entry / "result.json").write_text(json.dumps(record))
        return record
    return train


def test_the_key_follows_what_shapes_the_weights_not_paths_loggers_or_perf(tmp_path):
    run = Path("/runs/cell_7")
    key = baselines.key_of(baselines.baseline_config(_cfg(tmp_path), run))
    moved = _cfg(tmp_path, logger={"csv": {"save_dir": "/runs/cell_9"}}, perf=None)
    assert baselines.key_of(baselines.baseline_config(moved, Path("/runs/cell_9"))) == key
    assert baselines.key_of(baselines.baseline_config(_cfg(tmp_path, lr=3e-5), run)) != key
    with_compress = _cfg(tmp_path, compress={"dq": {"bits": 8}})
    config = baselines.baseline_config(with_compress, run)
    assert baselines.key_of(config) == key and config["compress"] == {"none": None}
    assert config["logger"]["csv"]["save_dir"] == baselines.RUN_PLACEHOLDER


def test_a_new_fine_tuning_version_is_a_new_key(tmp_path, monkeypatch):
    config = baselines.baseline_config(_cfg(tmp_path), Path("/runs/cell_7"))
    key = baselines.key_of(config)
    monkeypatch.setattr(baselines, "FINE_TUNING_VERSION", baselines.FINE_TUNING_VERSION + 1)
    assert baselines.key_of(config) != key  # an entry trained by older fine-tuning code is not reused


def test_cells_asking_at_once_train_the_baseline_once(tmp_path):
    calls, found = [], []
    train = _fake_train(calls, sleep=0.5)
    threads = [threading.Thread(target=lambda: found.append(baselines.obtain(_cfg(tmp_path), Path("/r"), train)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert len({b.dir for b in found}) == 1 and sorted(b.trained_here for b in found) == [False, False, True]
    # The entry was trained with its own directory where the cell's run directory stood.
    config_seen = found[0].record["config_seen"]
    assert config_seen["logger"]["csv"]["save_dir"] == "/runs/cell_7"  # not the cell's path (that was /r)
    again = baselines.obtain(_cfg(tmp_path), Path("/elsewhere"), train)
    assert len(calls) == 1 and not again.trained_here and again.dir == found[0].dir


def test_a_killed_or_failed_entry_is_trained_again_and_a_failure_is_named(tmp_path):
    calls = []
    entry = baselines.obtain(_cfg(tmp_path), Path("/r"), _fake_train(calls)).dir
    (entry / "result.json").write_text(json.dumps({"status": "running"}))  # killed mid-training
    assert baselines.ready(entry) is None
    baselines.obtain(_cfg(tmp_path), Path("/r"), _fake_train(calls))
    assert len(calls) == 2

    def failing(config, where):
        return {"status": "failed", "error": "ValueError: loss is nan"}
    with pytest.raises(SqueezeError, match="loss is nan.*rerun"):
        baselines.obtain(_cfg(tmp_path, lr=9.0), Path("/r"), failing)


def test_best_of_picks_the_best_validation_baseline_over_the_grid(tmp_path):
    calls = []
    train = _fake_train(calls, validation={1e-5: 0.61, 3e-5: 0.74, 5e-5: 0.70})
    best = baselines.best_of(_cfg(tmp_path), Path("/r"), train, {"optimizer.lr": [1e-5, 3e-5, 5e-5]})
    assert len(calls) == 3 and best.record["validation"]["best"] == 0.74
    with pytest.raises(SqueezeError, match="no key 'lrr'"):
        baselines.best_of(_cfg(tmp_path), Path("/r"), train, {"optimizer.lrr": [1e-5]})


def test_bad_reuse_setting_is_named():
    with pytest.raises(SqueezeError, match="baseline.reuse='sometimes'"):
        baselines.reuse_enabled(OmegaConf.create({"baseline": {"reuse": "sometimes"}}), multirun=True)


def test_one_sweep_fine_tunes_once_and_quantizes_and_distils_that_model(tmp_path):
    store = tmp_path / "store"
    done = run_cli("train.py", ["-m", "model=tiny_bert", "task=rotten_tomatoes", "compress=none,dq,kd,rows",
                                "compress.kd.teacher=auto", "compress.kd.student.layers=1", "trainer.max_steps=3",
                                *fast("rotten_tomatoes"), "perf=null", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                                f"baseline.store_dir={store}"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    none, dq, kd, rows = [read_result(d) for d in sorted((tmp_path / "sweep").glob("*_*/"))]
    assert [r["status"] for r in (none, dq, kd, rows)] == ["ok"] * 4
    # rows prunes before fine-tuning: it fine-tunes its own model, it does not start from the stored one.
    assert "baseline" not in rows and rows["compress"]["rows"]["params_after"] < rows["compress"]["rows"]["params_before"]
    entries = [d for d in store.iterdir() if d.is_dir()]
    assert len(entries) == 1  # fine-tuned once for the three cells
    entry = str(entries[0])
    assert none["baseline"]["dir"] == dq["baseline"]["dir"] == kd["baseline"]["dir"] == entry
    assert none["baseline"]["trained_here"] and not dq["baseline"]["trained_here"]
    assert kd["compress"]["kd"]["teacher"]["source"] == entry and kd["compress"]["kd"]["student"]["layers"] == 1
    # The baseline row is the stored model tested; dq is that same model quantized (smaller on disk).
    stored = read_result(entries[0])
    assert stored["compress"]["chain"] == [] and "metrics" in stored
    assert none["train_seconds"] == dq["train_seconds"] == stored["train_seconds"] > 0
    assert dq["spent"]["train_seconds"] == 0.0 and none["spent"]["train_seconds"] == stored["train_seconds"]
    assert dq["checkpoint_bytes"] < none["checkpoint_bytes"]
    assert (tmp_path / "sweep" / Path(none["run_dir"]).name / "model" / "config.json").exists()
    # Costs (squeeze/run/cost.py): dq's own cost is its quantization alone, its total adds the baseline's training; the
    # baseline row's own cost is the fine-tuning; rows trained its own model; kd started from its teacher.
    trained = stored["train_seconds"]
    assert dq["cost"]["own"]["seconds"] == pytest.approx(dq["compress_seconds"]) and dq["compress_seconds"] < trained
    assert dq["cost"]["total"]["seconds"] == pytest.approx(trained + dq["cost"]["own"]["seconds"])
    assert dq["cost"]["total"]["kwh"] > dq["cost"]["own"]["kwh"] > 0
    assert none["cost"]["own"] == none["cost"]["total"] and none["cost"]["own"]["seconds"] >= trained
    assert rows["cost"]["own"] == rows["cost"]["total"] and rows["cost"]["own"]["seconds"] >= rows["train_seconds"]
    assert kd["cost"]["total"]["seconds"] == pytest.approx(kd["cost"]["own"]["seconds"] + trained)
    assert dq["cost"]["inference"]["unit"] == "examples" and dq["cost"]["inference"]["count"] > 0
    # The quantized row's validation.best is its own validation pass, not the baseline's checkpoint.
    assert dq["validation"]["from"] == "validation pass of the compressed model"
    assert none["validation"] == stored["validation"]
    # The fine-tuning code's version, in the entry and in what the cells record of it.
    assert stored["fine_tuning_version"] == baselines.FINE_TUNING_VERSION == dq["baseline"]["fine_tuning_version"]
    # evaluate.py on the baseline cell with dq reproduces the dq cell: it quantized the stored baseline.
    again = run_cli("evaluate.py", [f"ckpt={none['run_dir']}", "compress=dq", *fast("rotten_tomatoes"), "perf=null",
                                    f"hydra.run.dir={tmp_path / 'again'}"], cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert read_result(tmp_path / "again")["metrics"]["test/loss"] == pytest.approx(dq["metrics"]["test/loss"], abs=1e-6)
