"""The real offline models through the whole run (slow: run with `pytest -m slow`)."""

import pytest

from squeeze import run

from conftest import compose_cfg, fast, read_result

pytestmark = pytest.mark.slow


def test_minilm_learns_sentiment_in_a_short_run(tmp_path):
    cfg = compose_cfg("train", ["model=minilm", "task=rotten_tomatoes", *fast("rotten_tomatoes"),
                                "task.data.batch_size=32", "trainer.max_steps=60", "trainer.max_epochs=5",
                                "task.data.max_examples.train=1920", "task.data.max_examples.test=640",
                                "optimizer.lr=1e-4"], tmp_path)
    record = run.train(cfg)
    assert record["params"] > 22_000_000
    assert record["metrics"]["test/accuracy"] > 0.70


def test_smollm2_zero_shot_perplexity_is_that_of_a_real_lm(tmp_path):
    cfg = compose_cfg("eval", ["model=smollm2", "task=austen", *fast("austen"), "task.data.block_size=128",
                               "task.data.max_examples.test=400"], tmp_path)
    record = run.evaluate(cfg)
    # Random guessing over 49,152 tokens would give ~49k; a trained 135M model reads Austen far better.
    assert 3 < record["metrics"]["test/perplexity"] < 60
    assert read_result(tmp_path)["perplexity"]["protocol"] == "blocks"


def test_smollm2_fine_tunes_a_step(tmp_path):
    cfg = compose_cfg("train", ["model=smollm2", "task=austen", *fast("austen"), "+trainer.fast_dev_run=true",
                                "task.data.batch_size=2"], tmp_path)
    assert run.train(cfg)["status"] == "ok"
