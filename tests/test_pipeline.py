"""The whole run on tiny real architectures: every model × task composes, every tiny cell runs,
a short run learns, the record is complete, evaluate reproduces it, a killed run resumes."""

import csv
from pathlib import Path

import pytest
from hydra.utils import instantiate

from squeeze import models, run
from squeeze.errors import SqueezeError
from squeeze.record import dir_bytes

from conftest import CONF, compose_cfg, fast, read_result

MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
TASKS = sorted(p.stem for p in (CONF / "task").glob("*.yaml"))
TINY = ["tiny_bert", "tiny_gpt2", "tiny_llama"]
OFFLINE_TASKS = ["rotten_tomatoes", "wnut16", "austen"]
TEST_METRICS = {
    "sequence_classification": {"test/accuracy", "test/f1", "test/precision", "test/recall", "test/loss"},
    "token_classification": {"test/precision", "test/recall", "test/f1", "test/token_accuracy", "test/loss"},
    "causal_lm": {"test/perplexity", "test/loss"},
}


def test_the_issue_lists_every_option():
    assert set(MODELS) == {"bert-base-uncased", "distilbert-base-uncased", "gpt2", "gpt2-medium", "gpt2-large",
                           "gpt2-xl", "minilm", "smollm2", "tiny_bert", "tiny_gpt2", "tiny_llama",
                           "opt-125m", "distilgpt2", "tiny_opt", "gpt2_char"}
    assert set(TASKS) == {"imdb", "conll2003", "wikitext2", "wikitext103", "c4", "lambada", "personachat",
                          "rotten_tomatoes", "wnut16", "austen", "chatterbot", "hellaswag", "storycloze",
                          "austen_mlm", "wikitext103_mlm"}


@pytest.mark.parametrize("config_name", ["train", "eval"])
def test_every_model_and_task_composes(config_name, tmp_path):
    # Every model option composes (beside one task) and every task option (beside one model): a model group and
    # a task group do not reach into each other, so the 14 × 11 pairs need no composition of their own.
    specs, heads = {}, {}
    for model in MODELS:
        cfg = compose_cfg(config_name, [f"model={model}", "task=austen"], tmp_path)
        specs[model] = instantiate(cfg.model, _convert_="all")  # builds no weights, needs no network
        assert specs[model].name == model
    for task in TASKS:
        heads[task] = compose_cfg(config_name, ["model=tiny_gpt2", f"task={task}"], tmp_path).task.head
    for model, spec in specs.items():
        for task, head in heads.items():
            # Only an encoder with a causal-LM task, or a decoder with a masked-LM one, cannot work (not read from
            # the table under test).
            if (spec.kind, head) not in {("encoder", "causal_lm"), ("decoder", "masked_lm")}:
                models.check_compatible(spec.name, spec.kind, task, head)
            else:
                with pytest.raises(SqueezeError, match="decoder" if head == "causal_lm" else "encoder"):
                    models.check_compatible(spec.name, spec.kind, task, head)


@pytest.mark.parametrize("task", OFFLINE_TASKS)
@pytest.mark.parametrize("model", TINY)
def test_fast_dev_run_every_tiny_cell(model, task, tmp_path):
    cfg = compose_cfg("train", [f"model={model}", f"task={task}", "+trainer.fast_dev_run=true", *fast(task)], tmp_path)
    if model == "tiny_bert" and task == "austen":
        with pytest.raises(SqueezeError, match="causal_lm"):
            run.train(cfg)
        assert read_result(tmp_path)["status"] == "failed"
        return
    record = run.train(cfg)
    assert record["status"] == "ok", record["error"]
    assert set(record["metrics"]) == TEST_METRICS[cfg.task.head]
    assert (tmp_path / "model" / "config.json").exists()
    assert read_result(tmp_path)["status"] == "ok"


@pytest.mark.parametrize("task", OFFLINE_TASKS)
def test_fast_dev_run_tiny_opt(task, tmp_path):
    cfg = compose_cfg("train", ["model=tiny_opt", f"task={task}", "+trainer.fast_dev_run=true", *fast(task)], tmp_path)
    if task == "wnut16":  # transformers has no OPT token-classification head: refused by name
        with pytest.raises(SqueezeError, match="no token_classification head"):
            run.train(cfg)
        return
    record = run.train(cfg)
    assert record["status"] == "ok", record["error"]
    assert set(record["metrics"]) == TEST_METRICS[cfg.task.head]


def _train_losses(run_dir: Path) -> list[float]:
    rows = csv.DictReader(open(run_dir / "csv" / "metrics.csv"))
    return [float(r["train/loss"]) for r in rows if r.get("train/loss")]


def test_short_run_learns_and_writes_a_complete_record(tmp_path):
    overrides = ["model=tiny_bert", "task=rotten_tomatoes", *fast("rotten_tomatoes"), "optimizer.lr=3e-3",
                 "trainer.max_steps=150", "trainer.max_epochs=5", "trainer.log_every_n_steps=5",
                 "task.data.batch_size=32", "task.data.max_examples.train=2400",
                 "task.data.max_examples.validation=320", "task.data.max_examples.test=640"]
    record = run.train(compose_cfg("train", overrides, tmp_path))
    losses = _train_losses(tmp_path)
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    # 58% of reviews are "fresh": a majority-class guess scores 0.58 accuracy and ~0.37 macro-F1.
    assert record["metrics"]["test/accuracy"] > 0.62
    assert record["metrics"]["test/f1"] > 0.55

    saved = read_result(tmp_path)
    assert saved["choices"] == {"model": "tiny_bert", "task": "rotten_tomatoes", "compress": "none", "hardware": "cpu"}
    assert saved["config"]["optimizer"]["lr"] == 3e-3 and saved["config"]["seed"] == 42
    assert saved["status"] == "ok" and saved["error"] is None
    assert saved["checkpoint_bytes"] == dir_bytes(tmp_path / "model") > 4 * saved["params"]
    assert 0 < saved["nonzero_params"] <= saved["params"]
    assert saved["train_seconds"] > 0 and saved["eval_seconds"] > 0 and saved["peak_memory_bytes"] > 0
    assert saved["versions"]["torch"] and saved["versions"]["transformers"]
    # Finished ok: the checkpoints only a resume needs are gone (checkpoint.keep_after_success=model), and said.
    assert not (tmp_path / "checkpoints").exists()
    dropped = saved["checkpoints_after_success"]
    assert set(dropped["dropped"]) == {"best.ckpt", "last.ckpt"} and dropped["keep"] == "model"
    assert dropped["bytes_freed"] > 2 * saved["checkpoint_bytes"]  # weights twice, optimizer state beside

    # evaluate.py on the run directory reproduces the test metrics of the saved (best) model.
    eval_dir = tmp_path / "eval"
    cfg = compose_cfg("eval", ["task=rotten_tomatoes", *fast("rotten_tomatoes"), f"ckpt={tmp_path}",
                               "task.data.max_examples.test=640"], eval_dir)
    evaluated = run.evaluate(cfg)
    assert evaluated["choices"]["model"] == "tiny_bert"
    for key, value in record["metrics"].items():
        assert evaluated["metrics"][key] == pytest.approx(value, abs=1e-5)
    assert evaluated["checkpoint_bytes"] == saved["checkpoint_bytes"]


def test_zero_shot_lm_reports_perplexity_with_its_protocol(tmp_path):
    for protocol in ("blocks", "sliding"):
        run_dir = tmp_path / protocol
        cfg = compose_cfg("train", ["model=tiny_gpt2", "task=austen", *fast("austen"), "trainer.max_steps=0",
                                    f"task.data.protocol={protocol}", "task.data.stride=8", "perf=null"], run_dir)
        record = run.train(cfg)
        assert record["train_seconds"] == 0.0
        vocab = 50257  # an untrained model is close to uniform over the vocabulary
        assert 0.3 * vocab < record["metrics"]["test/perplexity"] < 3 * vocab
        p = read_result(run_dir)["perplexity"]
        assert p["protocol"] == protocol and p["block_size"] == 32
        assert p["stride"] == (8 if protocol == "sliding" else None) and p["scored_tokens"] > 0
        # evaluate.py ckpt=<this decoder run> without model=: the run's model is checked against the task,
        # not the default model= (an encoder, which cannot do language modelling).
        cfg = compose_cfg("eval", ["task=austen", *fast("austen"), f"ckpt={run_dir}",
                                   f"task.data.protocol={protocol}", "task.data.stride=8", "perf=null"], run_dir / "eval")
        evaluated = run.evaluate(cfg)
        assert evaluated["choices"]["model"] == "tiny_gpt2"
        assert evaluated["metrics"]["test/perplexity"] == pytest.approx(record["metrics"]["test/perplexity"], rel=1e-5)


def test_killed_run_resumes_from_its_last_checkpoint(tmp_path):
    common = ["model=tiny_gpt2", "task=rotten_tomatoes", *fast("rotten_tomatoes"), "trainer.max_epochs=10",
              "trainer.val_check_interval=4", "trainer.limit_val_batches=1", "checkpoint.keep_after_success=all"]
    first = tmp_path / "first"
    run.train(compose_cfg("train", [*common, "trainer.max_steps=4"], first))
    assert (first / "checkpoints" / "last.ckpt").exists()
    # Resume in the same directory (ckpt_path=last), as after a kill: training continues at step 4.
    run.train(compose_cfg("train", [*common, "trainer.max_steps=8", "ckpt_path=last"], first))
    steps = [int(r["step"]) for r in csv.DictReader(open(first / "csv" / "metrics.csv")) if r.get("train/loss")]
    assert steps == [0, 1, 2, 3, 4, 5, 6, 7]  # the rows before the resume are kept, training went on at step 4
    assert read_result(first)["resumed_from"]["step"] == 4
    # ...or from another run directory.
    second = tmp_path / "second"
    run.train(compose_cfg("train", [*common, "trainer.max_steps=8", f"ckpt_path={first}"], second))
    steps = [int(r["step"]) for r in csv.DictReader(open(second / "csv" / "metrics.csv")) if r.get("train/loss")]
    assert steps == []  # first's last.ckpt is already at step 8: nothing left to train
    assert read_result(second)["status"] == "ok"


def test_tensorboard_logger_writes_event_files(tmp_path):
    overrides = [o for o in fast("rotten_tomatoes") if not o.startswith("logger=")]
    cfg = compose_cfg("train", ["model=tiny_gpt2", *overrides, "logger=tensorboard", "trainer.max_steps=2",
                                "trainer.limit_val_batches=1"], tmp_path)
    assert run.train(cfg)["status"] == "ok"
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_pretrained_models_train_with_dropout_on(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from squeeze.tasks.classification import SequenceClassification

    saved = tmp_path / "saved"
    cfg = compose_cfg("train", ["model=tiny_bert", *fast("rotten_tomatoes")], tmp_path)
    instantiate(cfg.model, _convert_="all").build("sequence_classification", ["a", "b"]).save_pretrained(saved)
    model = AutoModelForSequenceClassification.from_pretrained(saved)
    assert not model.training  # what from_pretrained gives
    module = SequenceClassification(model)
    module.on_fit_start()
    assert all(m.training for m in model.modules())
