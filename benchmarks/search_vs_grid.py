"""A 12-trial search against the 12-cell grid over the same space, side by side.

What it runs
    compress=imp on tiny_gpt2 × austen (a few dozen steps on short blocks), over compress.imp.target in [0.3, 0.9] ×
    compress.imp.granularity in {global, layer}, for test/perplexity (min) and size (MB, min):
      grid    python train.py -m compress.imp.target=0.3,0.42,0.54,0.66,0.78,0.9 compress.imp.granularity=global,layer
      search  python train.py -m hydra/sweeper=search search.trials=12 'compress.imp.target=interval(0.3,0.9)'
              'compress.imp.granularity=choice(global,layer)'   (NSGA-II, seed --seed)
    Both with the same seed, data and steps, one after the other (on a shared CPU their wall times are rough).

What it prints
    Every grid cell and every search trial (target, granularity, perplexity, size, whether it is on its own run's
    Pareto front), then each point of the search's front with the grid cells that dominate it (lower or equal on
    both objectives, lower on one): the goal is none. Exit 1 when a grid cell dominates a front point.

Run
    .venv/bin/python benchmarks/search_vs_grid.py                  # outputs under /tmp/squeeze-search-vs-grid
    .venv/bin/python benchmarks/search_vs_grid.py --steps 40 --trials 12 --seed 1 --out /tmp/svg
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GRID_TARGETS = "0.3,0.42,0.54,0.66,0.78,0.9"


def common(steps: int) -> list[str]:
    return ["model=tiny_gpt2", "task=austen", "compress=imp", f"trainer.max_steps={steps}", "compress.imp.frequency=2",
            "task.data.block_size=32", "task.data.max_examples.train=600", "task.data.max_examples.validation=100",
            "task.data.max_examples.test=200", "task.data.batch_size=8", "perf=null", "logger=csv", "hardware=cpu",
            "trainer.enable_progress_bar=false", "optimizer.lr=1e-3", "seed=0"]


def run(args: list[str], log: Path) -> float:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline"}
    start = time.time()
    with open(log, "w") as out:
        code = subprocess.run([sys.executable, str(ROOT / "train.py"), "-m", *args], cwd=log.parent, env=env,
                              stdout=out, stderr=subprocess.STDOUT).returncode
    if code != 0:
        sys.exit(f"{' '.join(args[:4])} ... exited {code}; see {log}")
    return time.time() - start


def points(sweep: Path) -> list[dict]:
    out = []
    cells = (p for p in sweep.iterdir() if p.is_dir() and p.name[0].isdigit())
    for d in sorted(cells, key=lambda p: int(p.name.split("_")[0])):
        r = json.loads((d / "result.json").read_text())
        if r.get("status") != "ok":
            out.append({"cell": d.name, "status": r.get("status"), "error": r.get("error")})
            continue
        imp = r["config"]["compress"]["imp"]
        out.append({"cell": d.name, "status": "ok", "target": imp["target"], "granularity": imp["granularity"],
                    "ppl": r["metrics"]["test/perplexity"], "size": r["checkpoint_bytes"] / 1e6})
    return out


def dominates(a: dict, b: dict) -> bool:
    return a["ppl"] <= b["ppl"] and a["size"] <= b["size"] and (a["ppl"] < b["ppl"] or a["size"] < b["size"])


def front(pts: list[dict]) -> list[dict]:
    ok = [p for p in pts if p["status"] == "ok"]
    return [p for p in ok if not any(dominates(q, p) for q in ok)]


def table(title: str, pts: list[dict], wall: float) -> None:
    on = {p["cell"] for p in front(pts)}
    print(f"\n{title}: {len(pts)} cells, {wall:.0f} s wall")
    print(f"  {'cell':<28} {'target':>7} {'granularity':>11} {'perplexity':>12} {'size MB':>9}  front")
    for p in pts:
        if p["status"] != "ok":
            print(f"  {p['cell']:<28} {p['status']}: {p['error']}")
            continue
        print(f"  {p['cell']:<28} {p['target']:>7.3f} {p['granularity']:>11} {p['ppl']:>12.2f} {p['size']:>9.4f}  "
              f"{'*' if p['cell'] in on else ''}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0, help="the search's sampler seed")
    parser.add_argument("--out", type=Path, default=Path("/tmp/squeeze-search-vs-grid"))
    a = parser.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    grid_dir, search_dir = a.out / "grid", a.out / "search"
    grid_wall = run([*common(a.steps), f"compress.imp.target={GRID_TARGETS}", "compress.imp.granularity=global,layer",
                     f"hydra.sweep.dir={grid_dir}"], a.out / "grid.log")
    search_wall = run(["hydra/sweeper=search", f"search.trials={a.trials}", f"search.seed={a.seed}",
                       "search.objectives=[test/perplexity:min,size:min]", *common(a.steps),
                       "compress.imp.target=interval(0.3,0.9)", "compress.imp.granularity=choice(global,layer)",
                       f"hydra.sweep.dir={search_dir}"], a.out / "search.log")
    grid, found = points(grid_dir), points(search_dir)
    table("grid", grid, grid_wall)
    table(f"search (NSGA-II, seed {a.seed})", found, search_wall)
    pareto = json.loads((search_dir / "pareto.json").read_text())
    ok_grid = [g for g in grid if g["status"] == "ok"]
    beaten = 0
    print(f"\nthe search's front ({len(pareto['front'])} points, {search_dir / 'pareto.json'}) against the grid's "
          f"{len(ok_grid)} cells:")
    for point in pareto["front"]:
        p = next(x for x in found if x["cell"] == point["cell"])
        by = [g["cell"] for g in ok_grid if dominates(g, p)]
        beaten += bool(by)
        print(f"  trial {point['trial']:>2} target {p['target']:.3f} {p['granularity']:<6} perplexity {p['ppl']:.2f} "
              f"size {p['size']:.4f} MB: {'dominated by ' + ', '.join(by) if by else 'no grid cell dominates it'}")
    grid_front = front(grid)
    covered = sum(any(dominates(f, g) or (f["ppl"], f["size"]) == (g["ppl"], g["size"]) for f in front(found))
                  for g in grid_front)
    print(f"  the grid's own front: {len(grid_front)} cells; {covered} of them matched or dominated by a search point")
    print(f"\n{'every' if not beaten else 'NOT every'} point of the search's front is undominated by the grid "
          f"({beaten} dominated)")
    return 1 if beaten else 0


if __name__ == "__main__":
    sys.exit(main())
