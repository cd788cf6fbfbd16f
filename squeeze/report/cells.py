"""Reading result records into cells: one flat row of figures per run (quality, size, latency, energy, ...).
Old records lack some keys; their figures are None."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from squeeze.errors import SqueezeError
from squeeze.record import RESULT_FILE, read_record

BASELINE = "none"  # the chain of a record that names none, and what Δ% is measured against


def _dig(data: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def _scaled(value: Any, factor: float) -> float | None:
    return None if value is None else float(value) * factor


def record_sparsity(record: dict) -> float | None:
    """Top-level `sparsity`, else the last compressor in the chain that recorded one (a pruner's summary)."""
    if record.get("sparsity") is not None:
        return record["sparsity"]
    compress = record.get("compress") or {}
    found = [_dig(compress, name, "sparsity") for name in compress.get("chain") or []]
    return next((s for s in reversed(found) if isinstance(s, (int, float))), None)


# Figures read from every record (besides quality and the best validation value, which depend on the
# task's metric): column -> (header, reader). Old records lack perf/energy/sparsity: None.
FIGURES: dict[str, tuple[str, Callable[[dict], Any]]] = {
    "size_mb": ("size MB", lambda r: _scaled(r.get("checkpoint_bytes"), 1e-6)),
    "params": ("params", lambda r: r.get("params")),
    "nonzero_params": ("nonzero params", lambda r: r.get("nonzero_params")),
    "sparsity": ("sparsity", lambda r: record_sparsity(r)),
    "latency_ms": ("latency ms (b1)", lambda r: _scaled(_dig(r, "perf", "latency", "batch_1", "median_s"), 1e3)),
    "throughput": ("throughput ex/s", lambda r: _dig(r, "perf", "throughput", "examples_per_s")),
    "tokens_per_s": ("tokens/s", lambda r: _dig(r, "perf", "throughput", "tokens_per_s")),
    "train_s": ("train s", lambda r: r.get("train_seconds")),
    "eval_s": ("eval s", lambda r: r.get("eval_seconds")),
    "peak_memory_mb": ("peak memory MB", lambda r: _scaled(r.get("peak_memory_bytes"), 1e-6)),
    "energy_kwh": ("energy kWh", lambda r: _dig(r, "energy", "kwh")),
    "co2_kg": ("CO2 kg", lambda r: _dig(r, "energy", "co2_kg")),
}
AGGREGATED = ("quality", "validation_best", *FIGURES)
WHERE = {"size_mb": "checkpoint_bytes", "latency_ms": "perf.latency.batch_1", "energy_kwh": "energy.kwh",
         "validation_best": "validation.best", "sparsity": "sparsity"}


def find_results(paths: Sequence[str | Path]) -> list[Path]:
    """The result.json files under sweep or run directories (or named directly), each once."""
    if not paths:
        raise SqueezeError("no paths given; pass a sweep directory (multirun/<time>) or run directories")
    found: dict[Path, None] = {}
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            raise SqueezeError(f"{path} does not exist; pass a sweep directory (multirun/<time>) or run "
                               "directories that hold result.json")
        if path.is_file():
            if path.name != RESULT_FILE:
                raise SqueezeError(f"{path} is not a {RESULT_FILE}; pass its run directory or a sweep directory")
            hits = [path]
        else:
            hits = sorted(path.rglob(RESULT_FILE))
            if not hits:
                raise SqueezeError(f"no {RESULT_FILE} under {path}; pass a squeeze sweep or run directory (a run "
                                   "writes its result.json when it ends)")
        for hit in hits:
            found.setdefault(hit.resolve(), None)
    return list(found)


def quality_metric(record: dict) -> tuple[str | None, str]:
    """('test/<name>', 'max'|'min') from config.task.monitor ('val/<name>') and monitor_mode."""
    task = _dig(record, "config", "task") or {}
    validation = record.get("validation") or {}
    monitor = task.get("monitor") or validation.get("monitor")
    mode = task.get("monitor_mode") or validation.get("mode") or "max"
    return ("test/" + str(monitor).split("/", 1)[-1] if monitor else None), str(mode)


def cell(record: dict, source: Path) -> dict[str, Any]:
    """One record flattened into the figures the report compares."""
    choices = record.get("choices") or {}
    metric, mode = quality_metric(record)
    metrics = record.get("metrics") or {}
    status = "ok" if record.get("status") == "ok" else "failed"
    error = record.get("error")
    if status != "ok" and not error:
        error = f"status {record.get('status')!r}: the run did not finish"
    row: dict[str, Any] = {
        "run_dir": record.get("run_dir") or str(source.parent),
        "status": status,
        "error": error,
        "model": str(choices.get("model") or "?"),
        "task": str(choices.get("task") or _dig(record, "config", "task", "name") or "?"),
        "chain": str(choices.get("compress") or BASELINE),
        "hardware": choices.get("hardware"),
        "seed": record.get("seed"),
        "lr": _dig(record, "config", "optimizer", "lr"),
        "metric": metric,
        "mode": mode,
        "quality": metrics.get(metric) if metric else None,
        "validation_best": _dig(record, "validation", "best"),
    }
    row.update({name: read(record) for name, (_, read) in FIGURES.items()})
    row["energy_method"] = _dig(record, "energy", "method")
    # An evaluate.py record (a finished run quantized after training, or a zero-shot model) trained
    # nothing: its own energy is the evaluation's alone, so beside full runs' train+eval figures it
    # would read as a 90% saving. Its cost columns stay empty; the figure is kept as eval_energy_kwh.
    row["evaluated_from"] = record.get("ckpt")
    row["eval_energy_kwh"] = None
    if status == "ok" and not record.get("train_seconds"):
        row["eval_energy_kwh"] = row["energy_kwh"]
        row["train_s"] = row["energy_kwh"] = row["co2_kg"] = None
    row["metrics"] = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    if status == "ok" and row["quality"] is None:
        have = ", ".join(sorted(metrics)) or "none"
        wanted = metric or "the task's monitor (config.task.monitor is missing)"
        raise SqueezeError(f"{source}: a finished run without its quality metric {wanted} (metrics: {have}); "
                           "re-run that cell or leave its directory out of the report")
    return row


def load_cells(paths: Sequence[str | Path]) -> tuple[list[dict], list[str]]:
    """Cells of every readable record, and a line for each result.json that could not be read."""
    cells, skipped = [], []
    for path in find_results(paths):
        try:
            record = read_record(path)
        except (OSError, ValueError) as e:
            skipped.append(f"{path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            continue
        if not isinstance(record, dict):
            skipped.append(f"{path}: not a result record")
            continue
        cells.append(cell(record, path))
    if not cells:
        raise SqueezeError(f"none of the result.json files could be read ({skipped[0]}); re-run those cells")
    return cells, skipped
