"""Reading result records into cells: one flat row of figures per run (quality, size, latency, energy, ...).
Old records lack some keys; their figures are None."""

from __future__ import annotations

import re
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


def pruned_matrices(record: dict) -> tuple[int, float] | None:
    """(parameters of the matrices the chain's last pruner ranked, their sparsity): its compress.<name>.pruned_params
    and sparsity; None without a pruner that recorded them."""
    compress = record.get("compress") or {}
    for name in reversed(compress.get("chain") or []):
        total, sparsity = _dig(compress, name, "pruned_params"), _dig(compress, name, "sparsity")
        if isinstance(total, int) and isinstance(sparsity, (int, float)):
            return total, float(sparsity)
    return None


def _metric(name: str) -> Callable[[dict], Any]:
    return lambda r: _dig(r, "metrics", name)


def _speculative(key: str) -> Callable[[dict], Any]:
    # speculative.<key>, or where squeeze/measure/speculative.py puts it today: speculative.speculative.<key>.
    def read(r: dict) -> Any:
        value = _dig(r, "speculative", key)
        return value if value is not None else _dig(r, "speculative", "speculative", key)
    return read


def _it_kwh(energy: Any) -> float | None:
    if not isinstance(energy, dict) or energy.get("kwh") is None or not energy.get("pue"):
        return None
    return float(energy["kwh"]) / float(energy["pue"])


# Test metrics beside the monitored one (the table leaves out the one that is the quality column).
# Every test metric a task records has one (NER's token accuracy, the test loss too); a test keeps it so.
METRIC_FIGURES = {"accuracy": ("accuracy", "test/accuracy"), "accuracy_norm": ("acc_norm", "test/accuracy_norm"), "token_accuracy": ("token accuracy", "test/token_accuracy"),
                  "f1": ("F1", "test/f1"),
                  "precision": ("precision", "test/precision"), "recall": ("recall", "test/recall"),
                  "last_word_accuracy": ("last-word acc", "test/last_word_accuracy"),
                  "last_word_perplexity": ("last-word ppl", "test/last_word_perplexity"),
                  "hits_1": ("Hits@1", "test/hits@1"), "hits_5": ("Hits@5", "test/hits@5"),
                  "hits_10": ("Hits@10", "test/hits@10"), "bleu": ("BLEU", "test/bleu"), "ter": ("TER", "test/ter"),
                  "bertscore_f1": ("BERTScore F1", "test/bertscore_f1"), "loss": ("test loss", "test/loss")}
# Figures read from every record (besides quality and the best validation value, which depend on the
# task's metric): column -> (header, reader). Old records lack perf/energy/sparsity: None. Records that
# lack a figure leave its cell blank; a column nobody in a model × task recorded is left out of its table.
FIGURES: dict[str, tuple[str, Callable[[dict], Any]]] = {
    **{name: (header, _metric(metric)) for name, (header, metric) in METRIC_FIGURES.items()},
    "size_mb": ("size MB", lambda r: _scaled(r.get("checkpoint_bytes"), 1e-6)),
    "params": ("params", lambda r: r.get("params")),
    "nonzero_params": ("nonzero params", lambda r: r.get("nonzero_params")),
    # The pruned matrices alone (a study that counts "the model" as them: GPT-2's attention and MLP weights).
    "pruned_matrices_params": ("pruned-matrix params", lambda r: (pruned_matrices(r) or (None,))[0]),
    "pruned_matrices_nonzero": ("pruned-matrix nonzero", lambda r: round(pm[0] * (1 - pm[1]))
                                if (pm := pruned_matrices(r)) else None),
    "sparsity": ("sparsity", lambda r: record_sparsity(r)),
    "latency_ms": ("latency ms (b1)", lambda r: _scaled(_dig(r, "perf", "latency", "batch_1", "median_s"), 1e3)),
    "throughput": ("throughput ex/s", lambda r: _dig(r, "perf", "throughput", "examples_per_s")),
    "tokens_per_s": ("tokens/s", lambda r: _dig(r, "perf", "throughput", "tokens_per_s")),
    "train_tokens_per_s": ("train tokens/s", lambda r: r.get("train_tokens_per_s")),
    # hardware=pipeline: tokens/s over the iterations of pipeline.window alone (past the first steps' warm-up).
    "pipeline_window_tokens_per_s": ("pipeline window train tok/s",
                                     lambda r: _dig(r, "pipeline", "window", "tokens_per_s")),
    "train_loss": ("train loss", _metric("train/loss")),
    "stage_peak_mb": ("peak MB per stage", lambda r: _scaled(max((s.get("peak_memory_bytes") or 0 for s in
                                                                 _dig(r, "pipeline", "per_stage") or []), default=None), 1e-6)),
    "train_s": ("train s", lambda r: r.get("train_seconds")),
    "eval_s": ("eval s", lambda r: r.get("eval_seconds")),
    # The evaluation pass alone (trainer.test over the test split): what a study's "runtime / energy" columns
    # mean when they time the model's use, not its making (energy's `eval` phase, facility kWh).
    "eval_kwh": ("eval kWh", lambda r: _dig(r, "energy", "phases", "eval", "kwh")),
    "peak_memory_mb": ("peak memory MB", lambda r: _scaled(r.get("peak_memory_bytes"), 1e-6)),
    # Right after the model was built or loaded (memory_after_load.kind: tensors allocated on the GPU, or the
    # model's tensor bytes on CPU, where the process's resident set also holds earlier cells of a sweep).
    "memory_after_load_mb": ("memory after load MB", lambda r: _scaled(_dig(r, "memory_after_load", "bytes"), 1e-6)),
    "energy_kwh": ("energy kWh", lambda r: _dig(r, "energy", "kwh")),
    # The IT equipment's own energy: the facility figure without the data centre's overhead (÷ PUE).
    "it_energy_kwh": ("IT kWh", lambda r: _it_kwh(r.get("energy"))),
    "co2_kg": ("CO2 kg", lambda r: _dig(r, "energy", "co2_kg")),
    # squeeze/run/cost.py: beyond the model the row started from, that plus the starting model, and per 1,000 test
    # examples or scored tokens of the evaluation pass.
    "own_s": ("own s", lambda r: _dig(r, "cost", "own", "seconds")),
    "own_kwh": ("own kWh", lambda r: _dig(r, "cost", "own", "kwh")),
    "total_s": ("total s", lambda r: _dig(r, "cost", "total", "seconds")),
    "total_kwh": ("total kWh", lambda r: _dig(r, "cost", "total", "kwh")),
    "inference_kwh_per_1k": ("inference kWh/1k", lambda r: _dig(r, "cost", "inference", "kwh_per_1k")),
    "spec_acceptance": ("spec. acceptance", _speculative("acceptance_rate")),
    "spec_speedup": ("spec. speed-up", _speculative("speedup")),
}
AGGREGATED = ("quality", "validation_best", *FIGURES)

# Figures per device and batch size, named `<figure>.<device>.batch_<n>`: figure -> header. Training throughput
# at a fixed batch size (perf.train_batch_sizes) is `train_tokens_per_s.<device>.batch_<n>`.
PER_BATCH = {"peak_memory_mb": "peak MB", "decode_tokens_per_s": "decode tok/s", "train_tokens_per_s": "train tok/s",
             "latency_ms": "latency ms"}  # latency per device: CPU and GPU side by side (perf.devices=[cpu,cuda])
_PERF_KEYS = ("device", "threads", "latency", "throughput", "warmup", "peak_memory_bytes", "peak_memory_kind",
              "by_device", "decode_tokens_per_s", "train")


def _perf_by_device(record: dict) -> dict[str, dict]:
    """perf's figures per device: perf.by_device.<device>, perf.<device> (a dict under a device's name),
    and perf itself for perf.device."""
    perf = record.get("perf")
    if not isinstance(perf, dict):
        return {}
    found: dict[str, dict] = {}
    if perf.get("device"):
        found[str(perf["device"])] = perf
    for device, sub in (perf.get("by_device") or {}).items():
        if isinstance(sub, dict):
            found[str(device)] = sub
    for key, sub in perf.items():
        if key not in _PERF_KEYS and not key.startswith("batch_") and isinstance(sub, dict):
            found[str(key)] = {**found.get(str(key), {}), **sub}
    return found


def per_batch_figures(record: dict) -> dict[str, float]:
    """`latency_ms.<device>.batch_<n>` from perf.<device>.latency.batch_<n>.median_s,
    `peak_memory_mb.<device>.batch_<n>` from perf.<device>.batch_<n>.peak_memory_bytes (or
    perf.<device>.latency.batch_<n>.peak_memory_bytes), `decode_tokens_per_s.<device>.batch_<n>` from
    perf.<device>.decode_tokens_per_s.batch_<n> and `train_tokens_per_s.<device>.batch_<n>` from
    perf[.by_device.<device>].train.batch_<n>.tokens_per_s; nothing for records without them (or a batch size
    that recorded a reason instead)."""
    out: dict[str, float] = {}
    for device, perf in _perf_by_device(record).items():
        batches = {k: v for k, v in perf.items() if k.startswith("batch_") and isinstance(v, dict)}
        for k, v in (perf.get("latency") or {}).items():
            if isinstance(v, dict) and v.get("peak_memory_bytes") is not None:
                batches.setdefault(k, v)
        for batch, figures in batches.items():
            if isinstance(figures.get("peak_memory_bytes"), (int, float)):
                out[f"peak_memory_mb.{device}.{batch}"] = figures["peak_memory_bytes"] * 1e-6
        for batch, figures in (perf.get("latency") or {}).items():
            if isinstance(figures, dict) and isinstance(figures.get("median_s"), (int, float)):
                out[f"latency_ms.{device}.{batch}"] = figures["median_s"] * 1e3
        for batch, value in (perf.get("decode_tokens_per_s") or {}).items():
            if isinstance(value, (int, float)):
                out[f"decode_tokens_per_s.{device}.{batch}"] = float(value)
        train = perf.get("train") if isinstance(perf.get("train"), dict) else {}
        for batch, figures in train.items():
            if batch.startswith("batch_") and isinstance((figures or {}).get("tokens_per_s"), (int, float)):
                out[f"train_tokens_per_s.{device}.{batch}"] = float(figures["tokens_per_s"])
    return out


def per_batch_header(name: str) -> str:
    figure, device, batch = name.split(".", 2)
    return f"{PER_BATCH[figure]} b{batch.removeprefix('batch_')} ({device})"


def _batch_order(name: str) -> tuple:
    figure, device, batch = name.split(".", 2)
    size = batch.removeprefix("batch_")
    return (list(PER_BATCH).index(figure), device, int(size) if size.isdigit() else 0, size)


def sort_per_batch(names) -> list[str]:
    return sorted(set(names), key=_batch_order)


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        return {prefix: data} if prefix else {}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return {k.rstrip("."): v for k, v in out.items()}


def compress_settings(record: dict, chain: str) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Per compressor of the chain: its settings (config.compress.<name>, nested keys joined with dots,
    `label` left out) and its `label` where it has one. A compressor the config does not hold (a
    checkpoint's own compression in an evaluate.py record) has no settings."""
    compress = _dig(record, "config", "compress") or {}
    settings, labels = {}, {}
    for name in ([] if chain == BASELINE else chain.split("+")):
        node = compress.get(name) if isinstance(compress, dict) else None
        flat = _flat(node) if isinstance(node, dict) else {}
        label = flat.pop("label", None)
        if label not in (None, ""):
            labels[name] = str(label)
        # Distillation: what tells cells apart is the teacher they learned from, not how it was found
        # (teacher=auto, teacher_best_of={seed: [42]} and a path naming the same stored baseline are one teacher).
        source = _dig(record, "compress", name, "teacher", "source")
        if source is not None and "teacher" in flat:
            flat = {k: v for k, v in flat.items() if k != "teacher_best_of" and not k.startswith("teacher_best_of.")}
            flat["teacher"] = source
        settings[name] = flat
    return settings, labels
WHERE = {"size_mb": "checkpoint_bytes", "latency_ms": "perf.latency.batch_1", "energy_kwh": "energy.kwh",
         "total_kwh": "cost.total.kwh",
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
            hits = sorted(path.rglob(RESULT_FILE), key=_natural)  # a sweep's cells in job order: 2_ before 10_
            if not hits:
                raise SqueezeError(f"no {RESULT_FILE} under {path}; pass a squeeze sweep or run directory (a run "
                                   "writes its result.json when it ends)")
        for hit in hits:
            found.setdefault(hit.resolve(), None)
    return list(found)


def _natural(path: Path) -> list:
    """Sort key that orders the numbers in a path by value (Hydra's job directories 0_, 1_, ..., 10_)."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", str(path))]


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
    # A pipeline-parallel run (hardware=pipeline) ran on CPU processes: the same population as hardware=cpu, a row
    # of its own beside the one-process run of the same chain.
    stages = record.get("pipeline") if isinstance(record.get("pipeline"), dict) else None
    row["variant"] = None
    if stages:
        row["hardware"] = "cpu" if row["hardware"] == "pipeline" else row["hardware"]
        row["variant"] = f"pipeline {stages.get('stages')} stages {stages.get('schedule') or ''}".strip()
        # compress=none carries no label (labels belong to compressors): pipeline rows at several batch sizes are
        # told apart by it, as recorded.
        if stages.get("batch_size") is not None:
            row["variant"] += f" batch {stages['batch_size']}"
    row.update({name: read(record) for name, (_, read) in FIGURES.items()})
    # Per device and batch size (peak memory, decoding throughput): only the ones the record has.
    row["per_batch"] = per_batch_figures(record)
    row["settings"], row["labels"] = compress_settings(record, row["chain"])
    row["row"] = None  # the report row it belongs to, set when grouped
    # A preset's report section (config.report): its table's columns, the protocol its header cites and the
    # expected-validation plot's axis.
    row["table"] = _dig(record, "config", "report", "table")
    row["protocol"] = _dig(record, "config", "report", "protocol")
    row["evp_axis"] = _dig(record, "config", "report", "evp_axis")
    row["perplexity_protocol"] = record.get("perplexity") if isinstance(record.get("perplexity"), dict) else None
    row["hits_rank"] = record.get("hits_rank")  # dialog: lm | mc
    # A pruner's rounds (compress.imp.trajectory): sparsity -> the validation after retraining, train tokens/s.
    compress = record.get("compress") or {}
    row["trajectory"] = next((t for name in compress.get("chain") or []
                              if isinstance(t := _dig(compress, name, "trajectory"), list) and t), None)
    # What the cell spent, evaluate.py records included (the grid's totals).
    energy = record.get("energy") if isinstance(record.get("energy"), dict) else {}
    row["spent"] = {"train_s": record.get("train_seconds"), "eval_s": record.get("eval_seconds"),
                    "kwh": energy.get("kwh"), "co2_kg": energy.get("co2_kg"), "pue": energy.get("pue"),
                    "co2": energy.get("co2"), "co2_kg_per_kwh": energy.get("co2_kg_per_kwh"),
                    # what the energy counted and how: "cpu+ram estimated", "gpu measured" (records before
                    # callbacks.energy.components say nothing)
                    "counted": (f"{energy['components']} {energy.get('method', '')}".strip()
                                if energy.get("kwh") is not None and energy.get("components") else None)}
    # A cell on a stored baseline (squeeze.run.baselines) shows the model's whole cost in its row, but spent only
    # its own work (plus the baseline's training when it was the one that trained it): counted once.
    own = record.get("spent") if isinstance(record.get("spent"), dict) else {}
    row["spent"].update({"train_s": own["train_seconds"], "kwh": own.get("kwh"), "co2_kg": own.get("co2_kg")}
                        if "train_seconds" in own else {})
    row["energy_method"] = _dig(record, "energy", "method")
    # An evaluate.py record (a finished run quantized after training, or a zero-shot model) trained
    # nothing: its own energy is the evaluation's alone, so beside full runs' train+eval figures it
    # would read as a 90% saving. Its cost columns stay empty; the figure is kept as eval_energy_kwh.
    row["evaluated_from"] = record.get("ckpt")
    row["eval_energy_kwh"] = None
    if status == "ok" and not record.get("train_seconds"):
        row["eval_energy_kwh"] = row["energy_kwh"]
        row["train_s"] = row["energy_kwh"] = row["it_energy_kwh"] = row["co2_kg"] = None
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
    for order, path in enumerate(find_results(paths)):
        try:
            record = read_record(path)
        except (OSError, ValueError) as e:
            skipped.append(f"{path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            continue
        if not isinstance(record, dict):
            skipped.append(f"{path}: not a result record")
            continue
        cells.append(cell(record, path))
        cells[-1]["order"] = order  # the paths' order, then the sweep's job order: how rows are listed
    if not cells:
        raise SqueezeError(f"none of the result.json files could be read ({skipped[0]}); re-run those cells")
    return cells, skipped
