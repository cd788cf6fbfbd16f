"""Where the post-training methods' calibration text comes from when evaluate.py scores a user's one file
(task.data.data_files=<file>): that file stays the test split, calibration reads calibration.data_files, and
without it the run stops with one line naming the setting."""

import csv
import math
import random

import pytest
from conftest import compose_cfg, fast, read_result, run_cli

from squeeze import run
from squeeze.compress import calibrate
from squeeze.errors import SqueezeError
from squeeze.run import build

WORDS = ("the of and a to in is you that it he was for on are as with his they at be this have from or one had by "
         "word but not what all were we when your can said there use an each which she do how their if will up "
         "other about out many then them these so some her would make like him into time has look two more").split()
BLOCK = 32


def _text(path, lines: int, seed: int):
    rng = random.Random(seed)
    path.write_text("".join(" ".join(rng.choice(WORDS) for _ in range(20)) + "\n" for _ in range(lines)))
    return path


def _evaluate(tmp_path, name: str, overrides: list[str], task: str = "austen", model: str = "tiny_llama") -> dict:
    cfg = compose_cfg("eval", [f"model={model}", f"task={task}", *fast(task), "perf=null", "callbacks.energy=null",
                               "calibration.samples=4", *overrides], tmp_path / name)
    return run.evaluate(cfg)


def _scored_tokens(tmp_path, file) -> int:
    """What blocks of BLOCK tokens score of the file's token stream (its lines with their newlines)."""
    cfg = compose_cfg("eval", ["model=tiny_llama", "task=austen"], tmp_path / "tokenizer")
    tokenizer = build.prepare(cfg)[1]
    n = sum(len(tokenizer(line + "\n", add_special_tokens=False)["input_ids"])
            for line in file.read_text().splitlines())
    return n - math.ceil(n / BLOCK)


@pytest.mark.parametrize("chain", ["gptq", "[smoothquant,dq]"])
def test_one_file_is_scored_whole_and_calibration_reads_its_own_text(tmp_path, chain):
    scored, calibration = _text(tmp_path / "my.txt", 30, seed=0), _text(tmp_path / "cal.txt", 40, seed=1)
    record = _evaluate(tmp_path, "run", [f"compress={chain}", f"task.data.data_files={scored}",
                                         f"task.data.block_size={BLOCK}", f"calibration.data_files={calibration}"])
    assert record["status"] == "ok", record.get("error")
    assert record["perplexity"]["scored_tokens"] == _scored_tokens(tmp_path, scored)  # the whole file, nothing else
    assert record["validation"] is None  # no split carved from the file
    first = record["compress"]["chain"][0]
    assert record["compress"][first]["calibration"]["source"] == "calibration.data_files"
    assert record["compress"][first]["calibration"]["data_files"] == [str(calibration)]
    assert read_result(tmp_path / "run")["compress"][first]["calibration"]["source"] == "calibration.data_files"


def test_the_calibration_text_is_what_calibrates(tmp_path):
    scored = _text(tmp_path / "my.txt", 30, seed=0)
    metrics = []
    for seed in (1, 2):
        calibration = _text(tmp_path / f"cal{seed}.txt", 40, seed=seed)
        record = _evaluate(tmp_path, f"run{seed}", ["compress=gptq", f"task.data.data_files={scored}",
                                                    f"task.data.block_size={BLOCK}",
                                                    f"calibration.data_files=[{calibration}]"])
        assert record["compress"]["gptq"]["calibration"]["data_files"] == [str(calibration)]
        metrics.append(record["metrics"]["test/perplexity"])
    assert metrics[0] != metrics[1]


def test_the_tasks_own_splits_still_calibrate_on_train(tmp_path):
    record = _evaluate(tmp_path, "run", ["compress=gptq", f"task.data.block_size={BLOCK}"])
    assert record["compress"]["gptq"]["calibration"]["source"] == "train split"
    assert "data_files" not in record["compress"]["gptq"]["calibration"]


def test_one_file_without_calibration_text_stops_with_the_setting(tmp_path):
    scored = _text(tmp_path / "my.txt", 30, seed=0)
    with pytest.raises(SqueezeError, match=r"no train split to calibrate on; set calibration\.data_files="):
        _evaluate(tmp_path, "run", ["compress=gptq", f"task.data.data_files={scored}",
                                    f"task.data.block_size={BLOCK}"])
    with pytest.raises(SqueezeError, match=r"nope\.txt does not exist; fix calibration\.data_files$"):
        _evaluate(tmp_path, "bad", ["compress=gptq", f"task.data.data_files={scored}", f"task.data.block_size={BLOCK}",
                                    f"calibration.data_files={tmp_path / 'nope.txt'}"])


def test_the_run_can_refuse_before_the_model_loads(tmp_path):
    """calibrate(..., fitting=) as the run calls it after building the data module, before the model: whether the
    run fine-tunes on the data decides if one file has a train split (carved) or is scored whole."""
    scored = _text(tmp_path / "my.txt", 30, seed=0)
    cfg = compose_cfg("eval", ["model=tiny_llama", "task=austen", "compress=gptq", f"task.data.data_files={scored}"],
                      tmp_path / "run")
    _, _, data = build.prepare(cfg)
    chain = build.chain(cfg.compress)
    with pytest.raises(SqueezeError, match=r"set calibration\.data_files="):
        calibrate(chain, data, cfg.calibration, fitting=False)  # evaluate.py: the file is the test split
    calibrate(chain, data, cfg.calibration, fitting=True)  # train.py: the file is carved into splits
    calibrate(chain, data, cfg.calibration)  # not said: checked when calibration runs
    with pytest.raises(SqueezeError, match=r"does not exist; fix calibration\.data_files"):
        calibrate(chain, data, {"data_files": ["nope.txt"]})
    assert not data.datasets  # nothing loaded, nothing split


def test_the_command_line_says_it_in_one_line(tmp_path):
    scored = _text(tmp_path / "my.txt", 30, seed=0)
    done = run_cli("evaluate.py", ["model=tiny_llama", "task=austen", f"task.data.data_files={scored}",
                                   "compress=[smoothquant,dq]", "perf=null", "callbacks.energy=null",
                                   f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "calibration.data_files=" in errors[0], done.stderr[-2000:]
    assert read_result(tmp_path / "run")["status"] == "failed"


def test_a_classification_file_stays_the_test_split(tmp_path):
    def rows(path, n, seed):
        rng = random.Random(seed)
        with open(path, "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(["text", "label"])
            for i in range(n):
                out.writerow([" ".join(rng.choice(WORDS) for _ in range(8)), ("rotten", "fresh")[i % 2]])
        return path

    scored, calibration = rows(tmp_path / "mine.csv", 20, seed=0), rows(tmp_path / "cal.csv", 12, seed=1)
    record = _evaluate(tmp_path, "run", ["compress=wanda", f"task.data.data_files={scored}",
                                         f"calibration.data_files={calibration}"],
                       task="rotten_tomatoes", model="tiny_bert")
    assert record["status"] == "ok", record.get("error")
    assert record["cost"]["inference"] == {**record["cost"]["inference"], "unit": "examples", "count": 20}
    assert record["compress"]["wanda"]["calibration"]["source"] == "calibration.data_files"
    assert record["compress"]["wanda"]["calibration"]["samples"] == 4
