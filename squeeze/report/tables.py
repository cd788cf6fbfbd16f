"""The report's tables: markdown (report.md) and CSV (one per model × task, and cells.csv)."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

from squeeze.report.aggregate import DELTAS, TABLE, Group
from squeeze.report.cells import AGGREGATED, FIGURES

CELLS_CSV = "cells.csv"


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
