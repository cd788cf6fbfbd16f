"""This run as a cell: what Hydra says about it, read here into a plain `Cell` and handed on, and what its
directory holds from before. The one module that reads HydraConfig besides the entry points and the sweeper.

  guarded(cfg, body)  the run under squeeze.run.guard, its record started as "running". In a -m sweep rerun
                      into the same sweep directory a finished cell is skipped, a failed one too unless
                      rerun_failed=true, a killed one resumes from its newest checkpoint, and a directory that
                      holds a run of another config is moved aside (the cell runs afresh)
  earlier_run(cfg, d)  what a cell's directory holds from before, as that rerun judges it (squeeze.plan too)
  as_job(cfg, n)      a sweep's composed cell as Hydra's launcher completes job n (squeeze.plan; hydra_config_kept)
  Cell                the run directory, whether it is a sweep's cell, Hydra's group choices, the command
                      line's overrides, the launcher; `check_strategy` refuses DDP inside a local sweep
  run_group()         the W&B group (${run_group:}): the sweep, else model-task
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from squeeze.config import chain_name
from squeeze.errors import SqueezeError
from squeeze.hardware import checkpointing, retention, sharding
from squeeze.record import jsonable, new_record, read_record, write_record
from squeeze.run import guard
from squeeze.run.sweep import NOT_THE_CELL

log = logging.getLogger("squeeze")
CHOICE_GROUPS = ("model", "task", "compress", "hardware")


@dataclass(frozen=True)
class Cell:
    run_dir: Path  # where this run writes (a store entry trained for it: the entry's directory)
    multirun: bool  # a -m sweep's cell
    choices: dict[str, Any]  # Hydra's choice per config group (model=minilm, ...)
    overrides: tuple[str, ...]  # the command line's overrides of this run (a sweep cell's own)
    launcher: str  # hydra/launcher's _target_
    sweep_dir: str | None  # a sweep's directory (multirun only)

    def override(self, group: str) -> str | None:
        """The value the command line gives `group` (model=...), or None."""
        for override in self.overrides:
            key, _, value = override.partition("=")
            if key.lstrip("+~") == group:
                return value
        return None

    def record_choices(self, compress_cfg: Any) -> dict[str, Any]:
        """result.json's `choices`; the chain from the config, since a list choice (compress=[pkd,imp]) has no
        single name in Hydra."""
        return {**{g: self.choices.get(g) for g in CHOICE_GROUPS}, "compress": chain_name(compress_cfg)}

    def check_strategy(self, strategy: Any) -> None:
        """Lightning's DDP launcher starts the other ranks by re-running the command line; inside a local
        `-m` sweep that re-runs the whole sweep. On Slurm the scheduler starts the ranks instead."""
        spawns = str(strategy or "").startswith("ddp") or sharding.is_sharded(strategy)  # fsdp launches like ddp
        if self.multirun and spawns and "Slurm" not in self.launcher:
            raise SqueezeError(
                "hardware=ddp inside a local -m sweep would re-run the whole sweep in every rank; run the cells "
                "one by one, or sweep on a cluster with hydra/launcher=cluster (Slurm starts the ranks)"
            )


def current() -> Cell | None:
    """What Hydra says about the run in progress; None outside a Hydra job."""
    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    return Cell(run_dir=Path(hydra_cfg.runtime.output_dir), multirun=multirun,
                choices=dict(hydra_cfg.runtime.choices), overrides=tuple(hydra_cfg.overrides.task),
                launcher=str(hydra_cfg.launcher.get("_target_", "")),
                sweep_dir=str(hydra_cfg.sweep.dir) if multirun else None)


@contextlib.contextmanager
def hydra_config_kept():
    """squeeze.run.plan composes a sweep's jobs as Hydra's launcher does, each set as the current HydraConfig while
    it resolves; what HydraConfig held before comes back after."""
    held = HydraConfig.instance().cfg
    try:
        yield
    finally:
        HydraConfig.instance().cfg = held


def as_job(cfg: DictConfig, num: int) -> DictConfig:
    """A sweep cell's composed config (the config loader's load_sweep_config) as job `num`: as Hydra's basic launcher
    numbers it and hydra.core.utils.run_job completes it (its output directory set, not created)."""
    with open_dict(cfg):
        cfg.hydra.job.id = num
        cfg.hydra.job.num = num
    HydraConfig.instance().set_config(cfg)  # the subdir's ${hydra:runtime.choices.model} reads it
    out = os.path.join(str(OmegaConf.select(cfg, "hydra.sweep.dir")), str(OmegaConf.select(cfg, "hydra.sweep.subdir")))
    with read_write(cfg.hydra.runtime), open_dict(cfg.hydra.runtime):
        cfg.hydra.runtime.output_dir = os.path.abspath(out)
    HydraConfig.instance().set_config(cfg)
    return cfg


def run_group() -> str:
    """W&B group of a run: its sweep (the sweep directory's name) in a -m sweep, else model-task."""
    cell = current()
    if cell is None:
        raise SqueezeError("${run_group:} names a run's W&B group: it resolves inside train.py/evaluate.py only")
    if cell.multirun:
        return "sweep-" + str(cell.sweep_dir).rstrip("/").rsplit("/", 1)[-1]
    return f"{cell.choices.get('model')}-{cell.choices.get('task')}"


def guarded(cfg: DictConfig, body: Callable[[DictConfig, dict, Cell], Any], sweep_rerun: bool = False) -> dict:
    """Run `body(cfg, record, cell)` under squeeze.run.guard: a record written whatever happens.
    sweep_rerun: a sweep cell's earlier run in its directory is skipped or resumed (module docstring)."""
    cell = current()
    choices = cell.record_choices(cfg.get("compress"))
    if cell.multirun and sweep_rerun:
        previous = _previous_cell(cfg, cell.run_dir)
        if previous is not None:
            return previous
    if not cell.multirun and cfg.get("ckpt_path") == "last":  # nothing to resume: said before the directory's
        checkpointing.resume_path("last", cell.run_dir)       # record (a finished run's, say) is replaced
    record = new_record(cell.run_dir, choices, resolved(cfg), cfg.get("seed"))
    if guard._is_global_zero():
        write_record(cell.run_dir, record)  # status "running": a killed run is told from one that never started
    with checkpointing.signals:
        outcome = guard.guarded(lambda: body(cfg, record, cell), record, cell.run_dir, multirun=cell.multirun)
    keep = OmegaConf.select(cfg, "checkpoint.keep_after_success", default="all")
    if guard._is_global_zero():  # the record is written "ok" first: a kill in between keeps the checkpoints
        retention.after_success(outcome, cell.run_dir, keep)
    return outcome


def resolved(cfg: DictConfig) -> dict[str, Any]:
    """The config as result.json records it."""
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception as e:  # e.g. an asset path resolver failing: record what we can
        log.warning("config did not fully resolve: %s", e)
        return OmegaConf.to_container(cfg, resolve=False)


def _same_cell(config: dict[str, Any]) -> str:
    """A cell's config as result.json holds it (JSON), without what only steers this invocation."""
    kept = {k: v for k, v in config.items() if k not in NOT_THE_CELL}
    return json.dumps(kept, sort_keys=True, default=jsonable)


ANOTHER_CONFIG = "another config"  # earlier_run's status for a directory that holds a run of another config


def earlier_run(cfg: DictConfig, run_dir: Path) -> tuple[str | None, dict[str, Any] | None]:
    """What a sweep cell's directory holds from an earlier run, as a rerun judges it: its record's status and the
    record; (None, None) without a readable record; (ANOTHER_CONFIG, record) when the record is of another config
    than `cfg` (what only steers an invocation, NOT_THE_CELL, left out). squeeze.plan reports cells by it."""
    try:
        previous = read_record(run_dir)  # an old record's moved _target_s read as today's (squeeze.record)
        status = previous.get("status")
    except (OSError, ValueError):
        return None, None
    if previous.get("config") is not None and _same_cell(previous["config"]) != _same_cell(resolved(cfg)):
        return ANOTHER_CONFIG, previous
    return status, previous


def _previous_cell(cfg: DictConfig, run_dir: Path) -> dict[str, Any] | None:
    """A sweep rerun in the same sweep directory: a finished cell is skipped (its record returned), a failed one
    too unless rerun_failed=true, and an interrupted or killed one resumes from its newest checkpoint. A cell
    whose directory holds a run of another config (a preset's row edited, then rerun into its fixed sweep
    directory) is not that cell: its outputs move into <cell>/replaced-<time>/, kept, and the cell runs afresh."""
    status, previous = earlier_run(cfg, run_dir)
    if previous is None:
        return None
    if status == ANOTHER_CONFIG:
        # Hydra's own files (.hydra/, the job's log) stay; the run's outputs move into a kept folder.
        aside = run_dir / f"replaced-{time.strftime('%Y%m%d-%H%M%S')}"
        aside.mkdir()
        for item in run_dir.iterdir():
            if item != aside and item.name not in (".hydra",) and not item.name.endswith(".log"):
                item.rename(aside / item.name)
        log.info("cell %s: its directory held a run of another config (now in %s); running the cell afresh",
                 run_dir.name, aside)
        return None
    if status == "ok" or (status == "failed" and not cfg.get("rerun_failed")):
        log.info("cell %s: %s before, skipped%s", run_dir.name, "finished" if status == "ok" else "failed",
                 "" if status == "ok" else " (rerun_failed=true runs it again)")
        return read_record(run_dir)
    if status in ("running", "interrupted") and cfg.get("ckpt_path") is None:
        with open_dict(cfg):
            cfg.ckpt_path = "last_or_new"
    return None
