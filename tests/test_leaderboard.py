"""The nanoGPT study's leaderboard figures: training throughput at fixed batch sizes, memory after loading the
model, the pipeline's tokens/s over a window of iterations, and the preset that asks for them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from squeeze import measure, report, run
from squeeze.compress import quantization as q
from squeeze.config import check_before_loading, error_line
from squeeze.errors import SqueezeError
from squeeze.hardware import pipeline
from squeeze.report import cells
from squeeze.report.aggregate import check_report_section
from squeeze.run import sweep

from conftest import CONF, build_tiny, compose_cfg, fast, read_result

LM = ["model=tiny_gpt2", "task=austen", *fast("austen"), "trainer.max_steps=1", "callbacks.energy=null",
      "perf.batch_sizes=[1]", "perf.decode_batch_sizes=[]", "perf.warmup=1", "perf.repeats=2"]


class Loader:
    """A test dataloader's two attributes example_batch reads: rows, and how they are collated."""

    def __init__(self, rows):
        self.dataset = rows

    @staticmethod
    def collate_fn(rows):
        return {k: torch.stack([torch.as_tensor(r[k]) for r in rows]) for k in rows[0]}


def test_a_run_records_training_throughput_at_each_batch_size_and_memory_after_load(tmp_path):
    run.train(compose_cfg("train", [*LM, "perf.train_batch_sizes=[2,4]"], tmp_path))
    record = read_result(tmp_path)
    assert record["status"] == "ok", record["error"]
    train = record["perf"]["train"]
    assert train["optimizer"] == "AdamW" and train["device"] == "cpu"
    for size in (2, 4):
        t = train[f"batch_{size}"]
        assert 0 < t["p10_s"] <= t["median_s"] <= t["p90_s"] and t["repeats"] == 2
        assert t["tokens"] == size * 32  # full 32-token blocks: every input token counts
        assert t["tokens_per_s"] == pytest.approx(t["tokens"] / t["median_s"])
    # The model as built, before training: on CPU its tensors' bytes (tied embeddings once), the process beside it.
    loaded = record["memory_after_load"]
    assert loaded["kind"] == "cpu_tensors" and loaded["bytes"] == 4 * record["params"]  # fp32, nothing else
    assert loaded["bytes"] < loaded["rss_bytes"] <= record["peak_memory_bytes"]
    # The report reads both: a per-batch figure per device and a plain one.
    row = cells.cell(record, tmp_path / "result.json")
    assert row["per_batch"]["train_tokens_per_s.cpu.batch_4"] == pytest.approx(train["batch_4"]["tokens_per_s"])
    assert row["memory_after_load_mb"] == pytest.approx(loaded["bytes"] * 1e-6)
    assert "train" not in cells._perf_by_device(record)  # a figure of a device, not a device
    # A preset's table selects them by name (per-batch ones by pattern).
    record["config"]["report"] = {"table": {"quality": True, "train_tokens_per_s.*.batch_4": True,
                                            "memory_after_load_mb": False}}
    (tmp_path / "sweep" / "0").mkdir(parents=True)
    (tmp_path / "sweep" / "0" / "result.json").write_text(json.dumps(record))
    built = report.build([tmp_path / "sweep"], tmp_path / "out", draw=False)
    header = next(line for line in built.markdown.read_text().splitlines() if line.startswith("| row |"))
    assert header.endswith("| train tok/s b4 (cpu) | Δ% | memory after load MB |")


def test_training_throughput_is_skipped_by_default(tmp_path):
    cfg = compose_cfg("train", LM, tmp_path)
    assert list(cfg.perf.train_batch_sizes) == []
    record = run.train(cfg)
    assert record["status"] == "ok", record["error"]
    assert "train" not in record["perf"] and record["memory_after_load"]["bytes"] > 0


def test_evaluate_records_memory_after_loading_and_training_throughput(tmp_path):
    eval_overrides = [o for o in LM if not o.startswith(("trainer.max_steps", "callbacks."))]
    record = run.evaluate(compose_cfg("eval", [*eval_overrides, "perf.train_batch_sizes=[3]"], tmp_path))
    assert record["status"] == "ok", record["error"]
    assert record["memory_after_load"]["kind"] == "cpu_tensors" and record["memory_after_load"]["bytes"] > 0
    assert record["perf"]["train"]["batch_3"]["tokens"] == 3 * 32


def test_training_is_timed_on_a_copy_with_the_batch_labels():
    model, _ = build_tiny("tiny_gpt2", "sequence_classification")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows = [{"input_ids": torch.tensor([5, 6, 7, 8]), "attention_mask": torch.tensor([1, 1, 1, 0]),
             "labels": torch.tensor(i % 2)} for i in range(3)]
    out = measure.measure_training(model, Loader(rows), [4, 2], warmup=1, repeats=2)
    assert set(out) == {"optimizer", "device", "batch_2", "batch_4"}
    # Timed (a classifier has a loss only with the batch's labels); non-padding tokens, 3 examples repeated to 4.
    assert out["batch_4"]["tokens"] == 4 * 3 and out["batch_4"]["tokens_per_s"] > 0
    assert not model.training  # left as it was, and its weights untouched by the optimizer steps
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # A forward that returns no loss: a reason for that batch size, not a crash.
    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 4)

        def forward(self, input_ids, **_):
            return type("Out", (), {"loss": None})()

    reason = measure.measure_training(Plain(), Loader(rows), [1], warmup=0, repeats=1)["batch_1"]["reason"]
    assert reason.startswith("AttributeError")


def test_a_model_with_integer_weights_gets_a_reason_instead_of_figures():
    model, _ = build_tiny("tiny_gpt2", "causal_lm", labels=None)
    c = q.WeightOnlyQuantization()
    c.name = "int8wo"
    quantized = c.finalize(model)
    rows = [{"input_ids": torch.tensor([5, 6, 7, 8])}] * 2
    out = measure.measure_training(quantized, Loader(rows), [2], warmup=1, repeats=1)
    assert set(out) == {"reason"} and "integer weights" in out["reason"]
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    assert "no trainable parameter" in measure.measure_training(frozen, Loader(rows), [1])["reason"]


@pytest.mark.parametrize("value", ["[0]", "4", "[4.5]", "x"])
def test_a_bad_train_batch_size_is_one_line_before_anything_loads(value, tmp_path):
    cfg = compose_cfg("train", ["model=tiny_gpt2", "task=austen", f"perf.train_batch_sizes={value}"], tmp_path)
    with pytest.raises(SqueezeError) as raised:
        check_before_loading(cfg)
    line = error_line(raised.value)
    assert line.startswith("perf.train_batch_sizes=") and "whole numbers ≥ 1" in line and "\n" not in line


def _tiny_gpt2():
    spec = instantiate(OmegaConf.load(CONF / "model" / "tiny_gpt2.yaml"), _convert_="all")
    return spec.build("causal_lm", None)


def _batches(n: int, size: int = 4):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 50257, (size, 16), generator=g)} for _ in range(n)]


def test_pipeline_window_is_the_throughput_of_those_iterations_alone():
    batches = _batches(5)
    figures, _ = pipeline.run(_tiny_gpt2, batches, stages=1, window=[2, 4])
    window = figures["window"]
    assert window["iterations"] == [2, 4] and window["tokens"] == 3 * 4 * 16 and figures["batch_size"] == 4
    assert 0 < window["seconds"] < figures["train_seconds"]
    assert window["tokens_per_s"] == pytest.approx(window["tokens"] / window["seconds"])
    # A run shorter than the window: no figure, and why.
    short, _ = pipeline.run(_tiny_gpt2, batches[:3], stages=1, window=[2, 4])
    assert short["window"]["tokens_per_s"] is None and "3 iterations" in short["window"]["reason"]
    assert pipeline.run(_tiny_gpt2, batches[:1], stages=1)[0]["window"] is None  # window=None: not measured
    with pytest.raises(SqueezeError, match=r"pipeline.window=\[4, 2\]"):
        pipeline.check_window([4, 2])


def test_hardware_pipeline_records_its_window_from_the_config(tmp_path):
    overrides = [o for o in LM if not o.startswith("trainer.max_steps")]
    cfg = compose_cfg("train", [*overrides, "hardware=pipeline", "pipeline.stages=1", "trainer.max_steps=3",
                                "pipeline.window=[2,3]"], tmp_path)
    record = run.train(cfg)
    assert record["status"] == "ok", record["error"]
    window = record["pipeline"]["window"]
    assert window["iterations"] == [2, 3] and window["tokens"] == 2 * 8 * 32 and window["tokens_per_s"] > 0
    assert record["pipeline"]["batch_size"] == 8
    with pytest.raises(SqueezeError, match=r"pipeline.window=\[0, 2\] must be \[first, last\]"):
        check_before_loading(compose_cfg("train", [*overrides, "hardware=pipeline", "pipeline.window=[0,2]"],
                                         tmp_path / "bad"))


def test_the_pipeline_window_is_a_report_column_and_the_row_is_named_by_the_batch_size():
    # Measured across two stage processes in test_scale's pipeline test; one process here (the same figures).
    figures, _ = pipeline.run(_tiny_gpt2, _batches(3), stages=1, window=[2, 3])
    figures.update(stages=2, schedule="gpipe")  # as a two-stage run records them
    window = figures["window"]
    # The report's figure, and its row named by the batch size (compress=none has no label to tell rows apart).
    record = {"pipeline": figures, "choices": {"model": "tiny_gpt2", "task": "austen", "hardware": "pipeline"},
              "status": "ok", "metrics": {"test/perplexity": 9.0}, "config": {"task": {"monitor": "val/perplexity"}}}
    row = cells.cell(record, Path("result.json"))
    assert row["pipeline_window_tokens_per_s"] == window["tokens_per_s"]
    assert row["variant"] == "pipeline 2 stages gpipe batch 4" and row["hardware"] == "cpu"


def test_the_nanogpt_preset_asks_for_the_leaderboard_columns(tmp_path):
    cfg = compose_cfg("train", ["experiment=nanogpt_compression"], tmp_path)
    assert list(cfg.perf.train_batch_sizes) == [4, 12]
    report = OmegaConf.to_container(cfg.report, resolve=True)
    check_report_section(report)
    assert {"train_tokens_per_s.*.batch_4", "train_tokens_per_s.*.batch_12", "memory_after_load_mb",
            "peak_memory_mb", "decode_tokens_per_s.*.batch_1", "decode_tokens_per_s.*.batch_12",
            "pipeline_window_tokens_per_s"} <= set(report["table"])
    rows = [c for c in sweep.cells(cfg)[0] if "hardware=pipeline" in c]
    assert sorted(next(o for o in c if o.startswith("task.data.batch_size=")) for c in rows) == [
        "task.data.batch_size=12", "task.data.batch_size=4"]
    piped = compose_cfg("train", ["experiment=nanogpt_compression", "hardware=pipeline"], tmp_path / "p")
    assert list(piped.pipeline.window) == [20, 40]
    check_before_loading(piped)


def test_plan_names_the_two_pipeline_rows_by_their_batch_size(tmp_path, monkeypatch):
    """compress=none has no label: the plan (and W&B's run names) tell the pipeline rows apart by batch size."""
    from squeeze.run.plan import plan

    monkeypatch.chdir(tmp_path)
    rows = [c.row for c in plan(["experiment=nanogpt_compression_offline"]).cells]
    assert rows[-2:] == ["none @ pipeline batch 4", "none @ pipeline batch 12"] and rows[0] == "none @ cpu"
