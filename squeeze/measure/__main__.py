"""`python -m squeeze.measure DIR [DIR ...] [--rounds N] [--baseline NAME] [--out FILE]`: latency and decoding
speed of a sweep's rows (or of run directories) measured side by side in interleaved rounds
(squeeze/measure/side_by_side.py), written to side_by_side.json, which `python -m squeeze.report` then uses."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from squeeze.errors import SqueezeError


def _sizes(text: str) -> list[int]:
    try:
        return [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of batch sizes (e.g. 1,16)") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m squeeze.measure", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", metavar="DIR",
                        help="a sweep directory (multirun/<time>) or run directories")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved timed rounds (default 10)")
    parser.add_argument("--repeats", type=int, default=3, help="forward passes per row and round; their median is "
                                                              "the round's figure (default 3)")
    parser.add_argument("--decode-repeats", type=int, default=1, help="generates per row and round (default 1)")
    parser.add_argument("--warmup", type=int, help="warm-up passes per row (default: the record's perf.warmup)")
    parser.add_argument("--batch-sizes", type=_sizes, help="forward batch sizes, e.g. 1,16 (default: perf.batch_sizes)")
    parser.add_argument("--decode-batch-sizes", type=_sizes,
                        help="decoding batch sizes; '' skips decoding (default: perf.decode_batch_sizes)")
    parser.add_argument("--baseline", help="row name or chain the ratios are against (default: the chain none)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--load", choices=("auto", "all", "each"), default="auto",
                        help="keep every row's model loaded (all), load each before its turn (each), or decide "
                             "from the available memory (auto, default)")
    parser.add_argument("--out", help="output file (default: DIR/side_by_side.json for one sweep directory, "
                                      "else ./side_by_side.json)")
    args = parser.parse_args(argv)
    try:
        import torch

        from squeeze.measure import side_by_side
        from squeeze.report.cells import BASELINE

        if args.threads is not None:
            if args.threads < 1:
                raise SqueezeError(f"--threads {args.threads} must be at least 1")
            torch.set_num_threads(args.threads)
        document = side_by_side.side_by_side(
            args.paths, args.baseline or BASELINE, args.baseline is not None, args.rounds, args.repeats,
            args.decode_repeats, args.warmup, args.batch_sizes, args.decode_batch_sizes, args.device,
            {"auto": None, "all": True, "each": False}[args.load], progress=lambda line: print(line, flush=True))
        out = side_by_side.write(document, args.out or side_by_side.default_out(args.paths))
    except SqueezeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"side by side: {out}  ({len(document['rows'])} rows, {len(document['groups'])} model × task groups, "
          f"{document['rounds']} rounds, {document['threads']} threads)")
    for row in document["rows"]:
        ratios = row["ratio_to_baseline"] or {}
        shown = ", ".join(f"{figure} ×{r['median']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]"
                          for figure, r in ratios.items())
        print(f"  {row['model']} × {row['task']}  {row['name']}: {shown or 'no baseline in its group'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
