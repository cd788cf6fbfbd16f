"""What squeeze's sweeper (hydra_plugins/squeeze_sweeper: Hydra's basic sweeper, aware of compressor settings: in `python train.py -m compress=none,imp
compress.imp.target=0.3,0.5` the target means nothing to the `none` cell, so that cell runs once, not once
per target) changes about Hydra's cartesian product: the cells, pruned. Batching and launching stay Hydra's."""

from __future__ import annotations

import re
_SETTING = re.compile(r"^\+{0,2}compress\.([A-Za-z_][\w-]*)\.")
_CHOICE = re.compile(r"^compress=(.*)$")


def chosen(job: list[str], default: list[str]) -> list[str]:
    """The compressor names a cell's overrides choose (`compress=imp`, `compress=[pkd,imp]`), else `default`."""
    for override in job:
        found = _CHOICE.match(override)
        if found:
            names = [n.strip() for n in found.group(1).strip().strip("[]").split(",") if n.strip()]
            return [n for n in names if n != "none"]
    return default


def prune_cells(jobs: list[list[str]], default: list[str]) -> list[list[str]]:
    """Drop each cell's settings for compressors it does not use, then cells that became identical."""
    seen: set[tuple[str, ...]] = set()
    cells = []
    for job in jobs:
        names = chosen(job, default)
        kept = [o for o in job if not (_SETTING.match(o) and _SETTING.match(o).group(1) not in names)]
        if tuple(kept) not in seen:
            seen.add(tuple(kept))
            cells.append(kept)
    return cells
