"""Identity check of the side-by-side measurement: a copy of a run directory measured beside its original.

What it measures
    The run directory (or, without one, a freshly trained tiny GPT-2 × austen run) is copied, and
    `python -m squeeze.measure`'s code times the original and the copy in interleaved rounds with the
    original as the baseline. The two models are the same file, so every ratio should come out at 1.00:
    the printed ratios (median over rounds of the paired per-round ratios, with the 95 % interval) show how
    much noise a side-by-side comparison has on this machine. The check passes when every median ratio is
    within ±3 % of 1 (exit 0; 1 otherwise). On a machine busy with other work raise --rounds and --repeats
    and pin --threads 1.

Run
    .venv/bin/python benchmarks/side_by_side_identity.py                      # a fresh tiny run (minutes on a busy CPU)
    .venv/bin/python benchmarks/side_by_side_identity.py outputs/<run dir> --rounds 40 --threads 1
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 0.03
TINY_RUN = ["model=tiny_gpt2", "task=austen", "trainer.max_steps=2", "logger=csv", "hardware=cpu",
            "callbacks.energy=null", "trainer.enable_progress_bar=false", "task.data.block_size=32",
            "task.data.max_examples.train=64", "task.data.max_examples.validation=32", "task.data.max_examples.test=64"]


def tiny_run(where: Path) -> Path:
    run_dir = where / "tiny_gpt2_austen"
    subprocess.run([sys.executable, str(ROOT / "train.py"), *TINY_RUN, f"hydra.run.dir={run_dir}"], cwd=where,
                   check=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    return run_dir


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", nargs="?", help="a finished run directory (default: train a tiny one)")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=10, help="forward passes per row and round")
    parser.add_argument("--decode-repeats", type=int, default=3, help="generates per row and round")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()

    import torch

    from squeeze.measure import side_by_side

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="side_by_side_identity-") as tmp:
        original = Path(args.run_dir).resolve() if args.run_dir else tiny_run(Path(tmp))
        copy = Path(tmp) / f"{original.name}-copy"
        shutil.copytree(original, copy, ignore=shutil.ignore_patterns("checkpoints"))  # the model is what is timed
        document = side_by_side.side_by_side([original, copy], baseline=original.name, explicit_baseline=True,
                                             rounds=args.rounds, repeats=args.repeats,
                                             decode_repeats=args.decode_repeats)
    row = next(r for r in document["rows"] if r["name"] == copy.name)
    print(f"{copy.name} against {original.name}: {document['rounds']} rounds, {document['threads']} threads, "
          f"{document['machine']['cpu']} (load average {document['machine']['load_average']})")
    within = True
    for figure, ratio in row["ratio_to_baseline"].items():
        lo, hi = ratio["ci95"]
        ok = abs(ratio["median"] - 1) <= TOLERANCE
        within &= ok
        print(f"  {figure:18s} ratio {ratio['median']:.3f}  95 % CI [{lo:.3f}, {hi:.3f}]  "
              f"{'within' if ok else 'OUTSIDE'} ±{TOLERANCE:.0%}")
    return 0 if within else 1


if __name__ == "__main__":
    sys.exit(main())
