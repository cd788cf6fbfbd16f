"""`python -m squeeze.recommend PATH... [--max-drop 1pt|5%] [--minimize size|latency|decode|energy|cost]
[--device DEVICE] [--baseline CHAIN] [--json]`: per model × task, the row with the best objective among those
whose quality stays within the budget of the baseline, the Pareto front, and how sure that is
(squeeze/report/recommend.py says how, and the --json shape)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from squeeze.errors import SqueezeError
from squeeze.report import recommend
from squeeze.report.cells import BASELINE


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m squeeze.recommend",
                                     description="The smallest, fastest or most frugal row within a quality budget.")
    parser.add_argument("paths", nargs="+", metavar="PATH", help="sweep directory (multirun/<time>) or run directories")
    parser.add_argument("--max-drop", help="quality the row may lose against the baseline: points (1pt; ×100 for "
                                           "metrics in [0, 1]) or relative (5%%); default 1pt, or 5%% for metrics "
                                           "outside [0, 1] such as perplexity")
    parser.add_argument("--minimize", default=recommend.DEFAULT_OBJECTIVE, choices=list(recommend.OBJECTIVES),
                        help="size MB, batch-1 latency, decode (tokens/s, maximised), energy (inference kWh/1k), "
                             "cost (total kWh); default size")
    parser.add_argument("--device", help="whose latency/decode figures count when records hold several (cpu, cuda)")
    parser.add_argument("--baseline", default=BASELINE, help="chain or row the budget is measured against "
                                                            "(default: none)")
    parser.add_argument("--json", action="store_true", help="print the document described in "
                                                           "squeeze/report/recommend.py")
    args = parser.parse_args(argv)
    try:
        doc = recommend.run(args.paths, args.max_drop, args.minimize, args.device, args.baseline)
    except SqueezeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(doc, indent=2) if args.json else "\n".join(recommend.text(doc)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
