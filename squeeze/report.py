"""Comparison tables and plots from result records.

    python -m squeeze.report multirun/2026-11-23_10-00-00              # a sweep, searched recursively
    python -m squeeze.report outputs/tiny_bert/rotten_tomatoes/* --out report --wandb

Per model × task: one row per compressor chain, its cells (seeds, learning rates) aggregated as
mean ± std, Δ% against the baseline chain (`none`), a markdown section and a CSV; PNG plots of
quality against size, latency and energy with the Pareto front, expected validation performance
(Dodge et al. 2019) and sparsity against quality. Reads only result.json files: it knows records,
never models.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import re
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from squeeze.errors import SqueezeError
from squeeze.loggers import wandb_has_key
from squeeze.record import RESULT_FILE, read_record

BASELINE = "none"
REPORT_DIR = "report"
CELLS_CSV = "cells.csv"
REPORT_MD = "report.md"


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
# The markdown table, in the shape of the thesis tables: (figure, with a Δ% column).
TABLE = (("quality", True), ("size_mb", True), ("nonzero_params", False), ("latency_ms", True),
         ("throughput", False), ("train_s", True), ("energy_kwh", True), ("co2_kg", False))
DELTAS = tuple(name for name, delta in TABLE if delta)
# Trade-off plots: (file suffix, cost figure, axis label).
TRADEOFFS = (("size", "size_mb", "checkpoint size (MB)"), ("latency", "latency_ms", "latency, batch 1 (ms)"),
             ("energy", "energy_kwh", "energy (kWh)"))
WHERE = {"size_mb": "checkpoint_bytes", "latency_ms": "perf.latency.batch_1", "energy_kwh": "energy.kwh",
         "validation_best": "validation.best", "sparsity": "sparsity"}


# -- pure math ------------------------------------------------------------------------------------------
def pareto_set(points: Sequence[tuple[float, float]], direction: str = "max") -> list[int]:
    """Indices of the (cost, quality) points no other point beats: none has less or equal cost and
    better or equal quality with one of the two strictly better. Lower cost is always better; quality
    is better higher for direction "max", lower for "min". Sorted by cost (then quality, best first)."""
    if direction not in ("max", "min"):
        raise ValueError(f"direction must be 'max' or 'min', not {direction!r}")
    sign = 1.0 if direction == "max" else -1.0
    pts = [(float(c), sign * float(q)) for c, q in points]

    def beaten(i: int) -> bool:
        c, q = pts[i]
        return any(c2 <= c and q2 >= q and (c2 < c or q2 > q) for j, (c2, q2) in enumerate(pts) if j != i)

    front = [i for i in range(len(pts)) if not beaten(i)]
    return sorted(front, key=lambda i: (pts[i][0], -pts[i][1], i))


def expected_best(values: Sequence[float], n: int, mode: str = "max") -> float:
    """Expected best of n draws with replacement from the empirical distribution of `values`:
    E[max_n] = Σ_i v_(i) [(i/N)^n − ((i−1)/N)^n], v ascending (Dodge et al. 2019); the expected
    minimum for mode "min"."""
    if not values:
        raise ValueError("expected_best needs at least one value")
    if n < 1:
        raise ValueError(f"n must be at least 1, not {n}")
    if mode == "min":
        return -expected_best([-v for v in values], n, "max")
    ordered = sorted(float(v) for v in values)
    big_n = len(ordered)
    return sum(v * ((i / big_n) ** n - ((i - 1) / big_n) ** n) for i, v in enumerate(ordered, start=1))


def expected_validation_curve(values: Sequence[float], mode: str = "max", n_max: int | None = None) -> list[float]:
    """expected_best for n = 1 .. n_max (default: as many as there are values)."""
    return [expected_best(values, n, mode) for n in range(1, (n_max or len(values)) + 1)]


def delta_pct(value: float | None, base: float | None) -> float | None:
    """(value − base) / base × 100; None when either is missing or the base is zero."""
    if value is None or base is None or base == 0:
        return None
    return (value - base) / abs(base) * 100.0


# -- records -> cells -----------------------------------------------------------------------------------
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


# -- cells -> tables ------------------------------------------------------------------------------------
@dataclass
class Group:
    """The cells of one model × task and their rows: one per chain (per chain and hardware when the
    cells ran on more than one), each with Δ% against the baseline row of its hardware."""

    model: str
    task: str
    metric: str | None
    mode: str
    cells: list[dict]
    rows: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    plots: dict[str, Path] = field(default_factory=dict)
    skipped_plots: list[str] = field(default_factory=list)

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.+-]", "_", f"{self.model}-{self.task}")

    @property
    def baseline_row(self) -> dict | None:
        return next((r for r in self.rows if r["is_baseline"]), None)


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def chain_row(chain: str, hardware: str | None, cells: list[dict]) -> dict[str, Any]:
    ok = [c for c in cells if c["status"] == "ok"]
    failed = [c for c in cells if c["status"] != "ok"]
    row: dict[str, Any] = {"chain": chain, "hardware": hardware,
                           "label": chain if hardware is None else f"{chain} @ {hardware}",
                           "is_baseline": False, "n_ok": len(ok), "n_failed": len(failed),
                           "errors": "; ".join(dict.fromkeys(c["error"] for c in failed))}
    for name in AGGREGATED:
        row[f"{name}_mean"], row[f"{name}_std"] = _mean_std([float(c[name]) for c in ok if c[name] is not None])
    return row


def build_groups(cells: list[dict], baseline: str = BASELINE) -> list[Group]:
    by_key: dict[tuple[str, str], list[dict]] = {}
    for c in cells:
        by_key.setdefault((c["model"], c["task"]), []).append(c)
    groups = []
    for (model, task), members in sorted(by_key.items()):
        finished = [c for c in members if c["status"] == "ok"] or members
        metric = next((c["metric"] for c in finished if c["metric"]), None)
        mode = next((c["mode"] for c in finished if c["metric"]), "max")
        group = Group(model, task, metric, mode, members)
        # Latency, throughput and energy on a CPU and on a GPU are not one population: split by hardware.
        mixed = len({c["hardware"] for c in members}) > 1
        rows: dict[tuple[str, str | None], list[dict]] = {}
        for c in members:
            rows.setdefault((c["chain"], str(c["hardware"]) if mixed else None), []).append(c)
        # Baseline first, then the chains by name.
        order = sorted(rows, key=lambda k: (k[1] or "", k[0] != baseline, k[0]))
        group.rows = [chain_row(chain, hw, rows[(chain, hw)]) for chain, hw in order]
        for hw in dict.fromkeys(hw for _, hw in order):
            where = f"{model} × {task}" + (f" on {hw}" if hw else "")
            base = next((r for r in group.rows if r["chain"] == baseline and r["hardware"] == hw), None)
            if base is None:
                group.notes.append(f"no `{baseline}` cell for {where}, so Δ% is blank; run compress={baseline} "
                                   "for it or pick another baseline chain with --baseline")
            elif base["n_ok"] == 0:
                group.notes.append(f"the `{baseline}` cells of {where} all failed, so Δ% is blank")
            else:
                base["is_baseline"] = True
            for row in group.rows:
                if row["hardware"] != hw:
                    continue
                for name in DELTAS:
                    base_mean = base[f"{name}_mean"] if base is not None and base["is_baseline"] else None
                    row[f"{name}_delta_pct"] = delta_pct(row[f"{name}_mean"], base_mean)
        groups.append(group)
    return groups


def row_columns() -> list[str]:
    cols = ["model", "task", "metric", "mode", "chain", "hardware", "baseline", "n_ok", "n_failed", "errors"]
    for name in AGGREGATED:
        cols += [f"{name}_mean", f"{name}_std"]
    return cols + [f"{name}_delta_pct" for name in DELTAS]


def group_records(group: Group) -> list[dict]:
    return [{"model": group.model, "task": group.task, "metric": group.metric, "mode": group.mode,
             "baseline": row["is_baseline"], **row} for row in group.rows]


def cell_columns(cells: list[dict]) -> list[str]:
    metric_names = sorted({m for c in cells for m in c["metrics"]})
    return ["run_dir", "status", "error", "model", "task", "chain", "hardware", "seed", "lr", "metric", "mode",
            "quality", "validation_best", *FIGURES, "energy_method", "evaluated_from", "eval_energy_kwh",
            *metric_names]


def cell_records(cells: list[dict]) -> list[dict]:
    return [{**{k: v for k, v in c.items() if k != "metrics"}, **c["metrics"]} for c in cells]


def _write_csv(path: Path, columns: list[str], rows: list[dict]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    return path


# -- markdown -------------------------------------------------------------------------------------------
def _num(value: float | None, integer: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if integer:
        return f"{value:,.0f}"
    return f"{value:.4g}"


def _cell_text(row: dict, name: str) -> str:
    integer = name in ("params", "nonzero_params")
    mean, std = row[f"{name}_mean"], row[f"{name}_std"]
    if mean is None:
        return ""
    return _num(mean, integer) + (f" ± {_num(std, integer)}" if std is not None else "")


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(group: Group) -> str:
    """The comparison table; columns nobody in the group recorded are left out."""
    shown = [(name, delta) for name, delta in TABLE
             if name == "quality" or any(r[f"{name}_mean"] is not None for r in group.rows)]
    header = ["chain", "ok", "failed"]
    for name, delta in shown:
        header.append((group.metric or "quality") if name == "quality" else FIGURES[name][0])
        if delta:
            header.append("Δ%")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in group.rows:
        chain = f"**{row['label']}** (baseline)" if row["is_baseline"] else row["label"]
        cells = [chain, str(row["n_ok"]), str(row["n_failed"])]
        for name, delta in shown:
            if name == "quality" and row["n_ok"] == 0:
                cells.append(f"failed: {_md_escape(row['errors'])}")
            else:
                cells.append(_cell_text(row, name))
            if delta:
                d = row[f"{name}_delta_pct"]
                cells.append("" if d is None else f"{d:+.1f}%")
        lines.append("| " + " | ".join(cells) + " |")
    shown_names = {name for name, _ in shown}
    missing = [FIGURES[name][0] for name, _ in TABLE if name not in shown_names]
    if missing:
        lines.append("")
        lines.append(f"Not in these records (column left out): {', '.join(missing)}.")
    return "\n".join(lines)


def markdown(groups: list[Group], cells: list[dict], skipped: list[str], paths: Sequence[str | Path],
             csv_names: dict[str, str], out: Path) -> str:
    n_ok = sum(c["status"] == "ok" for c in cells)
    text = [
        "# squeeze report", "",
        (f"{len(cells)} records ({n_ok} ok, {len(cells) - n_ok} failed) from {', '.join(f'`{p}`' for p in paths)}. "
         f"Every record, one row: [{CELLS_CSV}]({CELLS_CSV})."), "",
        ("Figures are mean ± std over a chain's finished cells (seeds, learning rates); "
         "Δ% = (chain − baseline) / |baseline| × 100 against the baseline chain of the same model × task. "
         "Size is the saved model directory on disk; latency the median at batch size 1. "
         "Records of evaluate.py (post-training compression of a finished run) trained nothing: "
         "their train time and energy are left empty (the evaluation's own energy is in the cells CSV)."),
    ]
    if skipped:
        text += ["", "Unreadable result.json files, left out:"] + [f"- {_md_escape(s)}" for s in skipped]
    for g in groups:
        better = "higher" if g.mode == "max" else "lower"
        table_csv = csv_names[g.slug]
        text += ["", f"## {g.model} × {g.task}", "",
                 f"Quality: `{g.metric}` ({better} is better). Table as CSV: [{table_csv}]({table_csv}).",
                 "", markdown_table(g)]
        text += [f"\nNote: {note}." for note in g.notes]
        failed = [c for c in g.cells if c["status"] != "ok"]
        if failed:
            text += ["", "Failed cells:"]
            for c in failed:
                what = ", ".join(f"{k} {c[k]}" for k in ("seed", "lr") if c[k] is not None)
                text.append(f"- `{c['chain']}`{' (' + what + ')' if what else ''} in `{c['run_dir']}`: "
                            f"{_md_escape(str(c['error']))}")
        if g.plots:
            text += [""] + [f"![{kind}]({path.relative_to(out).as_posix()})" for kind, path in g.plots.items()]
        if g.skipped_plots:
            text += ["", "Plots not drawn: " + "; ".join(g.skipped_plots) + "."]
    return "\n".join(text) + "\n"


# -- plots ----------------------------------------------------------------------------------------------
def draw_plots(group: Group, plot_dir: Path) -> None:
    from squeeze import plots  # matplotlib is imported only when plots are drawn

    title = f"{group.model} × {group.task}"
    arrow = "↑" if group.mode == "max" else "↓"
    ylabel = f"{group.metric or 'quality'} ({arrow} better)"
    chains = [r["label"] for r in group.rows]
    mixed = any(r["hardware"] for r in group.rows)

    def label(c: dict) -> str:
        return f"{c['chain']} @ {c['hardware']}" if mixed else c["chain"]

    rows = [r for r in group.rows if r["quality_mean"] is not None]
    for kind, cost, xlabel in TRADEOFFS:
        have = [r for r in rows if r[f"{cost}_mean"] is not None]
        if not have:
            group.skipped_plots.append(f"quality vs {kind} (no finished record has {WHERE[cost]})")
            continue
        front = pareto_set([(r[f"{cost}_mean"], r["quality_mean"]) for r in have], group.mode)
        group.plots[f"quality vs {kind}"] = plots.tradeoff(
            plot_dir / f"{group.slug}-quality-vs-{kind}.png", [r["label"] for r in have],
            [r[f"{cost}_mean"] for r in have], [r[f"{cost}_std"] for r in have],
            [r["quality_mean"] for r in have], [r["quality_std"] for r in have], front,
            xlabel, ylabel, f"{title}: quality vs {kind} (ringed: Pareto front)", chains)

    ok = [c for c in group.cells if c["status"] == "ok"]
    values: dict[str, list[float]] = {}
    for c in ok:
        if c["validation_best"] is not None:
            values.setdefault(label(c), []).append(float(c["validation_best"]))
    if values:
        n_max = max(len(v) for v in values.values())
        curves = {chain: expected_validation_curve(values[chain], group.mode, n_max) for chain in chains
                  if chain in values}
        monitor = "val/" + (group.metric or "quality").split("/", 1)[-1]
        best = "max" if group.mode == "max" else "min"
        group.plots["expected validation performance"] = plots.expected_validation(
            plot_dir / f"{group.slug}-expected-validation.png", curves, f"expected {best} {monitor} ({arrow} better)",
            f"{title}: expected validation performance", chains)
    else:
        group.skipped_plots.append("expected validation performance (no finished record has validation.best)")

    sparse = [c for c in ok if c["sparsity"] is not None]
    if sparse:
        series: dict[str, tuple[list[float], list[float]]] = {}
        for c in sparse:
            xs, ys = series.setdefault(label(c), ([], []))
            xs.append(float(c["sparsity"]))
            ys.append(float(c["quality"]))
        base = group.baseline_row["quality_mean"] if group.baseline_row else None
        group.plots["sparsity vs quality"] = plots.sparsity(
            plot_dir / f"{group.slug}-sparsity.png", series, base, ylabel, f"{title}: sparsity vs quality", chains)
    elif any(c["sparsity"] is not None for c in group.cells):
        group.skipped_plots.append("sparsity vs quality (no finished record has sparsity)")


# -- the whole report -----------------------------------------------------------------------------------
@dataclass
class Report:
    out: Path
    markdown: Path
    cells_csv: Path
    groups: list[Group]
    cells: list[dict]
    skipped: list[str]


def build(paths: Sequence[str | Path], out: str | Path | None = None, baseline: str = BASELINE,
          draw: bool = True) -> Report:
    """Read the records under `paths` and write report.md, the CSVs and the plots into `out`."""
    cells, skipped = load_cells(paths)
    groups = build_groups(cells, baseline)
    out = Path(out) if out is not None else default_out(paths[0])
    out.mkdir(parents=True, exist_ok=True)
    cells_csv = _write_csv(out / CELLS_CSV, cell_columns(cells), cell_records(cells))
    csv_names = {}
    for g in groups:
        csv_names[g.slug] = _write_csv(out / f"{g.slug}.csv", row_columns(), group_records(g)).name
        if draw:
            draw_plots(g, out / "plots")
    md = out / REPORT_MD
    md.write_text(markdown(groups, cells, skipped, paths, csv_names, out), encoding="utf-8")
    return Report(out, md, cells_csv, groups, cells, skipped)


def default_out(first: str | Path) -> Path:
    first = Path(first)
    return (first.parent if first.is_file() else first) / REPORT_DIR


# -- Weights & Biases -----------------------------------------------------------------------------------
def wandb_mode() -> str | None:
    """None (W&B reads WANDB_MODE itself) when WANDB_MODE is set, else online with a key, offline without."""
    if os.environ.get("WANDB_MODE"):
        return None
    return "online" if wandb_has_key() else "offline"


def log_wandb(report: Report, group: str) -> Path:
    """Log the tables (wandb.Table) and plots (wandb.Image) to a W&B run of job type "report";
    offline without a key; WANDB_MODE and WANDB_DIR honoured (else the run lives in the report
    directory). Returns the run's local directory."""
    import wandb  # only with --wandb: it takes seconds to import and start

    local = os.environ.get("WANDB_DIR") or str(report.out)
    try:
        run = wandb.init(project="squeeze", group=group, job_type="report", name=f"report-{group}", dir=local,
                         mode=wandb_mode(), config={"records": len(report.cells)})
    except Exception as e:  # network, auth: the files are written already, say how to log anyway
        raise SqueezeError(f"W&B run did not start ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                           f"the report is in {report.out}; set WANDB_MODE=offline to log locally") from e
    try:
        data: dict[str, Any] = {}
        columns = row_columns()
        for g in report.groups:
            rows = group_records(g)
            data[f"report/{g.slug}"] = wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows],
                                                   allow_mixed_types=True)
            for kind, path in g.plots.items():
                data[f"plots/{g.slug}/{kind.replace(' ', '_')}"] = wandb.Image(str(path), caption=kind)
        columns = cell_columns(report.cells)
        data["report/cells"] = wandb.Table(columns=columns, allow_mixed_types=True,
                                           data=[[r.get(c) for c in columns] for r in cell_records(report.cells)])
        run.log(data)
        run_dir = Path(run.dir).parent
    finally:
        run.finish()
    return run_dir


# -- command line ---------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m squeeze.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", metavar="PATH", help="sweep directory (multirun/<time>) or run directories")
    parser.add_argument("--out", help="output directory (default: <first PATH>/report)")
    parser.add_argument("--baseline", default=BASELINE, help="chain Δ%% is measured against (default: none)")
    parser.add_argument("--wandb", action="store_true", help="also log tables and plots to W&B (project squeeze)")
    args = parser.parse_args(argv)
    try:
        report = build(args.paths, args.out, args.baseline)
        print(f"report: {report.markdown}  ({len(report.cells)} records, {len(report.groups)} model × task tables)")
        if args.wandb:
            group = Path(args.paths[0]).resolve()
            run_dir = log_wandb(report, (group.parent if group.is_file() else group).name)
            print(f"W&B run: {run_dir}")
    except SqueezeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
