"""Logging a built report's tables (wandb.Table) and plots (wandb.Image) to Weights & Biases."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from squeeze.errors import SqueezeError
from squeeze.loggers import wandb_has_key
from squeeze.report.tables import cell_columns, cell_records, group_records, row_columns

if TYPE_CHECKING:
    from squeeze.report import Report


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
        for g in report.groups:
            columns, rows = row_columns(g), group_records(g)
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
