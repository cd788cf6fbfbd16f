"""Bad input gets one clear line naming the problem and the fix, and the record says what failed."""

import pytest

from squeeze import run
from squeeze.errors import SqueezeError

from conftest import compose_cfg, fast, read_result, run_cli


def _fails(overrides, tmp_path, match, config="train"):
    cfg = compose_cfg(config, overrides, tmp_path)
    with pytest.raises(SqueezeError, match=match) as caught:
        (run.train if config == "train" else run.evaluate)(cfg)
    record = read_result(tmp_path)
    assert record["status"] == "failed" and match.split(".")[0] in record["error"]
    return str(caught.value)


def test_cli_prints_one_line_and_exits_2(tmp_path):
    done = run_cli("train.py", ["model=tiny_bert", "task=austen", f"hydra.run.dir={tmp_path}"], cwd=tmp_path)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: task=austen needs a causal_lm head, which model=tiny_bert (encoder) does not have; "
                      "pick a decoder model (e.g. model=tiny_gpt2, gpt2, smollm2)"]
    assert "Traceback" not in done.stderr
    assert read_result(tmp_path)["status"] == "failed"


def test_unknown_config_option_lists_the_valid_ones(tmp_path):
    done = run_cli("train.py", ["model=tiny_bret"], cwd=tmp_path)
    assert done.returncode != 0
    assert "Could not find 'model/tiny_bret'" in done.stderr
    assert "tiny_bert" in done.stderr and "tiny_gpt2" in done.stderr and "minilm" in done.stderr


def test_missing_data_file(tmp_path):
    message = _fails(["model=tiny_bert", "task=rotten_tomatoes", *fast("rotten_tomatoes"),
                      "task.data.data_files.train=/nonexistent/reviews.csv"], tmp_path, "does not exist")
    assert "/nonexistent/reviews.csv" in message and "task.data.data_files" in message


def test_label_set_mismatch_in_the_data(tmp_path):
    message = _fails(["model=tiny_bert", "task=rotten_tomatoes", *fast("rotten_tomatoes"),
                      "task.data.labels=[negative,positive]"], tmp_path, "label set mismatch")
    assert "task.data.labels" in message


def test_label_set_mismatch_with_a_checkpoint(tmp_path):
    trained = tmp_path / "trained"
    run.train(compose_cfg("train", ["model=tiny_bert", "task=rotten_tomatoes", *fast("rotten_tomatoes"),
                                    "+trainer.fast_dev_run=true"], trained))
    _fails(["task=wnut16", *fast("wnut16"), f"ckpt={trained}"], tmp_path / "eval", "label set mismatch", "eval")


def test_block_size_above_the_models_context(tmp_path):
    message = _fails(["model=tiny_gpt2", "task=austen", *fast("austen"), "task.data.block_size=1024"],
                     tmp_path, "above the model's context")
    assert "512" in message and "task.data.block_size<=512" in message


def test_checkpoint_from_another_architecture(tmp_path):
    trained = tmp_path / "trained"
    run.train(compose_cfg("train", ["model=tiny_bert", "task=rotten_tomatoes", *fast("rotten_tomatoes"),
                                    "trainer.max_steps=1", "trainer.limit_val_batches=1",
                                    "checkpoint.keep_after_success=all"], trained))
    ckpt = trained / "checkpoints" / "last.ckpt"
    # A Lightning checkpoint into a GPT-2: tensors do not fit.
    _fails(["model=tiny_gpt2", "task=rotten_tomatoes", *fast("rotten_tomatoes"), f"ckpt={ckpt}"],
           tmp_path / "a", "another architecture", "eval")
    # Resuming training from it.
    _fails(["model=tiny_gpt2", "task=rotten_tomatoes", *fast("rotten_tomatoes"), f"ckpt_path={ckpt}"],
           tmp_path / "b", "another architecture")


def test_nan_loss_stops_the_run_with_the_reason(tmp_path):
    message = _fails(["model=tiny_gpt2", "task=rotten_tomatoes", *fast("rotten_tomatoes"), "optimizer.lr=1e30",
                      "trainer.max_steps=5", "trainer.gradient_clip_val=null"], tmp_path, "loss became nan")
    assert "optimizer.lr" in message


def test_missing_asset_names_the_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setenv("SQUEEZE_CACHE", str(tmp_path / "empty-cache"))
    message = _fails(["model=tiny_bert", "task=rotten_tomatoes"], tmp_path, "python -m squeeze.assets fetch minilm")
    assert "not in the cache" in message
