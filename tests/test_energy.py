"""Energy: integration of power traces, PUE and CO2 arithmetic, and the meter inside a real run."""

from __future__ import annotations

import csv
import time

import pytest

from squeeze import run
from squeeze.measure import energy
from squeeze.measure.energy import EnergyMeter, GpuPowerSampler, co2_factor, facility, integrate_power
from squeeze.errors import SqueezeError

from conftest import compose_cfg, fast


def test_integration_of_a_known_power_trace():
    # 100 W for 10 s, then a ramp 100 W → 300 W over 10 s, sampled every 5 s: 1000 J + 2000 J.
    times = [0, 5, 10, 15, 20]
    watts = [100, 100, 100, 200, 300]
    assert integrate_power(times, watts) == pytest.approx(3000.0)
    # An hour at 1 kW is one kWh.
    assert integrate_power([0, 3600], [1000, 1000]) / energy.JOULES_PER_KWH == pytest.approx(1.0)
    with pytest.raises(ValueError):
        integrate_power([0, 1], [5])


def test_pue_and_co2_presets():
    kwh, co2 = facility(2.0, 1.59, co2_factor("epa"))
    assert kwh == pytest.approx(3.18) and co2 == pytest.approx(3.18 * 0.430)
    assert co2_factor("EEA") == 0.275 and co2_factor("0.1") == 0.1 and co2_factor(0.5) == 0.5
    with pytest.raises(SqueezeError, match="neither a preset"):
        co2_factor("mars")
    with pytest.raises(SqueezeError, match="non-negative"):
        co2_factor(-1.0)
    with pytest.raises(SqueezeError, match="pue=0.9"):
        EnergyMeter(pue=0.9)


def test_gpu_sampler_integrates_its_samples_in_a_background_thread():
    sampler = GpuPowerSampler(interval_s=0.01, read_watts=lambda: [100.0, 50.0])  # two boards, 150 W
    sampler.start()
    time.sleep(0.2)
    joules, method = sampler.stop()
    assert len(sampler.times) >= 5  # the thread sampled between start and stop
    assert joules == pytest.approx(150.0 * (sampler.times[-1] - sampler.times[0]))
    assert method == "measured (NVML power every 0.01 s)"


def test_gpu_sampler_prefers_the_energy_counter():
    counter = iter([[10.0, 20.0], [40.0, 70.0]])  # joules at start, at stop
    sampler = GpuPowerSampler(interval_s=10, read_watts=lambda: [1.0], read_joules=lambda: next(counter))
    sampler.start()
    assert sampler.stop() == (80.0, "measured (NVML energy counter)")


def test_meter_in_a_run_records_both_phases_with_pue_co2_and_method(tmp_path, monkeypatch):
    # A fake GPU (constant 200 W) shows how a measured GPU and an estimated CPU combine.
    monkeypatch.setattr(GpuPowerSampler, "for_visible_gpus",
                        classmethod(lambda cls, interval_s: cls(0.01, read_watts=lambda: [200.0])))
    overrides = ["model=tiny_bert", "task=rotten_tomatoes", *fast("rotten_tomatoes"), "trainer.max_steps=3",
                 "callbacks.energy.co2=eea", "callbacks.energy.pue=1.5"]
    record = run.train(compose_cfg("train", overrides, tmp_path))
    e = record["energy"]
    assert set(e["phases"]) == {"train", "eval"}
    assert e["pue"] == 1.5 and e["co2_kg_per_kwh"] == 0.275
    for phase in e["phases"].values():
        assert phase["kwh_it"] == pytest.approx(phase["cpu_kwh"] + phase["ram_kwh"] + phase["gpu_kwh"])
        assert phase["kwh"] == pytest.approx(1.5 * phase["kwh_it"])
        assert phase["co2_kg"] == pytest.approx(0.275 * phase["kwh"])
        assert phase["gpu_kwh"] > 0 and phase["seconds"] > 0
        # 200 W over the phase, within the sampling granularity.
        assert phase["gpu_kwh"] * energy.JOULES_PER_KWH == pytest.approx(200 * phase["seconds"], rel=0.5)
        assert phase["methods"]["gpu"].startswith("measured")
    assert e["kwh"] == pytest.approx(sum(p["kwh"] for p in e["phases"].values()))
    # RAM energy is always codecarbon's estimate, so a run is at best "partly measured".
    assert e["method"] == "partly measured"
    # The logger holds the per-phase figures.
    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    assert any(r.get("energy/train_kwh") for r in rows) and any(r.get("energy/kwh") for r in rows)


def test_a_chains_compression_work_is_its_own_phase(tmp_path):
    # prepare (before fit) and finalize (after) add up into one `compress` phase: the row's own cost (squeeze.run.cost).
    overrides = ["model=tiny_bert", "task=rotten_tomatoes", *fast("rotten_tomatoes"), "trainer.max_steps=2",
                 "compress=dq", "perf=null"]
    record = run.train(compose_cfg("train", overrides, tmp_path))
    phases = record["energy"]["phases"]
    assert set(phases) == {"train", "compress", "eval"}
    assert phases["compress"]["seconds"] == pytest.approx(record["compress_seconds"], abs=0.01)
    assert phases["compress"]["kwh"] > 0 and record["energy"]["kwh"] == pytest.approx(sum(p["kwh"] for p in phases.values()))
    # dq trained nothing of its own: the fine-tuning here is what it started from.
    assert record["cost"]["own"]["kwh"] == pytest.approx(phases["compress"]["kwh"])
    assert record["cost"]["total"]["kwh"] == pytest.approx(phases["compress"]["kwh"] + phases["train"]["kwh"])


def test_a_run_without_energy_callback_records_none(tmp_path):
    overrides = ["model=tiny_bert", "task=rotten_tomatoes", *fast("rotten_tomatoes"), "trainer.max_steps=1",
                 "callbacks.energy=null", "perf=null"]
    record = run.train(compose_cfg("train", overrides, tmp_path))
    assert record["status"] == "ok" and record["energy"] is None and record["perf"] is None


def test_without_a_gpu_or_rapl_the_figures_say_estimated(tmp_path, monkeypatch):
    monkeypatch.setattr(GpuPowerSampler, "for_visible_gpus", classmethod(lambda cls, interval_s: None))
    monkeypatch.setattr(energy, "MEASURED_CPU_MODES", ())  # as on a VM without RAPL access
    overrides = ["model=tiny_bert", "task=rotten_tomatoes", *fast("rotten_tomatoes"), "trainer.max_steps=1"]
    e = run.train(compose_cfg("train", overrides, tmp_path))["energy"]
    assert e["method"] == "estimated" and e["kwh"] > 0
    assert e["phases"]["train"]["methods"]["cpu"].startswith("estimated (codecarbon")


def test_gpu_only_counts_the_gpu_alone_and_without_a_gpu_says_what_it_counted(tmp_path, monkeypatch):
    # The thesis' energy: GPU power only, sampled every 5 s (here a fake 200 W board sampled fast).
    monkeypatch.setattr(GpuPowerSampler, "for_visible_gpus",
                        classmethod(lambda cls, interval_s: cls(0.01, read_watts=lambda: [200.0])))
    overrides = ["model=tiny_bert", "task=rotten_tomatoes", *fast("rotten_tomatoes"), "trainer.max_steps=2",
                 "perf=null", "callbacks.energy.components=gpu"]
    e = run.train(compose_cfg("train", overrides, tmp_path / "gpu"))["energy"]
    assert (e["components"], e["components_asked"], e["method"]) == ("gpu", "gpu", "measured")
    for phase in e["phases"].values():
        assert "cpu_kwh" not in phase and "ram_kwh" not in phase
        assert phase["kwh_it"] == pytest.approx(phase["gpu_kwh"]) and phase["components"] == "gpu"
    # On a CPU-only machine gpu-only has nothing to count: CPU + RAM instead, estimated, and the record says so.
    monkeypatch.setattr(GpuPowerSampler, "for_visible_gpus", classmethod(lambda cls, interval_s: None))
    monkeypatch.setattr(energy, "MEASURED_CPU_MODES", ())
    e = run.train(compose_cfg("train", overrides, tmp_path / "cpu"))["energy"]
    assert (e["components"], e["components_asked"], e["method"]) == ("cpu+ram", "gpu", "estimated")
    assert e["kwh"] > 0
    # The default counts everything there is.
    e = run.train(compose_cfg("train", overrides[:-1], tmp_path / "all"))["energy"]
    assert (e["components"], e["components_asked"]) == ("cpu+ram", "all")
    # The report's totals say what the energy counted.
    from squeeze.report.cells import load_cells
    from squeeze.report.tables import totals_text

    text = totals_text(load_cells([tmp_path])[0], "the grid")
    assert "counted: cpu+ram estimated in 2, gpu measured in 1" in text
    with pytest.raises(SqueezeError, match="components='GPU' is not one of"):
        EnergyMeter(components="GPU")
    from squeeze.config import check_before_loading  # before anything loads, sweeps' cells included

    with pytest.raises(SqueezeError, match="^callbacks.energy.components='GPU' is not one of"):
        check_before_loading(compose_cfg("train", ["callbacks.energy.components=GPU"], tmp_path / "bad"))
