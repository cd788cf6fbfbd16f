"""Logging a built report's tables (wandb.Table) and plots (wandb.Image) to Weights & Biases, in the W&B group of
the runs it reports on, each row and cell linked to the W&B runs of its cells. Δ% against the baseline is known
only here (a run does not know the other rows): it is in these tables, not in the runs' summaries."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from squeeze.errors import SqueezeError
from squeeze.run.loggers import earlier_wandb_id, wandb_has_key, wandb_run_dir
from squeeze.record import read_record
from squeeze.report.tables import cell_columns, cell_records, group_records, row_columns

if TYPE_CHECKING:
    from squeeze.report import Report

RUNS_COLUMN = "wandb_runs"  # a row's cells' W&B runs: URLs online, else the local W&B run directories


def wandb_mode() -> str | None:
    """None (W&B reads WANDB_MODE itself) when WANDB_MODE is set, else online with a key, offline without."""
    if os.environ.get("WANDB_MODE"):
        return None
    return "online" if wandb_has_key() else "offline"


def runs_group(cells: list[dict], fallback: str) -> str:
    """The W&B group the reported runs logged into (config.logger.wandb.group of their records, the most common
    one), else `fallback`."""
    groups: Counter[str] = Counter()
    for c in cells:
        try:
            record = read_record(c["run_dir"])
        except (OSError, ValueError):
            continue
        group = (((record.get("config") or {}).get("logger") or {}).get("wandb") or {}).get("group")
        if group:
            groups[str(group)] += 1
    return groups.most_common(1)[0][0] if groups else fallback


def log_wandb(report: Report, group: str) -> Path:
    """Log the tables (wandb.Table) and plots (wandb.Image) to a W&B run of job type "report", in the group of the
    runs it reports on (`group` when they logged to none); offline without a key; WANDB_MODE and WANDB_DIR honoured
    (else the run lives in the report directory). Returns the run's local directory."""
    import wandb  # only with --wandb: it takes seconds to import and start

    group = runs_group(report.cells, group)
    local = os.environ.get("WANDB_DIR") or str(report.out)
    try:
        run = wandb.init(project="squeeze", group=group, job_type="report", name=f"report-{group}", dir=local,
                         mode=wandb_mode(), config={"records": len(report.cells)}, tags=["report"])
    except Exception as e:  # network, auth: the files are written already, say how to log anyway
        raise SqueezeError(f"W&B run did not start ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                           f"the report is in {report.out}; set WANDB_MODE=offline to log locally") from e
    try:
        links = {c["run_dir"]: _link(run, c["run_dir"]) for c in report.cells}
        data: dict[str, Any] = {}
        for g in report.groups:
            columns, rows = [*row_columns(g), RUNS_COLUMN], group_records(g)
            for r in rows:
                r[RUNS_COLUMN] = " ".join(links[c["run_dir"]] for c in g.cells if c["row"] == r["label"]
                                          and links[c["run_dir"]])
            data[f"report/{g.slug}"] = wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows],
                                                   allow_mixed_types=True)
            for kind, path in g.plots.items():
                data[f"plots/{g.slug}/{kind.replace(' ', '_')}"] = wandb.Image(str(path), caption=kind)
        columns = [*cell_columns(report.cells), "wandb_id", "wandb_run"]
        cells = cell_records(report.cells)
        for c in cells:
            c["wandb_id"], c["wandb_run"] = earlier_wandb_id(c["run_dir"]), links[c["run_dir"]]
        data["report/cells"] = wandb.Table(columns=columns, allow_mixed_types=True,
                                           data=[[r.get(c) for c in columns] for r in cells])
        run.log(data)
        run_dir = Path(run.dir).parent
    finally:
        run.finish()
    return run_dir


def _link(run, cell_dir: str) -> str | None:
    """A cell's W&B run: its URL when this report run is online (the cells logged to the same project), else its
    local W&B run directory (`wandb sync` it); None when the cell logged to no W&B run."""
    local = wandb_run_dir(cell_dir)
    if local is None:
        return None
    url = getattr(run, "url", None)
    return f"{url.rsplit('/runs/', 1)[0]}/runs/{earlier_wandb_id(cell_dir)}" if url and "/runs/" in url else str(local)
