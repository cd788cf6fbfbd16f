"""Latency and decoding speed of several saved models measured side by side, in interleaved rounds.

A sweep's cells each time their model in their own process at their own moment; on a shared machine the
load changes between them, so a 5 % difference between rows cannot be told from noise. Here every row's
model is timed in one process on the same inputs, in rounds: a warm-up round, then `rounds` rounds that
each time every row once (A B C, B C A, C A B, ...: the starting row rotates so no row always runs right
after the same other one). A slowdown of the machine then hits every row of the round alike, and each
round gives one paired ratio per row against the baseline.

Rows. A sweep directory: every finished cell below it (status "ok", a saved model/) is a cell of the row
the report puts it in (squeeze.report's own grouping and labels, so the report can match them); the first
cell of a row with a model is the one timed (cells of a row differ in seed or learning rate, which does not
change the computation). A run directory given on its own is its own row, named by its directory. Rows are
grouped per model × task; every group is measured on its own, with inputs built once from the task's real
test examples (the group's baseline record's resolved config, as a run builds the data module (squeeze.run.build), and
its saved tokenizer) and given to every row of the group.

Baseline: the row named `--baseline` in its group, else the row of that chain (default `none`, as the
report's Δ%). A group without one has no ratios; a --baseline named explicitly that names no row at all,
or a name that fits several rows of a group, is an error.

What one turn of a row times (squeeze.measure's helpers): a forward pass at each of the record's
`perf.batch_sizes` (time_call: the median of `repeats` passes), and for decoders greedy decoding at each of
`perf.decode_batch_sizes` (measure_decoding: new tokens/s of the median of `decode_repeats` generates).

Summary per figure: the median over rounds and its 95 % confidence interval from order statistics: for
n rounds the interval [x_(j), x_(n+1-j)] of the sorted values covers the true median with probability
1 − 2·P(Binomial(n, ½) < j) whatever the distribution (the largest j that keeps that ≥ 0.95). It is exact
and needs no resampling; a bootstrap of a median from ~10 values jumps between a handful of values and
covers less than it claims. Below 6 rounds no j reaches 95 %: the interval is then [min, max] and
`coverage` says what it covers (5 rounds: 93.8 %). Ratios to the baseline are the per-round ratios
(row ÷ baseline in the same round: rounds are paired by construction) summarised the same way; latency
ratios below 1 and decode ratios above 1 mean faster than the baseline. The baseline's own ratio is 1.

Memory: the rows' models stay loaded for the whole measurement when their estimated size in memory (the
larger of the saved directory and 4 bytes per parameter: a sparse or packed file loads larger than it is on
disk) sums to at most half the available memory, which leaves room for activations, the decoding cache and
the other processes of a shared machine. Otherwise each row is loaded before its turn and freed after it
(and warmed up in every turn): slower to run, the same timed code.

side_by_side.json (schema 1):
  schema, created, baseline (the name asked for), rounds, repeats, decode_repeats, threads, device,
  machine {cpu, logical_cores, usable_cores, platform, python, torch, gpu, load_average {start, end}},
  ci {method, level},
  groups  [{model, task, baseline (its row's name, or null), inputs (the run whose config and tokenizer built
           the inputs), batch_sizes, decode {batch_sizes, new_tokens, prompt_tokens} or null, warmup,
           resident (the models stayed loaded), memory {estimated_bytes, available_bytes}, rows [names]}]
  rows    [{model, task, name, chain, runs [run dirs of the row], measured (the run dir timed),
           latency_ms {batch_<n>: {median, ci95 [lo, hi], coverage}},
           decode_tokens_per_s {batch_<n>: same} ({} for a model that cannot generate),
           ratio_to_baseline {latency_batch_<n>: same, decode_batch_<n>: same} or null without a baseline,
           per_round {latency_batch_<n>: [ms per round], decode_batch_<n>: [tokens/s per round]}}]
A row is identified by (model, task, name); squeeze/report/side_by_side.py reads this file.
"""

from __future__ import annotations

import gc
import math
import os
import platform
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from squeeze import artifacts, measure
from squeeze.errors import SqueezeError
from squeeze.record import RESULT_FILE, dir_bytes, read_record, write_json_atomic
from squeeze.report.aggregate import build_groups
from squeeze.report.cells import BASELINE, cell, find_results

FILE = "side_by_side.json"
SCHEMA = 1
LEVEL = 0.95
MEMORY_SHARE = 0.5  # of the available memory that the resident models may take (module docstring)


# -- statistics --------------------------------------------------------------------------------------
def median_interval(values: Sequence[float], level: float = LEVEL) -> tuple[float, float, float]:
    """(lo, hi, coverage): the order-statistic confidence interval of the median (module docstring)."""
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        raise ValueError("no values")

    def coverage(j: int) -> float:  # of [x_(j), x_(n+1-j)], 1-based
        return 1.0 - 2.0 * sum(math.comb(n, i) for i in range(j)) / 2.0 ** n

    j = 1
    while j + 1 <= (n + 1) // 2 and coverage(j + 1) >= level:
        j += 1
    return ordered[j - 1], ordered[n - j], coverage(j)


def summary(values: Sequence[float]) -> dict[str, Any]:
    lo, hi, covered = median_interval(values)
    return {"median": statistics.median(values), "ci95": [lo, hi], "coverage": round(covered, 4)}


# -- rows --------------------------------------------------------------------------------------------
@dataclass
class Row:
    name: str
    chain: str
    run_dir: Path  # the run whose model is timed
    runs: list[Path]
    record: dict

    @property
    def model_dir(self) -> Path:
        return self.run_dir / artifacts.RUN_MODEL

    @property
    def head(self) -> str:
        head = ((self.record.get("config") or {}).get("task") or {}).get("head")
        if not head:
            raise SqueezeError(f"{self.run_dir / RESULT_FILE} names no task head (config.task.head), so its model "
                               "cannot be loaded; re-run that cell or leave it out")
        return head


@dataclass
class Lineup:
    """The rows of one model × task, measured together on the same inputs."""

    model: str
    task: str
    rows: list[Row]
    baseline: Row | None = None
    values: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # row name -> figure -> per round


def _has_model(run_dir: Path) -> bool:
    return (run_dir / artifacts.RUN_MODEL / "config.json").is_file()


def lineups(paths: Sequence[str | Path], baseline: str = BASELINE, explicit: bool = False) -> list[Lineup]:
    """The rows to measure under `paths`, per model × task, each group's baseline chosen (module docstring)."""
    paths = [Path(p).expanduser() for p in paths]
    own_rows = {p.resolve() for p in paths if (p / RESULT_FILE).is_file()}  # run directories given as such
    sweeps = [p for p in paths if p.resolve() not in own_rows]
    results = [p / RESULT_FILE for p in paths if p.resolve() in own_rows] + (find_results(sweeps) if sweeps else [])
    cells, unread = [], []
    for result in dict.fromkeys(r.resolve() for r in results):
        try:
            record = read_record(result)
        except (OSError, ValueError) as e:
            unread.append(f"{result}: {type(e).__name__}")
            continue
        if isinstance(record, dict):
            found = cell(record, result)
            # Where the record is now, not where it was written (a sweep copied or moved keeps its old run_dir).
            found["dir"], found["record"] = result.parent.resolve(), record
            cells.append(found)
    # The report's rows and labels, over all cells (failed ones too, as the report groups them).
    build_groups(cells, baseline)
    by_group: dict[tuple[str, str], dict[str, Row]] = {}
    for c in cells:
        if c["status"] != "ok" or not _has_model(c["dir"]):
            continue
        name = c["dir"].name if c["dir"] in own_rows else c["row"]
        rows = by_group.setdefault((c["model"], c["task"]), {})
        if name in rows and c["dir"] in own_rows:  # two run directories of one name: their paths tell them apart
            name = str(c["dir"])
        if name in rows:
            rows[name].runs.append(c["dir"])
        else:
            rows[name] = Row(name, c["chain"], c["dir"], [c["dir"]], c["record"])
    if not by_group:
        where = ", ".join(str(p) for p in paths)
        states = sorted({"ok without model/" if c["status"] == "ok" else str(c["status"]) for c in cells})
        states += ["unreadable"] if unread else []
        raise SqueezeError(f"no finished run with a saved model under {where} ({len(cells) + len(unread)} records: "
                           f"{', '.join(states) or 'none'}); pass a sweep or run directories whose runs ended "
                           f"with status ok")
    out = []
    for (model, task), rows in sorted(by_group.items()):
        lineup = Lineup(model, task, list(rows.values()))
        named = [r for r in lineup.rows if r.name == baseline] or [r for r in lineup.rows if r.chain == baseline]
        if len(named) > 1:
            raise SqueezeError(f"baseline `{baseline}` names {len(named)} rows of {model} × {task} "
                               f"({', '.join(r.name for r in named)}); pass one of them with --baseline")
        lineup.baseline = named[0] if named else None
        out.append(lineup)
    if explicit and all(lineup.baseline is None for lineup in out):
        names = ", ".join(dict.fromkeys(r.name for lineup in out for r in lineup.rows))
        raise SqueezeError(f"--baseline {baseline} names no row (rows: {names}); pass one of those names or a chain")
    return out


# -- memory and machine ------------------------------------------------------------------------------
def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux MemAvailable; elsewhere the free pages)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def estimated_bytes(row: Row) -> int:
    # In memory a model is at least its dense float weights: a sparse or packed file is smaller on disk.
    return max(dir_bytes(row.model_dir), 4 * int(row.record.get("params") or 0))


def keep_loaded(rows: Sequence[Row], available: int | None) -> bool:
    return available is not None and sum(estimated_bytes(r) for r in rows) <= MEMORY_SHARE * available


def machine(device: str) -> dict[str, Any]:
    cpu = platform.processor() or None
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(device) if device.startswith("cuda") else None
    return {"cpu": cpu, "logical_cores": os.cpu_count(), "usable_cores": usable, "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "gpu": gpu,
            "load_average": {"start": _load_average(), "end": None}}


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


# -- loading and inputs ------------------------------------------------------------------------------
def load(row: Row, device: str):
    """(model in eval mode on `device`, tokenizer): the row's saved model, loaded as evaluate.py loads it."""
    from squeeze import models

    trained, head = artifacts.resolve(row.run_dir, "run", accept=(artifacts.RUN,)), row.head
    try:
        model, tokenizer = artifacts.load(trained, head, "run")
    except SqueezeError as e:  # said for the row, with what failed underneath (from_pretrained's error, if it was)
        cause = e.__cause__ or e
        first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        raise SqueezeError(f"row {row.name}: {row.model_dir} could not be loaded ({first}); re-run that cell or "
                           "leave it out") from e
    models.finish_model(model, tokenizer)
    return model.eval().to(device), tokenizer


def task_loader(row: Row, tokenizer):
    """The task's test loader from the row's resolved config, built as a run builds it (squeeze.run.build)."""
    from omegaconf import OmegaConf

    from squeeze.run import build

    trained = artifacts.resolve(row.run_dir, "run", accept=(artifacts.RUN,))
    _, _, data = build.prepare(OmegaConf.create(row.record["config"]), trained_model=trained.model_config)
    data.tokenizer = tokenizer  # the saved model's own tokenizer, as evaluate.py uses it
    data.setup("test")
    return data.test_dataloader()


@dataclass
class Settings:
    """What one turn of a row times (module docstring)."""

    batch_sizes: list[int]
    decode: dict[str, Any] | None  # measure_decoding's batch_sizes, new_tokens, prompt_tokens; None: no decoding
    warmup: int
    repeats: int
    decode_repeats: int

    @classmethod
    def of(cls, record: dict, batch_sizes: Sequence[int] | None, decode_batch_sizes: Sequence[int] | None,
           warmup: int | None, repeats: int, decode_repeats: int) -> Settings:
        """The record's perf settings (conf/train.yaml's when it has none), with the command line's overrides."""
        perf = (record.get("config") or {}).get("perf") or {}
        if decode_batch_sizes is not None:
            perf = {**perf, "decode_batch_sizes": list(decode_batch_sizes)}
        decode = measure.decode_settings(perf)
        if decode is not None:
            decode = {k: decode[k] for k in ("batch_sizes", "new_tokens", "prompt_tokens")}
        sizes = [int(b) for b in (batch_sizes if batch_sizes is not None else perf.get("batch_sizes") or (1, 16))]
        settings = cls(sorted(set(sizes)), decode, int(perf.get("warmup", 3) if warmup is None else warmup),
                       repeats, decode_repeats)
        bad = [b for b in settings.batch_sizes + (decode or {}).get("batch_sizes", []) if b < 1]
        if not settings.batch_sizes or bad or repeats < 1 or decode_repeats < 1 or settings.warmup < 0:
            raise SqueezeError(f"batch sizes {settings.batch_sizes} (decode {(decode or {}).get('batch_sizes', [])}), "
                               f"--repeats {repeats}, --decode-repeats {decode_repeats} and --warmup "
                               f"{settings.warmup} must be positive (warm-up may be 0)")
        return settings


def turn(model, batches: dict[int, dict], loader, settings: Settings, device: str, warmup: int) -> dict[str, float]:
    """One row's turn: {latency_batch_<n>: ms, decode_batch_<n>: new tokens/s}."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    out: dict[str, float] = {}
    with torch.inference_mode():
        for size, batch in batches.items():
            timing = measure.time_call(lambda: model(**batch), warmup, settings.repeats, sync)
            out[f"latency_batch_{size}"] = timing["median_s"] * 1e3
        if settings.decode is not None and measure.can_generate(model):
            decoding = measure.measure_decoding(model, loader, **settings.decode, warmup=min(warmup, 1),
                                                repeats=settings.decode_repeats, device=device)
            out.update({f"decode_{name}": t["tokens_per_s"] for name, t in decoding["latency"].items()})
    return out


# -- measuring ---------------------------------------------------------------------------------------
def measure_lineup(lineup: Lineup, rounds: int, settings: Settings, device: str, resident: bool | None = None,
                   progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Time the lineup's rows in a warm-up round and `rounds` interleaved rounds; its group entry."""
    available = available_memory()
    if resident is None:
        resident = keep_loaded(lineup.rows, available)
    first = lineup.baseline or lineup.rows[0]
    model, tokenizer = load(first, device)
    loader = task_loader(first, tokenizer)
    batches = {size: {k: v.to(device) for k, v in measure.example_batch(loader, size).items()}
               for size in settings.batch_sizes}
    loaded = {first.name: model} if resident else {}
    if resident:
        for row in lineup.rows:
            if row.name not in loaded:
                loaded[row.name] = load(row, device)[0]
    else:
        del model

    def one(row: Row, warmup: int) -> dict[str, float]:
        if resident:
            return turn(loaded[row.name], batches, loader, settings, device, warmup)
        model = load(row, device)[0]
        try:  # a freshly loaded model is warmed up in every turn (its first call pays for lazy set-up)
            return turn(model, batches, loader, settings, device, max(settings.warmup, 1))
        finally:
            del model
            gc.collect()

    lineup.values = {row.name: {} for row in lineup.rows}
    if resident:
        for row in lineup.rows:
            one(row, settings.warmup)
    n = len(lineup.rows)
    for r in range(rounds):
        progress(f"{lineup.model} × {lineup.task}: round {r + 1}/{rounds}")
        for row in lineup.rows[r % n:] + lineup.rows[:r % n]:
            for figure, value in one(row, 0).items():
                lineup.values[row.name].setdefault(figure, []).append(value)
    loaded.clear()
    gc.collect()
    return {"model": lineup.model, "task": lineup.task,
            "baseline": lineup.baseline.name if lineup.baseline else None, "inputs": str(first.run_dir),
            "batch_sizes": settings.batch_sizes, "decode": settings.decode, "warmup": settings.warmup,
            "resident": resident,
            "memory": {"estimated_bytes": sum(estimated_bytes(r) for r in lineup.rows), "available_bytes": available},
            "rows": [row.name for row in lineup.rows]}


def row_entries(lineup: Lineup) -> list[dict[str, Any]]:
    base = lineup.values.get(lineup.baseline.name) if lineup.baseline else None
    out = []
    for row in lineup.rows:
        values = lineup.values[row.name]
        ratios = None
        if base is not None:
            ratios = {figure: summary([v / b for v, b in zip(per_round, base[figure])])
                      for figure, per_round in values.items() if figure in base}
        out.append({"model": lineup.model, "task": lineup.task, "name": row.name, "chain": row.chain,
                    "runs": [str(p) for p in row.runs], "measured": str(row.run_dir),
                    "latency_ms": {f.removeprefix("latency_"): summary(v) for f, v in values.items()
                                   if f.startswith("latency_")},
                    "decode_tokens_per_s": {f.removeprefix("decode_"): summary(v) for f, v in values.items()
                                            if f.startswith("decode_")},
                    "ratio_to_baseline": ratios, "per_round": values})
    return out


def side_by_side(paths: Sequence[str | Path], baseline: str = BASELINE, explicit_baseline: bool = False,
                 rounds: int = 10, repeats: int = 3, decode_repeats: int = 1, warmup: int | None = None,
                 batch_sizes: Sequence[int] | None = None, decode_batch_sizes: Sequence[int] | None = None,
                 device: str = "cpu", resident: bool | None = None,
                 progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Measure the rows under `paths` side by side; the side_by_side.json document (module docstring).
    `resident`: None decides from the memory (module docstring), True/False forces it."""
    if rounds < 1:
        raise SqueezeError(f"--rounds {rounds} must be at least 1 (10 or more for a 95 % interval that is not "
                           "just the range)")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SqueezeError(f"--device {device} asked for, but no CUDA device is visible; use --device cpu")
    found = lineups(paths, baseline, explicit_baseline)
    out: dict[str, Any] = {
        "schema": SCHEMA, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "baseline": baseline, "rounds": rounds, "repeats": repeats, "decode_repeats": decode_repeats,
        "threads": torch.get_num_threads(), "device": device, "machine": machine(device),
        "ci": {"method": "order statistics of the per-round values (binomial, distribution-free)", "level": LEVEL},
        "groups": [], "rows": [],
    }
    for lineup in found:
        first = lineup.baseline or lineup.rows[0]
        settings = Settings.of(first.record, batch_sizes, decode_batch_sizes, warmup, repeats, decode_repeats)
        out["groups"].append(measure_lineup(lineup, rounds, settings, device, resident, progress))
        out["rows"] += row_entries(lineup)
    out["machine"]["load_average"]["end"] = _load_average()
    return out


def default_out(paths: Sequence[str | Path]) -> Path:
    """DIR/side_by_side.json for one sweep directory, else ./side_by_side.json."""
    if len(paths) == 1 and Path(paths[0]).is_dir() and not (Path(paths[0]) / RESULT_FILE).is_file():
        return Path(paths[0]) / FILE
    return Path(FILE)


def write(document: dict[str, Any], out: str | Path) -> Path:
    return write_json_atomic(out, document)
