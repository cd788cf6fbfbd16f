"""squeeze's sweeper: Hydra's basic sweeper, except that a cell does not repeat for settings of compressors
it does not use (squeeze.run.sweep.prune_cells; a setting no cell uses, or a misspelt one, stops the sweep before
its first cell: squeeze.run.sweep.check_settings), and a preset's `rows` (squeeze.run.sweep.with_rows) are crossed
with the sweep. Hydra takes plugins only from the hydra_plugins namespace, and imports every module there before
it composes a config, so the sweeper's schema (hydra/sweeper=squeeze, which train.yaml selects) registers here."""

import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore

from squeeze import config
from squeeze.run.sweep import check_settings, with_rows

log = logging.getLogger("squeeze")


@dataclass
class SqueezeSweeperConf:
    """hydra/sweeper=squeeze: Hydra's basic sweeper's settings plus a preset's rows and setups."""

    _target_: str = "hydra_plugins.squeeze_sweeper.SqueezeSweeper"
    max_batch_size: Optional[int] = None
    params: Optional[Dict[str, str]] = None
    rows: Optional[List[str]] = None  # each a string of overrides that go together (one report row)
    setups: Optional[List[str]] = None  # each a string of overrides (a model × task pair), crossed with rows


ConfigStore.instance().store(group="hydra/sweeper", name="squeeze", node=SqueezeSweeperConf, provider="squeeze")


class SqueezeSweeper(BasicSweeper):
    def __init__(self, max_batch_size: Optional[int] = None, params: Optional[Dict[str, str]] = None,
                 rows: Optional[List[str]] = None, setups: Optional[List[str]] = None):
        super().__init__(max_batch_size=max_batch_size, params=params)
        self.rows = list(rows) if rows else []
        self.setups = list(setups) if setups else []

    def split_arguments(self, overrides: Any, max_batch_size: int | None) -> list[list[list[str]]]:  # type: ignore[override]
        default = [str(k) for k, v in (self.config.get("compress") or {}).items()
                   if v is not None and "_target_" in v] if self.config is not None else []
        jobs = [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]
        jobs, notes = check_settings(with_rows(jobs, self.rows, self.setups), default)
        for note in notes:  # a setting for a compressor only some cells use: which cells it reaches
            log.info(note)
        config.runs_started()  # launchers' errors are Hydra's to report again
        if max_batch_size is None:
            return [jobs]
        return [jobs[i:i + max_batch_size] for i in range(0, len(jobs), max_batch_size)]
