"""Energy and CO2 of a run, per phase (training, evaluation).

    IT energy      = CPU + RAM (codecarbon)  +  GPU (NVML, sampled here)
    facility kWh   = IT energy × PUE                      (default 1.59, the thesis' data-centre figure)
    CO2 kg         = facility kWh × grid intensity        (presets: US EPA 0.430, EEA 0.275 kg/kWh)

codecarbon measures the CPU through RAPL where the kernel exposes it and otherwise *estimates* it from
the CPU's TDP and this process's load; RAM is always an estimate. The GPU is measured through NVML:
the board's energy counter where it has one, else power samples (every `gpu_sample_secs`) integrated
over time. Every figure says which of these produced it (`method`), so a table never mixes a
measurement with an estimate without saying so.

`components`: "all" counts CPU + RAM + GPU; "gpu" counts the GPU alone, as the thesis measured (NVML power
every `gpu_sample_secs`, 5 s); on a machine without a GPU it counts CPU + RAM instead and says so (`components`
in the record: what was counted, never what was asked for).

PUE and the CO2 factor are applied here, not by codecarbon, so one documented formula covers every
component and the presets are the published numbers, not whatever a library version ships.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Sequence

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from squeeze.errors import SqueezeError

log = logging.getLogger("squeeze")

JOULES_PER_KWH = 3.6e6
DEFAULT_PUE = 1.59
# kg CO2 per kWh of electricity.
CO2_PRESETS = {
    "epa": 0.430,  # US EPA eGRID average, as used in the thesis
    "eea": 0.275,  # European Environment Agency EU-27 average, as used in the thesis
}
# CPU modes in which codecarbon reads a hardware energy counter instead of modelling power.
MEASURED_CPU_MODES = ("intel_rapl", "intel_power_gadget", "windows_emi", "apple_powermetrics")
COMPONENTS = ("all", "gpu")


def check_components(components: str) -> None:
    """callbacks.energy.components, also checked before a run loads anything (squeeze.config)."""
    if components not in COMPONENTS:
        raise SqueezeError(f"callbacks.energy.components={components!r} is not one of {list(COMPONENTS)} (all: "
                           "CPU + RAM + GPU; gpu: the GPU alone, as the thesis measured)")


# -- arithmetic (pure) ------------------------------------------------------------------------------
def integrate_power(times_s: Sequence[float], watts: Sequence[float]) -> float:
    """Joules under a sampled power trace (trapezoid rule between consecutive samples)."""
    if len(times_s) != len(watts):
        raise ValueError("times and power samples differ in length")
    joules = 0.0
    for i in range(1, len(times_s)):
        joules += 0.5 * (watts[i] + watts[i - 1]) * (times_s[i] - times_s[i - 1])
    return joules


def co2_factor(co2: str | float) -> float:
    """kg CO2 per kWh from a preset name ('epa', 'eea') or a number."""
    if isinstance(co2, str):
        if co2.lower() not in CO2_PRESETS:
            try:
                return co2_factor(float(co2))
            except ValueError:
                raise SqueezeError(
                    f"callbacks.energy.co2={co2!r} is neither a preset ({', '.join(CO2_PRESETS)}) nor a number "
                    "of kg CO2 per kWh"
                ) from None
        return CO2_PRESETS[co2.lower()]
    if not co2 >= 0:
        raise SqueezeError(f"callbacks.energy.co2={co2} must be a non-negative number of kg CO2 per kWh")
    return float(co2)


def facility(kwh_it: float, pue: float, kg_per_kwh: float) -> tuple[float, float]:
    """(facility kWh, kg CO2) from the IT equipment's kWh."""
    kwh = kwh_it * pue
    return kwh, kwh * kg_per_kwh


# -- GPU through NVML ---------------------------------------------------------------------------------
class GpuPowerSampler:
    """Samples the power of the visible GPUs in a background thread while a phase runs.

    `read_watts` (a list of per-GPU watts) and `read_joules` (a list of per-GPU energy counters, or
    None when a board has none) are injectable so the integration is testable without a GPU.
    """

    def __init__(
        self,
        interval_s: float = 5.0,
        read_watts: Callable[[], list[float]] | None = None,
        read_joules: Callable[[], list[float] | None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.interval_s = interval_s
        self.read_watts = read_watts
        self.read_joules = read_joules
        self.clock = clock
        self.times: list[float] = []
        self.watts: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._joules_at_start: list[float] | None = None

    @classmethod
    def for_visible_gpus(cls, interval_s: float) -> "GpuPowerSampler | None":
        """A sampler over NVML's devices, or None when there is no NVIDIA GPU / driver."""
        try:
            import pynvml

            pynvml.nvmlInit()
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception:  # no driver, no library, no device: nothing to measure
            return None
        if not handles:
            return None

        def read_watts() -> list[float]:
            return [pynvml.nvmlDeviceGetPowerUsage(h) / 1000.0 for h in handles]  # mW → W

        def read_joules() -> list[float] | None:
            try:  # Volta and newer: a cumulative energy counter in mJ, exact between two reads
                return [pynvml.nvmlDeviceGetTotalEnergyConsumption(h) / 1000.0 for h in handles]
            except Exception:
                return None

        return cls(interval_s, read_watts, read_joules)

    def _sample(self) -> None:
        self.times.append(self.clock())
        self.watts.append(float(sum(self.read_watts())))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def start(self) -> None:
        self.times, self.watts = [], []
        self._joules_at_start = self.read_joules() if self.read_joules else None
        self._sample()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="squeeze-gpu-power", daemon=True)
        self._thread.start()

    def stop(self) -> tuple[float, str]:
        """(joules over the phase, method)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        if self._joules_at_start is not None:
            now = self.read_joules() if self.read_joules else None
            if now is not None:
                return float(sum(now) - sum(self._joules_at_start)), "measured (NVML energy counter)"
        return integrate_power(self.times, self.watts), f"measured (NVML power every {self.interval_s:g} s)"


# -- CPU and RAM through codecarbon ------------------------------------------------------------------
class CpuRamTracker:
    """codecarbon's offline tracker for CPU and RAM energy of this process (or the whole machine)."""

    def __init__(self, country_iso_code: str, tracking_mode: str, interval_s: float):
        self.country_iso_code = country_iso_code
        self.tracking_mode = tracking_mode
        self.interval_s = interval_s
        self._tracker = None

    def start(self) -> None:
        from codecarbon import OfflineEmissionsTracker

        # codecarbon logs every sample at INFO and warns about concurrent trackers (sweeps run
        # several on purpose); its figures reach the record instead.
        logging.getLogger("codecarbon").setLevel(logging.ERROR)
        self._tracker = OfflineEmissionsTracker(
            country_iso_code=self.country_iso_code,
            tracking_mode=self.tracking_mode,
            measure_power_secs=self.interval_s,
            save_to_file=False,
            log_level="error",
            allow_multiple_runs=True,
            gpu_ids=[],  # the GPU is measured by GpuPowerSampler, never twice
            pue=1.0,  # PUE is applied by squeeze, once, to every component
        )
        self._tracker.start()

    def stop(self) -> dict[str, Any]:
        tracker, self._tracker = self._tracker, None
        tracker.stop()
        data = tracker.final_emissions_data
        cpu_mode = next((getattr(h, "_mode", None) for h in tracker._hardware if type(h).__name__ == "CPU"), None)
        cpu_method = "measured (RAPL)" if cpu_mode in MEASURED_CPU_MODES else f"estimated (codecarbon {cpu_mode}: TDP × load)"
        return {
            "cpu_kwh": float(data.cpu_energy),
            "ram_kwh": float(data.ram_energy),
            "cpu_method": cpu_method,
            "ram_method": "estimated (codecarbon: RAM size model)",
            "cpu_model": data.cpu_model,
        }


# -- the callback -------------------------------------------------------------------------------------
class EnergyMeter(L.Callback):
    """Measures the training phase (fit, validation included) and the evaluation phase (test); the run
    measures its compression work (prepare, finalize) as the `compress` phase through start/stop.

    `record()` gives result.json's `energy` section; each phase is also logged as `energy/<phase>_kwh`
    and `energy/<phase>_co2_kg`. Runs on global rank 0 (codecarbon's machine-level CPU/RAM model and
    NVML see the whole node; per-rank trackers would count it once per process).
    """

    def __init__(
        self,
        pue: float = DEFAULT_PUE,
        co2: str | float = "epa",
        country_iso_code: str = "USA",
        tracking_mode: str = "process",
        cpu_sample_secs: float = 5.0,
        gpu_sample_secs: float = 5.0,
        components: str = "all",
    ):
        if not pue >= 1.0:
            raise SqueezeError(f"callbacks.energy.pue={pue}: a power usage effectiveness is ≥ 1 (1.0 = no overhead)")
        if tracking_mode not in ("process", "machine"):
            raise SqueezeError(f"callbacks.energy.tracking_mode={tracking_mode!r} must be 'process' or 'machine'")
        check_components(components)
        self.components = components
        self.pue = float(pue)
        self.co2_name = str(co2)
        self.kg_per_kwh = co2_factor(co2)
        self.country_iso_code = country_iso_code
        self.tracking_mode = tracking_mode
        self.cpu_sample_secs = cpu_sample_secs
        self.gpu_sample_secs = gpu_sample_secs
        self.phases: dict[str, dict[str, Any]] = {}
        self._running: dict[str, tuple[float, CpuRamTracker | None, GpuPowerSampler | None]] = {}

    # phases
    @rank_zero_only
    def start(self, phase: str) -> None:
        gpu = GpuPowerSampler.for_visible_gpus(self.gpu_sample_secs)
        cpu = None
        if self.components == "all" or gpu is None:  # gpu-only without a GPU: CPU + RAM, said in the record
            cpu = CpuRamTracker(self.country_iso_code, self.tracking_mode, self.cpu_sample_secs)
            try:
                cpu.start()
            except Exception as e:  # energy is a measurement of the run, never a reason to lose it
                log.warning("energy: codecarbon could not start (%s); CPU/RAM energy not recorded", e)
                cpu = None
        if gpu is not None:
            gpu.start()
        self._running[phase] = (time.perf_counter(), cpu, gpu)

    @rank_zero_only
    def stop(self, phase: str, trainer: L.Trainer | None = None) -> None:
        if phase not in self._running:
            return
        started, cpu, gpu = self._running.pop(phase)
        seconds = time.perf_counter() - started
        parts = cpu.stop() if cpu is not None else {}
        methods = {k.removesuffix("_method"): v for k, v in parts.items() if k.endswith("_method")}
        kwh_it = parts.get("cpu_kwh", 0.0) + parts.get("ram_kwh", 0.0)
        if gpu is not None:
            joules, methods["gpu"] = gpu.stop()
            parts["gpu_kwh"] = joules / JOULES_PER_KWH
            kwh_it += parts["gpu_kwh"]
        kwh, co2 = facility(kwh_it, self.pue, self.kg_per_kwh)
        figures = {"kwh": kwh, "co2_kg": co2, "kwh_it": kwh_it, "seconds": seconds,
                   **{k: v for k, v in parts.items() if k.endswith("_kwh")}}
        earlier = self.phases.get(phase)
        if earlier is not None:  # a phase entered again (compression before and after fit) adds up
            figures = {k: v + earlier.get(k, 0.0) for k, v in figures.items()}
            methods = {**earlier["methods"], **methods}
        counted = "+".join(part for part in ("cpu", "ram", "gpu") if part in methods)
        self.phases[phase] = {**figures, "methods": methods, "method": summarise_methods(methods),
                              "components": counted or "none"}
        if trainer is not None:
            for logger in trainer.loggers:
                logger.log_metrics({f"energy/{phase}_kwh": kwh, f"energy/{phase}_co2_kg": co2}, step=trainer.global_step)

    def record(self) -> dict[str, Any] | None:
        """result.json's `energy`: totals over the phases measured, and each phase."""
        if not self.phases:
            return None
        kwh = sum(p["kwh"] for p in self.phases.values())
        methods = {f"{phase}/{part}": m for phase, p in self.phases.items() for part, m in p["methods"].items()}
        return {
            "kwh": kwh,
            "co2_kg": kwh * self.kg_per_kwh,
            "method": summarise_methods(methods),
            # what was counted (cpu+ram+gpu, gpu, cpu+ram), and what was asked for (all | gpu)
            "components": "+".join(sorted({c for p in self.phases.values() for c in p["components"].split("+")}
                                          - {"none"}, key=("cpu", "ram", "gpu").index)) or "none",
            "components_asked": self.components,
            "pue": self.pue,
            "co2": self.co2_name,
            "co2_kg_per_kwh": self.kg_per_kwh,
            "country_iso_code": self.country_iso_code,
            "phases": self.phases,
        }

    # Lightning hooks: a phase is a fit or a test pass
    def on_fit_start(self, trainer, pl_module):
        self.start("train")

    def on_fit_end(self, trainer, pl_module):
        self.stop("train", trainer)

    def on_test_start(self, trainer, pl_module):
        self.start("eval")

    def on_test_end(self, trainer, pl_module):
        self.stop("eval", trainer)

    def on_exception(self, trainer, pl_module, exception):
        for phase in list(self._running):
            self.stop(phase)


def meter(callbacks) -> EnergyMeter | None:
    """The run's energy meter among its callbacks; None when callbacks.energy=null."""
    return next((c for c in callbacks if isinstance(c, EnergyMeter)), None)


def measured(callbacks) -> dict[str, Any] | None:
    """result.json's `energy` from the run's meter, or None without one."""
    found = meter(callbacks)
    return found.record() if found is not None else None


def summarise_methods(methods: dict[str, str]) -> str:
    """'estimated' when no component was measured, 'measured' when all were, else 'partly measured'."""
    kinds = {m.split(" ")[0] for m in methods.values()}
    if not kinds:
        return "none"
    if kinds == {"measured"}:
        return "measured"
    return "estimated" if "measured" not in kinds else "partly measured"
