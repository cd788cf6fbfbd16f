"""The report's tables: markdown (report.md) and CSV (one per model × task, and cells.csv)."""

from __future__ import annotations

import csv
import fnmatch
import math
from collections.abc import Collection, Sequence
from pathlib import Path

from squeeze.report.aggregate import (CO2_PRESETS, DELTAS, TABLE, Group, co2_by_row, co2_by_technique,
                                      delta_names, totals)
from squeeze.report.cells import FIGURES, METRIC_FIGURES, per_batch_header, sort_per_batch
from squeeze.report.recommend import markdown_section, of_group, starred

CELLS_CSV = "cells.csv"


def row_columns(group: Group | None = None) -> list[str]:
    """A group's CSV columns: the row (`label` names it: the chain and its varying settings, or its
    compressors' labels), every figure's mean and std (per batch size too, where recorded), Δ%."""
    cols = ["model", "task", "metric", "mode", "label", "chain", "setting", "hardware", "baseline", "n_ok",
            "n_failed", "errors"]
    for name in (group.figures if group is not None else Group("", "", None, "max", []).figures):
        cols += [f"{name}_mean", f"{name}_std"]
    deltas = DELTAS if group is None else delta_names(group)  # a preset's layout adds its own Δ% columns
    return cols + [f"{name}_delta_pct" for name in deltas]


def group_records(group: Group) -> list[dict]:
    return [{"model": group.model, "task": group.task, "metric": group.metric, "mode": group.mode,
             "baseline": row["is_baseline"], **row} for row in group.rows]


def cell_columns(cells: list[dict]) -> list[str]:
    metric_names = sorted({m for c in cells for m in c["metrics"]})
    settings = sorted({f"compress.{n}.{k}" for c in cells for n, flat in c["settings"].items() for k in flat})
    return ["run_dir", "status", "error", "model", "task", "chain", "row", "hardware", "seed", "lr", "metric",
            "mode", "quality", "validation_best", *FIGURES, *sort_per_batch(n for c in cells for n in c["per_batch"]),
            "energy_method", "evaluated_from", "eval_energy_kwh", *metric_names, *settings]


def cell_records(cells: list[dict]) -> list[dict]:
    """One flat dict per cell: its figures, test metrics, per-batch figures and compressor settings."""
    records = []
    for c in cells:
        settings = {f"compress.{n}.{k}": v for n, flat in c["settings"].items() for k, v in flat.items()}
        plain = {k: v for k, v in c.items() if not isinstance(v, dict)}
        records.append({**plain, **c["metrics"], **c["per_batch"], **settings})
    return records


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


def _hours(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds / 3600:.3g} h ({seconds:,.0f} s)"


def _cell_text(row: dict, name: str) -> str:
    integer = name in ("params", "nonzero_params", "pruned_matrices_params", "pruned_matrices_nonzero")
    mean, std = row[f"{name}_mean"], row[f"{name}_std"]
    if mean is None:
        return ""
    return _num(mean, integer) + (f" ± {_num(std, integer)}" if std is not None else "")


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


# The markdown table holds what a reader decides from; every figure (and every Δ%) is in the group's CSV.
# (figure, with a Δ%); `per_batch` stands for decoding speed at batch 1; pipeline figures only where a pipeline
# run is a row.
MARKDOWN = (("quality", True), ("accuracy", False), ("accuracy_norm", False), ("token_accuracy", False), ("f1", False),
            ("last_word_accuracy", False), ("last_word_perplexity", False), ("hits_1", False), ("hits_5", False),
            ("hits_10", False), ("bleu", False), ("ter", False), ("bertscore_f1", False), ("size_mb", True),
            ("sparsity", False), ("latency_ms", True), ("per_batch", False), ("own_s", True), ("own_kwh", True),
            ("total_kwh", True), ("inference_kwh_per_1k", True), ("train_tokens_per_s", False),
            ("stage_peak_mb", False), ("pipeline_window_tokens_per_s", False), ("spec_acceptance", False),
            ("spec_speedup", False))


def _columns(group: Group) -> list[tuple[str, str, bool]]:
    """(figure, header, with Δ%) of the table: a preset's own layout (config.report.table) or MARKDOWN; `per_batch`
    stands for decoding at batch 1, a per-batch name or pattern for those it matches; the other test metrics only
    where they are not the quality column."""
    layout = group.layout or MARKDOWN
    quality_name = (group.metric or "").split("/", 1)[-1]
    pipelined = any(r.get("stage_peak_mb_mean") is not None for r in group.rows)
    columns = []
    for name, delta in layout:
        if name == "per_batch":
            columns += [(n, per_batch_header(n), False) for n in group.per_batch
                        if n.startswith("decode_") and n.endswith(".batch_1")]
        elif "." in name:  # per-batch figures by name or pattern
            columns += [(n, per_batch_header(n), delta) for n in group.per_batch if fnmatch.fnmatchcase(n, name)]
        elif name == "quality":
            columns.append((name, group.metric or "quality", delta))
        elif name in ("train_tokens_per_s", "stage_peak_mb") and group.layout is None and not pipelined:
            continue
        elif name not in METRIC_FIGURES or name != quality_name:
            columns.append((name, FIGURES[name][0], delta))
    return columns


def markdown_table(group: Group, recommended: Collection[str] = ()) -> str:
    """The comparison table; columns nobody in the group recorded are left out (a row without a figure
    others have: blank). The `recommended` rows' labels carry a ★."""
    columns = _columns(group)
    shown = [(name, header, delta) for name, header, delta in columns
             if name == "quality" or any(r[f"{name}_mean"] is not None for r in group.rows)]
    header = ["row", "ok", "failed"]
    for _, title, delta in shown:
        header.append(title)
        if delta:
            header.append("Δ%")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in group.rows:
        label = _md_escape(row["label"]) + (" ★" if row["label"] in recommended else "")
        cells = [f"**{label}** (baseline)" if row["is_baseline"] else label, str(row["n_ok"]), str(row["n_failed"])]
        for name, _, delta in shown:
            if name == "quality" and row["n_ok"] == 0:
                cells.append(f"failed: {_md_escape(row['errors'])}")
            else:
                cells.append(_cell_text(row, name))
            if delta:
                d = row[f"{name}_delta_pct"]
                cells.append("" if d is None else f"{d:+.1f}%")
        lines.append("| " + " | ".join(cells) + " |")
    # Said for the figures every run records (or did, before a feature was switched off); the optional
    # ones (other metrics, decoding, speculative decoding) just stay out.
    shown_names = {name for name, _, _ in shown}
    missing = [FIGURES[name][0] for name in ("size_mb", "latency_ms", "own_s", "total_kwh", "inference_kwh_per_1k")
               if name not in shown_names]
    if missing and group.layout is None:  # a preset's own table leaves columns out on purpose
        lines.append("")
        lines.append(f"Not in these records (column left out): {', '.join(missing)}.")
    return "\n".join(lines)


def totals_text(cells: list[dict], where: str) -> str:
    """One paragraph: what the cells spent in all (not a mean), CO2 at the records' factor and each preset."""
    t = totals(cells)
    parts = [f"train time {_hours(t['train_s'])}" if t["train_s"] is not None else "train time not recorded",
             f"eval time {_hours(t['eval_s'])}" if t["eval_s"] is not None else "eval time not recorded"]
    if t["kwh"] is None:
        parts.append("energy not recorded")
    else:
        pue = "/".join(f"{p:g}" for p in t["pue"]) or "?"
        factors = ", ".join(f"{name} {f:.3f}" if name else f"{f:.3f}" for name, f in t["factors"]) or "?"
        at = ", ".join(f"{t['co2_kg_at'][k]:.4g} kg at {k} {f:.3f}" for k, f in CO2_PRESETS.items())
        counted = ", ".join(f"{kind} in {n}" for kind, n in t["counted"].items())
        parts.append(f"energy {t['kwh']:.4g} kWh (facility, PUE {pue}; {t['with_energy']} of {t['records']} records "
                     f"have it{'; counted: ' + counted if counted else ''})")
        parts.append(f"CO2 {_num(t['co2_kg'])} kg as recorded (kg/kWh: {factors}); {at}")
    return f"Totals over {where} ({t['records']} records, failed ones included): " + "; ".join(parts) + "."


def _setting(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _factor_text(factors: Sequence[tuple[str, float]]) -> str:
    return ", ".join(f"{name} {f:.3f}" if name else f"{f:.3f}" for name, f in factors) or "not recorded"


def co2_row_table(group: Group) -> list[str]:
    """Markdown lines: per row, CO2 over all its runs against its best run by validation (aggregate.co2_by_row);
    nothing when no record of the model × task has energy."""
    rows = co2_by_row(group)
    if all(r["kwh"] is None and r["co2_kg"] is None for r in rows):
        return []
    monitor = "val/" + (group.metric or "quality").split("/", 1)[-1]
    factors = sorted({f for r in rows for f in r["factors"]}, key=lambda f: f[1])
    lines = ["", f"CO2 per row: all its runs (every seed and learning rate, failed runs included) against its best run "
                 f"by validation (`{monitor}`, the model the search keeps), as recorded at kg/kWh "
                 f"{_factor_text(factors)}.", "",
             "| row | runs | failed | lrs | kWh, all runs | CO2 kg, all runs | best run | CO2 kg, best run "
             "| all ÷ best |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        best = r["best"]
        what = "" if best is None else ", ".join(f"{k} {_setting(best[k])}" for k in ("lr", "seed")
                                                 if best[k] is not None)
        ratio = (r["co2_kg"] / best["co2_kg"] if best and r["co2_kg"] is not None and best["co2_kg"] else None)
        lines.append("| " + " | ".join([
            _md_escape(r["label"]), str(r["runs"]), str(r["failed"]), ", ".join(_setting(lr) for lr in r["lrs"]),
            _num(r["kwh"]), _num(r["co2_kg"]), what, "" if best is None else _num(best["co2_kg"]),
            "" if ratio is None else f"{ratio:.2f}×"]) + " |")
    return lines


def co2_technique_table(groups: Sequence[Group]) -> list[str]:
    """Markdown lines: CO2 per technique (row label) over the whole grid (aggregate.co2_by_technique)."""
    rows = co2_by_technique(groups)
    if all(r["kwh"] is None and r["co2_kg"] is None for r in rows):
        return []
    factors = sorted({f for r in rows for f in r["factors"]}, key=lambda f: f[1])
    lines = ["", "CO2 per technique over the whole grid (every run of the row in every model × task, all learning "
                 f"rates and seeds, failed runs included), as recorded at kg/kWh {_factor_text(factors)}.", "",
             "| technique | model × task | runs | failed | kWh | CO2 kg |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append("| " + " | ".join([_md_escape(r["label"]), _md_escape(", ".join(r["tables"])), str(r["runs"]),
                                         str(r["failed"]), _num(r["kwh"]), _num(r["co2_kg"])]) + " |")
    return lines


def markdown(groups: list[Group], cells: list[dict], skipped: list[str], paths: Sequence[str | Path],
             csv_names: dict[str, str], out: Path, advice: Sequence[dict] = ()) -> str:
    n_ok = sum(c["status"] == "ok" for c in cells)
    text = [
        "# squeeze report", "",
        (f"{len(cells)} records ({n_ok} ok, {len(cells) - n_ok} failed) from {', '.join(f'`{p}`' for p in paths)}. "
         f"Every record, one row: [{CELLS_CSV}]({CELLS_CSV})."), "",
        ("A row is a compression chain with the settings that tell its cells apart in the model × task "
         "(`imp target=0.3`: the keys of config.compress.<name> that differ between the chain's cells), or "
         "the `label` its compressors carry. Figures are mean ± std over a row's finished cells (seeds, "
         "learning rates); Δ% = (row − baseline) / |baseline| × 100 against the baseline row of the same "
         "model × task, both averaged over the seeds and learning rates they share. "
         "Size is the saved model directory on disk; latency the median at batch size 1. "
         "Costs (squeeze/run/cost.py): *own* is what the row spent beyond the model it started from (its training "
         "when the chain trains, the fine-tuning itself for the baseline; calibration and quantization for a "
         "post-training chain, which starts from the fine-tuned model); *total* adds what that starting model "
         "cost (the fine-tuned baseline, a distillation teacher); *inference* is the evaluation pass's energy per "
         "1,000 test examples, or scored tokens for perplexity tasks. Energy is facility kWh (IT × PUE). "
         "Sweep cells of post-training chains start from the stored fine-tuned baseline (squeeze/run/baselines.py); "
         "the totals below count its training once. Each table shows the columns to decide from; its CSV holds "
         "every figure with its spread and Δ% (precision, recall, throughput, peak memory per batch size, train "
         "and eval time, CO2, ...)."),
        "", totals_text(cells, "the whole grid"), *co2_technique_table(groups),
    ]
    if skipped:
        text += ["", "Unreadable result.json files, left out:"] + [f"- {_md_escape(s)}" for s in skipped]
    for g in groups:
        better = "higher" if g.mode == "max" else "lower"
        table_csv = csv_names[g.slug]
        text += ["", f"## {g.model} × {g.task}", "",
                 f"Quality: `{g.metric}` ({better} is better). Table as CSV: [{table_csv}]({table_csv}).",
                 *(["", *g.protocol] if g.protocol else []),
                 *(["", *g.timing] if g.timing else []), "", markdown_table(g, starred(advice, g)),
                 *markdown_section(of_group(advice, g))]
        text += ["", totals_text(g.cells, f"{g.model} × {g.task}"), *co2_row_table(g)]
        text += [f"\nNote: {note}." for note in g.notes]
        failed = [c for c in g.cells if c["status"] != "ok"]
        if failed:
            text += ["", "Failed cells:"]
            for c in failed:
                what = ", ".join(f"{k} {c[k]}" for k in ("seed", "lr") if c[k] is not None)
                text.append(f"- `{c['row'] or c['chain']}`{' (' + what + ')' if what else ''} in `{c['run_dir']}`: "
                            f"{_md_escape(str(c['error']))}")
        if g.plots:
            text += [""] + [f"![{kind}]({path.relative_to(out).as_posix()})" for kind, path in g.plots.items()]
        if g.skipped_plots:
            text += ["", "Plots not drawn: " + "; ".join(g.skipped_plots) + "."]
    return "\n".join(text) + "\n"
