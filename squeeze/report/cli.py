"""`python -m squeeze.report PATH... [--out DIR] [--baseline CHAIN] [--wandb]`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import squeeze.report as report_package
from squeeze.errors import SqueezeError
from squeeze.report.aggregate import BASELINE
from squeeze.report.wandb_log import log_wandb


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m squeeze.report", description=report_package.__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", metavar="PATH", help="sweep directory (multirun/<time>) or run directories")
    parser.add_argument("--out", help="output directory (default: <first PATH>/report)")
    parser.add_argument("--baseline", default=BASELINE, help="chain Δ%% is measured against (default: none)")
    parser.add_argument("--wandb", action="store_true", help="also log tables and plots to W&B (project squeeze)")
    args = parser.parse_args(argv)
    try:
        report = report_package.build(args.paths, args.out, args.baseline)
        print(f"report: {report.markdown}  ({len(report.cells)} records, {len(report.groups)} model × task tables)")
        if args.wandb:
            group = Path(args.paths[0]).resolve()
            run_dir = log_wandb(report, (group.parent if group.is_file() else group).name)
            print(f"W&B run: {run_dir}")
    except SqueezeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
