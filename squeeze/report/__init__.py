"""Comparison tables and plots from result records.

    python -m squeeze.report multirun/2026-11-23_10-00-00              # a sweep, searched recursively
    python -m squeeze.report outputs/tiny_bert/rotten_tomatoes/* --out report --wandb

Per model × task: one row per compressor chain and setting (the config.compress keys that tell the
chain's cells apart, `imp target=0.3`, or the compressors' `label`), its cells (seeds, learning rates)
aggregated as mean ± std, Δ% against the baseline chain (`none`) over the same seeds and learning rates,
the grid's totals and CO2 per technique (per row: all its runs against its best one by validation), a markdown
section with a Recommendation (squeeze/report/recommend.py) and a CSV; PNG plots of quality against size, latency
and energy with the Pareto front, expected validation performance (Dodge et al. 2019; against cells tried or, with
config.report.evp_axis=train_seconds, a training budget) and sparsity against quality.
Reads only result.json files: it knows records, never models.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from squeeze.report.aggregate import (BASELINE, CO2_PRESETS, Group, build_groups, delta_pct, expected_best,
                                      expected_best_within_budget, expected_validation_budget_curve,
                                      expected_validation_curve, pareto_set, totals)
from squeeze.report.cells import cell, find_results, load_cells, quality_metric, record_sparsity
from squeeze.report.tables import (CELLS_CSV, _write_csv, cell_columns, cell_records, group_records, markdown,
                                   markdown_table, row_columns)
from squeeze.report.wandb_log import log_wandb, wandb_mode
from squeeze.report import recommend, side_by_side
from squeeze.report.cli import main

__all__ = ["BASELINE", "CELLS_CSV", "CO2_PRESETS", "REPORT_DIR", "REPORT_MD", "Group", "Report", "build",
           "build_groups", "cell", "cell_columns", "cell_records", "default_out", "delta_pct", "expected_best",
           "expected_best_within_budget", "expected_validation_budget_curve", "expected_validation_curve",
           "find_results", "group_records", "load_cells", "log_wandb", "main", "markdown", "markdown_table",
           "pareto_set", "quality_metric", "record_sparsity", "row_columns", "totals", "wandb_mode"]
REPORT_DIR = "report"
REPORT_MD = "report.md"


@dataclass
class Report:
    out: Path
    markdown: Path
    cells_csv: Path
    groups: list[Group]
    cells: list[dict]
    skipped: list[str]
    advice: list[dict] = field(default_factory=list)  # the Recommendation per model × task (squeeze.report.recommend)


def build(paths: Sequence[str | Path], out: str | Path | None = None, baseline: str = BASELINE,
          draw: bool = True) -> Report:
    """Read the records under `paths` and write report.md, the CSVs and the plots into `out`."""
    cells, skipped = load_cells(paths)
    groups = build_groups(cells, baseline)
    side_by_side.apply(groups, paths)  # latency/decode measured side by side, where python -m squeeze.measure ran
    # The default budget (1pt, or 5% outside [0, 1]) and objective (size): squeeze/report/recommend.py says why.
    advice = recommend.advise(groups)["groups"]
    out = Path(out) if out is not None else default_out(paths[0])
    out.mkdir(parents=True, exist_ok=True)
    cells_csv = _write_csv(out / CELLS_CSV, cell_columns(cells), cell_records(cells))
    csv_names = {}
    for g in groups:
        csv_names[g.slug] = _write_csv(out / f"{g.slug}.csv", row_columns(g), group_records(g)).name
        if draw:
            from squeeze.report.plots import draw_plots

            draw_plots(g, out / "plots", recommend.starred(advice, g))
    md = out / REPORT_MD
    md.write_text(markdown(groups, cells, skipped, paths, csv_names, out, advice), encoding="utf-8")
    return Report(out, md, cells_csv, groups, cells, skipped, advice)


def default_out(first: str | Path) -> Path:
    first = Path(first)
    return (first.parent if first.is_file() else first) / REPORT_DIR

