"""squeeze's sweeper: Hydra's basic sweeper, except that a cell does not repeat for settings of compressors
it does not use (squeeze.sweeper.prune_cells). Hydra takes plugins only from the hydra_plugins namespace."""

from __future__ import annotations

from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

from squeeze.sweeper import prune_cells


class SqueezeSweeper(BasicSweeper):
    def split_arguments(self, overrides: Any, max_batch_size: int | None) -> list[list[list[str]]]:  # type: ignore[override]
        default = [str(k) for k, v in (self.config.get("compress") or {}).items()
                   if v is not None and "_target_" in v] if self.config is not None else []
        jobs = [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]
        jobs = prune_cells(jobs, default)
        if max_batch_size is None:
            return [jobs]
        return [jobs[i:i + max_batch_size] for i in range(0, len(jobs), max_batch_size)]
