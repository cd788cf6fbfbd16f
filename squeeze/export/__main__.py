"""`python -m squeeze.export RUN_DIR OUT_DIR [--format compressed-tensors|transformers]`: a run's model written so
that `AutoModelFor<head>.from_pretrained(OUT_DIR)` loads it in a Python without squeeze (squeeze/export/)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from squeeze.errors import SqueezeError


def main(argv: Sequence[str] | None = None) -> int:
    from squeeze.export import FORMATS

    parser = argparse.ArgumentParser(prog="python -m squeeze.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a squeeze run directory (or its model/ directory)")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="where to write the model (new, empty or an earlier export)")
    parser.add_argument("--format", choices=FORMATS, default=FORMATS[0],
                        help="compressed-tensors (default): integer layers stay integers where compressed-tensors "
                             "can express them; transformers: every layer float")
    args = parser.parse_args(argv)
    try:
        from squeeze.export import export

        summary = export(args.run_dir, args.out_dir, args.format)
    except SqueezeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {summary['source']} → {args.out_dir} ({summary['format']}, {summary['bytes'] / 1e6:.1f} MB; "
          f"the source {summary['source_bytes'] / 1e6:.1f} MB)")
    print(f"  load it with: {summary['load']}  (needs {', '.join(summary['needs'])})")
    for line in summary["given_up"] or ["nothing: the same layers and storage as the run's model"]:
        print(f"  given up: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
