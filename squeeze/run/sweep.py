"""Which cells a sweep has: what squeeze's sweeper (hydra_plugins/squeeze_sweeper: Hydra's basic sweeper, aware of
compressor settings: in `python train.py -m compress=none,imp compress.imp.target=0.3,0.5` the target means nothing
to the `none` cell, so that cell runs once, not once per target) changes about Hydra's cartesian product: the cells,
pruned, and a preset's rows and setups crossed in. Batching and launching stay Hydra's. Plain functions on override
strings: the plugin calls them (`expand`), squeeze.plan lists a sweep's cells with them before it runs (`cells`), and
squeeze.run.loggers rebuilds a sweep's cells with them to name a run."""

from __future__ import annotations

import re
import shlex
from typing import Any

from squeeze.config import (check_compressor_setting, check_compressor_values, compressor_options,
                            lenient_compressor_settings)
from squeeze.errors import SqueezeError

# What only steers this invocation (resuming, rerunning failed cells, trusting a file, a search's budget, how often
# checkpoints are written and what a finished run keeps of them, a preset's report layout), not what the cell is: a
# rerun, or a search rerun with more trials, finds its finished cells the same.
NOT_THE_CELL = ("ckpt_path", "rerun_failed", "trust_checkpoint", "hydra", "search", "checkpoint", "report")
_SETTING = re.compile(r"^\+{0,2}compress\.([A-Za-z_][\w-]*)\.")
_CHOICE = re.compile(r"^compress=(.*)$")


def default_chain(cfg: Any) -> list[str]:
    """The compressors a cell uses when its overrides choose none (the composed config's compress)."""
    return [str(k) for k, v in (cfg.get("compress") or {}).items()
            if v is not None and "_target_" in v] if cfg is not None else []


def expand(overrides: list[Any], rows: list[str], setups: list[str], default: list[str],
           exclude: list[str] = ()) -> tuple[list[list[str]], list[str]]:
    """The cells of a sweep in job order (hydra.job.num, the sweep directories' prefixes) and the notes for its log:
    Hydra's basic sweeper's product of the parsed `overrides` (hydra's Override objects), a preset's rows and setups
    crossed in, the `exclude`d combinations left out, each cell's settings of compressors it does not use dropped
    (check_settings)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    jobs = [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]
    jobs, notes = without(with_rows(jobs, rows, setups), exclude)
    cells, more = check_settings(jobs, default)
    return cells, [*notes, *more]


def without(jobs: list[list[str]], exclude: list[str]) -> tuple[list[list[str]], list[str]]:
    """The cells that hold not every override of any `exclude` entry (hydra.sweeper.exclude: strings of overrides,
    e.g. "model=gpt2-xl task=lambada", "model=gpt2-xl compress.kd.label=Distil": a study that left those out). An
    entry that leaves out nothing is said (a narrower command line, or a typo), not an error."""
    entries = [set(lenient_compressor_settings(shlex.split(str(e)))) for e in exclude or ()]
    normal = [{o.lstrip("+") for o in entry} for entry in entries]
    kept, notes = [], []
    hits = [0] * len(entries)
    for job in jobs:
        has = {o.lstrip("+") for o in job}
        matched = [i for i, entry in enumerate(normal) if entry <= has]
        for i in matched:
            hits[i] += 1
        if not matched:
            kept.append(job)
    notes += [f"hydra.sweeper.exclude entry {exclude[i]!r} leaves out no cell of this sweep"
              for i, n in enumerate(hits) if n == 0]
    if entries and not kept:
        raise SqueezeError("hydra.sweeper.exclude leaves out every cell of this sweep; drop or narrow an entry")
    return kept, notes


def cells(cfg: Any, config_loader: Any = None) -> tuple[list[list[str]], list[str]]:
    """`expand` for a sweep's config as Hydra composes it for `-m`: its overrides read and parsed as Hydra's basic
    sweeper does before it splits them (hydra.sweeper.params first, then the command line's; glob() needs the
    config loader)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    sweeper = OmegaConf.to_container(cfg.hydra.sweeper, resolve=True)
    arguments = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
    arguments += OmegaConf.to_container(cfg.hydra.overrides.task, resolve=False)
    overrides = OverridesParser.create(config_loader=config_loader).parse_overrides(arguments)
    return expand(overrides, list(sweeper.get("rows") or []), list(sweeper.get("setups") or []), default_chain(cfg),
                  list(sweeper.get("exclude") or []))


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


def check_settings(jobs: list[list[str]], default: list[str]) -> tuple[list[list[str]], list[str]]:
    """Every `compress.<name>.<key>` of the sweep names a compressor and one of its settings
    (squeeze.config.check_compressor_setting); then the cells (prune_cells). A setting that no cell keeps (no cell
    uses its compressor) is an error before the first cell starts; one that only some cells keep is said, with
    which cells (the lines returned, for the log)."""
    for job in jobs:
        defined = {m.group(1) for o in job if (m := _SETTING.match(o)) and _key(o).endswith("._target_")}
        for override in job:
            found = _SETTING.match(override)
            if found and found.group(1) not in defined:  # a compressor defined on the command line has no YAML
                check_compressor_setting(found.group(1), _key(override).split(".")[2:])
    cells = prune_cells(jobs, default)
    for cell in cells:  # the values too, where a compressor checks them: before the first cell, not at its own
        _check_cell_values(cell, default)
    dropped = {_key(o): found.group(1) for job in jobs for o in job
               if (found := _SETTING.match(o)) and found.group(1) not in chosen(job, default)}
    notes = []
    for key, name in dropped.items():
        kept = [i for i, cell in enumerate(cells) if any(_key(o) == key for o in cell)]
        rest = [i for i in range(len(cells)) if i not in kept]
        if not kept:
            chains = list(dict.fromkeys(_chain(cell, default) for cell in cells))
            other = next((c for c in chains if c != "none"), None)
            example = f"[{other.replace('+', ',')},{name}]" if other else name
            raise SqueezeError(f"{key}: no cell of this sweep uses {name} (compress={','.join(chains)}); add it to "
                               f"a chain (e.g. compress={example}) or drop the setting")
        if rest:
            others = ", ".join(dict.fromkeys(_chain(cells[i], default) for i in rest))
            notes.append(f"{key} applies to cells {cell_numbers(kept)} (their chain has {name}), not to cells "
                         f"{cell_numbers(rest)} ({others})")
    return cells, notes


def _chain(cell: list[str], default: list[str]) -> str:
    return "+".join(chosen(cell, default)) or "none"


def cell_numbers(indices: list[int]) -> str:
    """0-2,5: cell numbers as the sweep directories' prefixes (hydra.job.num) give them."""
    spans, start = [], None
    for i, n in enumerate(indices):
        if start is None:
            start = n
        if i + 1 == len(indices) or indices[i + 1] != n + 1:
            spans.append(str(start) if start == n else f"{start}-{n}")
            start = None
    return ",".join(spans)


def with_rows(jobs: list[list[str]], rows: list[str], setups: list[str] | None = None) -> list[list[str]]:
    """Each cell of the sweep once per preset setup and row (`hydra.sweeper.setups` / `rows`: strings of
    overrides that go together, e.g. "model=gpt2 task=personachat", or "compress=[kd,heads,int8wo]
    compress.kd.teacher=auto compress.heads.amount=0.1 compress.kd.label=Distil compress.heads.label=90").
    What a preset's setups or rows set, the command line may not set too (every cell would override it)."""
    parsed = [[lenient_compressor_settings(shlex.split(str(s))) for s in group] for group in (setups, rows) if group]
    if not parsed:
        return jobs
    preset_keys = {_key(o) for group in parsed for entry in group for o in entry}
    for job in jobs:
        clash = [o for o in job if _key(o) in preset_keys]
        if clash:
            raise SqueezeError(f"this preset's rows or setups set {_key(clash[0])}, so {clash[0]} on the command "
                               "line would be overridden in every cell; drop it, or run without the preset")
    cells = [list(job) for job in jobs]
    for group in parsed:
        cells = [[*cell, *entry] for cell in cells for entry in group]
    return cells


def _check_cell_values(cell: list[str], default: list[str]) -> None:
    """A cell's compressor settings (its YAML's, with the cell's own `compress.<name>.<key>=value` over them) through
    the compressor's `check_values` (squeeze.config.check_compressor_values), for the compressors its chain uses."""
    import yaml

    options = compressor_options()
    for name in chosen(cell, default):
        node = dict(options.get(name) or {})
        if "_target_" not in node:
            continue
        for override in cell:
            found = _SETTING.match(override)
            path = _key(override).split(".")[2:]
            if found and found.group(1) == name and len(path) == 1:
                try:
                    node[path[0]] = yaml.safe_load(override.split("=", 1)[1])
                except yaml.YAMLError:
                    return  # Hydra's own parser says what is wrong with it
        check_compressor_values(name, node)


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")
