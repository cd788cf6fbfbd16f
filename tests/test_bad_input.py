"""Bad input of the kinds a new user tries first: one line naming the fix, exit code 2, no traceback;
and a single file scored by evaluate.py without the other splits."""

import re
from pathlib import Path

import pytest

from squeeze import run
from squeeze.config import check_counts
from squeeze.errors import SqueezeError
from squeeze.tasks.sources import load_splits

from conftest import compose_cfg, fast, read_result, run_cli


def _one_line_exit_2(done) -> str:
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr[-2000:]
    return errors[0]


def test_a_one_row_csv_is_too_small_to_carve_from(tmp_path):
    data = tmp_path / "one.csv"
    data.write_text("text,label\nnice film,fresh\n")
    done = run_cli("train.py", ["model=tiny_bert", "task=rotten_tomatoes", f"task.data.data_files.train={data}",
                                "task.data.splits.validation=null", "task.data.splits.test=null",
                                f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    line = _one_line_exit_2(done)
    assert "has 1 rows, too few to carve" in line and "task.data.data_files" in line
    assert read_result(tmp_path / "run")["status"] == "failed"


def test_carving_needs_a_row_for_each_side(tmp_path):
    data = tmp_path / "rows.csv"
    data.write_text("text,label\n" + "".join(f"review {i},fresh\n" for i in range(10)))
    files, splits = {"train": [str(data)]}, {"train": "train", "validation": None, "test": None}
    parts = load_splits("csv", data_files=files, splits=splits)  # 10% of 10 rows, then 10% of 9: one each
    assert (len(parts["train"]), len(parts["validation"]), len(parts["test"])) == (8, 1, 1)
    with pytest.raises(SqueezeError, match="has 10 rows, too few to carve a test split of 4%"):
        load_splits("csv", data_files=files, splits=splits, carve={"test": 0.04})  # 0.4 of a row


@pytest.mark.parametrize("override, key", [
    ("trainer.max_steps=-5", "trainer.max_steps"),
    ("trainer.max_epochs=0", "trainer.max_epochs"),
    ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches"),
    ("trainer.val_check_interval=0", "trainer.val_check_interval"),
    ("task.data.batch_size=0", "task.data.batch_size"),
    ("task.data.max_examples.train=-1", "task.data.max_examples.train"),
])
def test_non_positive_counts_are_refused_before_loading(tmp_path, override, key):
    cfg = compose_cfg("train", ["model=tiny_bert", "task=rotten_tomatoes", override], tmp_path)
    with pytest.raises(SqueezeError, match=f"^{re.escape(key)}=.*give"):
        run.train(cfg)
    assert read_result(tmp_path)["status"] == "failed"  # recorded before anything loaded


def test_a_refused_count_is_one_line_and_exit_2_on_the_command_line(tmp_path):
    done = run_cli("train.py", ["model=tiny_bert", "task=rotten_tomatoes", "trainer.max_steps=-5",
                                f"hydra.run.dir={tmp_path}"], cwd=tmp_path)
    line = _one_line_exit_2(done)
    assert line.startswith("error: trainer.max_steps=") and "give" in line


def test_accepted_counts_pass():
    check_counts({"max_steps": -1, "max_epochs": 1, "val_check_interval": 1.0, "limit_train_batches": 2,
                  "limit_val_batches": 0.5, "accumulate_grad_batches": 1},
                 {"batch_size": 8, "max_examples": {"train": 64, "test": None}})
    check_counts({"max_steps": 0}, {})  # zero-shot


def test_a_sweep_records_each_bad_cell_and_goes_on(tmp_path):
    done = run_cli("train.py", ["-m", "model=tiny_bert", "task=rotten_tomatoes", "trainer.max_steps=-5,1",
                                *fast("rotten_tomatoes"), "perf=null", f"hydra.sweep.dir={tmp_path}"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    records = {r["config"]["trainer"]["max_steps"]: r for r in map(read_result, tmp_path.glob("*_*/"))}
    assert records[-5]["status"] == "failed" and "trainer.max_steps" in records[-5]["error"]
    assert records[1]["status"] == "ok"


def test_evaluate_scores_one_text_file_as_the_test_split(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
                    "must be in want of a wife.\n" * 6)
    for task in ("austen", "wikitext2"):  # an offline text task and a hub one: neither loads anything else
        cfg = compose_cfg("eval", ["model=tiny_gpt2", f"task={task}", *fast(task), f"task.data.data_files={text}",
                                   "perf=null"], tmp_path / task)
        record = run.evaluate(cfg)
        assert record["status"] == "ok", record["error"]
        tokens = record["perplexity"]["scored_tokens"]
        assert 100 < tokens < 200  # the file's ~150 GPT-2 tokens, scored in 32-token blocks, nothing else
        assert record["metrics"]["test/perplexity"] > 1
