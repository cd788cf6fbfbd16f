"""checkpoint.keep_after_success: a finished run keeps its saved model and record, and drops the checkpoints that only
a resume needs (model), all but best.ckpt (best), or nothing (all); never the only copy of the trained weights."""

import pytest

from squeeze import config, run
from squeeze.errors import SqueezeError
from squeeze.hardware import retention
from squeeze.record import read_record, write_record

from conftest import compose_cfg, fast, read_result


def _finished(run_dir, status="ok", model=True):
    """A run directory as a finished run leaves it: record, model/, best/last/mid-epoch checkpoints."""
    (run_dir / "checkpoints").mkdir(parents=True)
    for name, size in (("best.ckpt", 300), ("last.ckpt", 500), ("hpc_ckpt_1.ckpt", 200)):
        (run_dir / "checkpoints" / name).write_bytes(b"x" * size)
    if model:
        (run_dir / "model").mkdir()
        (run_dir / "model" / "config.json").write_text("{}")
    record = {"status": status, "error": None}
    write_record(run_dir, record)
    return record


@pytest.mark.parametrize("keep, left, freed", [("model", [], 1000), ("best", ["best.ckpt"], 700)])
def test_a_finished_run_drops_what_only_a_resume_needs_and_says_so(tmp_path, keep, left, freed):
    record = _finished(tmp_path)
    entry = retention.after_success(record, tmp_path, keep)
    remaining = sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) if left else []
    assert remaining == left and (tmp_path / "checkpoints").exists() == bool(left)
    assert entry == {"keep": keep, "dropped": sorted({"best.ckpt", "last.ckpt", "hpc_ckpt_1.ckpt"} - set(left)),
                     "bytes_freed": freed, "kept": left}
    assert read_record(tmp_path)[retention.RECORD_KEY] == entry  # written to result.json once the files are gone
    assert (tmp_path / "model" / "config.json").is_file()


def test_all_failed_runs_and_the_only_copy_of_the_weights_are_kept(tmp_path):
    everything = {"best.ckpt", "last.ckpt", "hpc_ckpt_1.ckpt"}
    record = _finished(tmp_path / "all")
    assert retention.after_success(record, tmp_path / "all", "all") is None
    assert {p.name for p in (tmp_path / "all" / "checkpoints").iterdir()} == everything
    record = _finished(tmp_path / "failed", status="failed")
    assert retention.after_success(record, tmp_path / "failed", "model") is None
    assert {p.name for p in (tmp_path / "failed" / "checkpoints").iterdir()} == everything
    assert retention.RECORD_KEY not in read_record(tmp_path / "failed")
    # No complete model/ saved: best.ckpt is the trained weights, so it stays even under `model`.
    record = _finished(tmp_path / "unsaved", model=False)
    entry = retention.after_success(record, tmp_path / "unsaved", "model")
    assert entry["kept"] == ["best.ckpt"] and "best.ckpt stays" in entry["note"]


def test_a_real_run_keeps_its_model_and_a_resume_of_it_says_why_there_is_no_checkpoint(tmp_path):
    overrides = ["model=tiny_gpt2", "task=austen", *fast("austen"), "trainer.max_steps=2",
                 "trainer.limit_val_batches=1", "perf=null", "callbacks.energy=null"]
    record = run.train(compose_cfg("train", overrides, tmp_path))
    assert record["status"] == "ok", record["error"]
    saved = read_result(tmp_path)
    assert saved["status"] == "ok" and not (tmp_path / "checkpoints").exists()
    assert "last.ckpt" in saved[retention.RECORD_KEY]["dropped"]
    assert (tmp_path / "model" / "config.json").is_file()
    # The finished run evaluates from its model; resuming it names the setting that dropped the checkpoint.
    with pytest.raises(SqueezeError, match=r"no checkpoint .*keep_after_success=model dropped .*last.ckpt.*"
                                           r"keep_after_success=all keeps them"):
        run.train(compose_cfg("train", [*overrides, "trainer.max_steps=4", "ckpt_path=last"], tmp_path))
    assert read_result(tmp_path) == saved  # refused before the finished run's record was touched


def test_an_unknown_setting_is_one_line_naming_the_choices(tmp_path):
    cfg = compose_cfg("train", ["model=tiny_gpt2", "task=austen", "checkpoint.keep_after_success=last"], tmp_path)
    with pytest.raises(SqueezeError, match=r"^checkpoint.keep_after_success='last' is not one of "
                                           r"\['model', 'best', 'all'\]"):
        config.check_before_loading(cfg)


def test_what_a_run_keeps_is_not_part_of_which_cell_it_is():
    """A sweep rerun with another keep_after_success (or checkpoint cadence, or report layout) still finds its
    finished cells: those settings steer the invocation, not the cell."""
    from squeeze.run.cell import _same_cell

    config = {"model": {"name": "tiny_gpt2"}, "checkpoint": {"keep_after_success": "model", "every_minutes": 1}}
    other = {"model": {"name": "tiny_gpt2"}, "checkpoint": {"keep_after_success": "all", "every_minutes": 5},
             "report": {"table": {"quality": True}}}
    assert _same_cell(config) == _same_cell(other)
    assert _same_cell(config) != _same_cell({**config, "model": {"name": "tiny_opt"}})
