"""Inference performance: timings are sane, positive and consistent; batches are real test examples."""

from __future__ import annotations

import mmap
import time

import pytest
import torch

from squeeze import formats, measure, run
from squeeze.run import build
from squeeze.errors import SqueezeError

from squeeze.run.summary import headline_figures

from conftest import compose_cfg, fast, read_result


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
    # Inference memory per batch size, apart from the training peak; a classifier cannot decode.
    for name in ("batch_1", "batch_8"):
        memory = perf["cpu"][name]
        assert memory["peak_memory_kind"] == "cpu_rss"
        assert 0 <= memory["peak_increase_bytes"] <= memory["peak_memory_bytes"] <= perf["peak_memory_bytes"]
    assert perf["cpu"]["decode_tokens_per_s"] is None and perf["cpu"]["decode"] is None
    assert record["train_tokens"] > 0 and record["train_tokens_per_s"] == pytest.approx(
        record["train_tokens"] / record["train_seconds"])

    # Measured again on the same model, the median agrees within the noise of a shared CPU.
    model = formats.load(tmp_path / "model", "sequence_classification")
    cfg = compose_cfg("eval", ["model=tiny_gpt2", "task=rotten_tomatoes", *fast("rotten_tomatoes")], tmp_path / "e")
    data = build.prepare(cfg)[2]
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


def test_a_decoder_run_measures_decoding_and_training_throughput(tmp_path):
    overrides = ["model=tiny_gpt2", "task=austen", *fast("austen"), "trainer.max_steps=2", "callbacks.energy=null",
                 "perf.batch_sizes=[1,4]", "perf.decode_batch_sizes=[1,3]", "perf.decode_new_tokens=5",
                 "perf.decode_prompt_tokens=7", "perf.decode_repeats=3", "perf.devices=[cpu,'cpu:0']"]
    run.train(compose_cfg("train", overrides, tmp_path))
    record = read_result(tmp_path)
    assert record["status"] == "ok", record["error"]
    # Two steps of 8 full blocks of 32 tokens: no padding, so every input token counts.
    assert record["train_tokens"] == 2 * 8 * 32 and record["train_tokens_per_s"] > 0
    perf = record["perf"]
    assert set(perf["by_device"]) == {"cpu", "cpu:0"} and {"cpu", "cpu:0"} <= set(perf)  # and it is written
    for device in ("cpu", "cpu:0"):
        figures = perf[device]
        assert set(figures["decode_tokens_per_s"]) == {"batch_1", "batch_3"}
        decode = figures["decode"]
        assert decode["new_tokens"] == 5 and decode["prompt_tokens"] == 7
        for name, timing in decode["latency"].items():
            size = int(name.removeprefix("batch_"))
            assert timing["prompt_tokens"] == 7 and timing["repeats"] == 3
            assert figures["decode_tokens_per_s"][name] == pytest.approx(size * 5 / timing["median_s"])
            assert timing["peak_memory_bytes"] > 0
        assert {"batch_1", "batch_4"} <= set(figures) and figures["batch_4"]["peak_memory_bytes"] > 0
    figures = headline_figures(record)
    assert figures["perf/decode_tokens_per_s_batch_3"] == perf["cpu"]["decode_tokens_per_s"]["batch_3"]
    assert figures["perf/peak_memory_batch_4_bytes"] == perf["cpu"]["batch_4"]["peak_memory_bytes"]
    assert figures["perf/train_tokens_per_s"] == record["train_tokens_per_s"]


def test_decode_prompts_are_real_tokens_cut_to_the_shortest():
    class Loader:
        dataset = [{"input_ids": [5, 6, 7, 8]}, {"input_ids": [9, 10]}]

        @staticmethod
        def collate_fn(rows):
            ids = torch.zeros(len(rows), 4, dtype=torch.long)
            mask = torch.zeros(len(rows), 4, dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
                mask[i, : len(r["input_ids"])] = 1
            return {"input_ids": ids, "attention_mask": mask}

    assert measure.decode_prompts(Loader, 3, 3).tolist() == [[5, 6], [9, 10], [5, 6]]
    assert measure.decode_prompts(Loader, 1, 3).tolist() == [[5, 6, 7]]


def test_decoding_is_skipped_for_a_model_that_cannot_generate():
    assert not measure.can_generate(torch.nn.Linear(2, 2))
    assert measure.decode_settings({"decode_batch_sizes": []}) is None
    assert measure.decode_settings({})["batch_sizes"] == [1, 12]
    with pytest.raises(SqueezeError, match="decode_new_tokens=0"):
        measure.measure_decoding(torch.nn.Linear(2, 2), None, new_tokens=0)


@pytest.mark.parametrize("reset", [True, False], ids=["vmhwm-reset", "sampled"])
def test_peak_memory_sees_a_batch_s_allocation_and_keeps_the_process_peak(reset, monkeypatch):
    if not reset:
        monkeypatch.setattr(measure, "_reset_rss_peak", lambda: False)
    process_peak = measure.process_peak_rss()
    size = 64 * 2**20
    with measure.PeakMemory("cpu") as peak:
        # A fresh anonymous mapping, written so it is resident: the allocator cannot hand back pages an earlier
        # test left resident (torch.ones could, late in a long test session, and then RSS would not move).
        block = mmap.mmap(-1, size)
        block.write(b"\1" * size)
        time.sleep(0.05)  # the sampler's turn
        block.close()
    figures = peak.record()
    if figures["peak_memory_kind"] == "unavailable":
        pytest.skip("this system reports no resident set size")
    assert figures["peak_memory_kind"] == ("cpu_rss" if reset else "cpu_rss_sampled")
    assert figures["peak_increase_bytes"] >= 0.9 * size
    assert measure.process_peak_rss() >= process_peak  # the kernel's reset does not lower the process peak


def test_perf_devices_all_is_the_cpu_and_the_gpu_where_there_is_one(monkeypatch):
    seen = []

    def fake(model, loader, sizes, warmup, repeats, device, decode):
        seen.append(device)
        return {"latency": {"batch_1": {"median_s": 0.01}}, device: {}}  # as measure_inference: its own key too

    monkeypatch.setattr(measure, "measure_inference", fake)

    class Data:
        def test_dataloader(self):
            return None

    perf = {"devices": "all", "batch_sizes": [1], "warmup": 0, "repeats": 1, "decode_batch_sizes": [],
            "train_batch_sizes": []}
    for gpu in (False, True):
        seen.clear()
        monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
        figures = measure.of_run(torch.nn.Linear(2, 2), Data(), perf, "cpu")
        assert seen == (["cpu", "cuda"] if gpu else ["cpu"])
        assert ("by_device" in figures) == gpu and "cpu" in figures
    with pytest.raises(SqueezeError, match=r"perf.devices='gpu': give a list"):
        measure.of_run(torch.nn.Linear(2, 2), Data(), {**perf, "devices": "gpu"}, "cpu")


def test_a_bad_perf_devices_is_refused_before_the_run_loads(tmp_path):
    from squeeze.config import check_before_loading

    with pytest.raises(SqueezeError, match=r"^perf.devices='gpu': give a list \(\[cpu\], \[cpu,cuda\]\), all"):
        check_before_loading(compose_cfg("train", ["perf.devices=gpu"], tmp_path))
    check_before_loading(compose_cfg("train", ["perf.devices=all"], tmp_path))
