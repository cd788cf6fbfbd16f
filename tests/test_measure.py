"""Inference performance: timings are sane, positive and consistent; batches are real test examples."""

from __future__ import annotations

import time

import pytest
import torch

from squeeze import measure, models, run
from squeeze.errors import SqueezeError

from conftest import compose_cfg, fast


def test_time_call_reports_median_and_spread_of_the_repeats():
    calls = []
    timing = measure.time_call(lambda: (calls.append(1), time.sleep(0.005)), warmup=2, repeats=5)
    assert len(calls) == 7
    assert 0.005 <= timing["p10_s"] <= timing["median_s"] <= timing["p90_s"] < 0.5
    assert timing["repeats"] == 5
    with pytest.raises(SqueezeError, match="perf.repeats=0"):
        measure.time_call(lambda: None, warmup=0, repeats=0)


def test_quantiles_interpolate():
    assert measure._quantile([1.0, 2.0, 3.0, 4.0, 5.0], 0.1) == pytest.approx(1.4)
    assert measure._quantile([1.0, 2.0, 3.0, 4.0, 5.0], 0.9) == pytest.approx(4.6)


def test_a_run_measures_latency_and_throughput_of_the_tested_model(tmp_path):
    overrides = ["model=tiny_gpt2", "task=rotten_tomatoes", *fast("rotten_tomatoes"), "trainer.max_steps=1",
                 "perf.batch_sizes=[1,8]", "perf.repeats=5"]
    record = run.train(compose_cfg("train", overrides, tmp_path))
    perf = record["perf"]
    assert perf["device"] == "cpu" and perf["threads"] == torch.get_num_threads()
    b1, b8 = perf["latency"]["batch_1"], perf["latency"]["batch_8"]
    for t in (b1, b8):
        assert 0 < t["p10_s"] <= t["median_s"] <= t["p90_s"] and t["repeats"] == 5
    assert perf["throughput"]["examples_per_s"] == pytest.approx(8 / b8["median_s"])
    assert perf["throughput"]["tokens_per_s"] > perf["throughput"]["examples_per_s"]
    assert perf["peak_memory_kind"] == "cpu_rss" and perf["peak_memory_bytes"] > 0

    # Measured again on the same model, the median agrees within the noise of a shared CPU.
    model = models.load_saved(tmp_path / "model", "sequence_classification")
    cfg = compose_cfg("eval", ["model=tiny_gpt2", "task=rotten_tomatoes", *fast("rotten_tomatoes")], tmp_path / "e")
    data = run._prepare(cfg)[2]
    data.setup("test")
    again = measure.measure_inference(model, data.test_dataloader(), [1, 8], warmup=2, repeats=5)
    assert 0.2 < again["latency"]["batch_8"]["median_s"] / b8["median_s"] < 5


def test_example_batch_repeats_examples_to_reach_the_asked_size():
    class Loader:
        dataset = [{"input_ids": torch.tensor([1, 2]), "attention_mask": torch.tensor([1, 1])}] * 3

        @staticmethod
        def collate_fn(rows):
            return {k: torch.stack([r[k] for r in rows]) for k in rows[0]} | {"labels": torch.zeros(len(rows))}

    batch = measure.example_batch(Loader, 7)
    assert batch["input_ids"].shape == (7, 2) and "labels" not in batch


def test_bad_perf_settings_are_named():
    with pytest.raises(SqueezeError, match="perf.batch_sizes"):
        measure.measure_inference(torch.nn.Linear(2, 2), None, [0])
    if not torch.cuda.is_available():
        with pytest.raises(SqueezeError, match="no CUDA device"):
            measure.measure_inference(torch.nn.Linear(2, 2), None, [1], device="cuda")
