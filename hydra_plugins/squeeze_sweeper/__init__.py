"""squeeze's sweeper: Hydra's basic sweeper, except that a cell does not repeat for settings of compressors
it does not use (squeeze.run.sweep.prune_cells; a setting no cell uses, or a misspelt one, stops the sweep before
its first cell: squeeze.run.sweep.check_settings), and a preset's `rows` (squeeze.run.sweep.with_rows) are crossed
with the sweep. Hydra takes plugins only from the hydra_plugins namespace, and imports every module there before
it composes a config, so the sweeper's schema (hydra/sweeper=squeeze, which train.yaml selects) registers here.

SearchSweeper (hydra/sweeper=search, conf/hydra/sweeper/search.yaml) searches the same cells with Optuna instead of
running their product: squeeze.run.search decides the trials; here they become Hydra jobs."""

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobStatus
from hydra.plugins.sweeper import Sweeper
from omegaconf import OmegaConf, open_dict

from squeeze import config
from squeeze.errors import SqueezeError, main_exit
from squeeze.run.sweep import check_settings, default_chain, expand, prune_cells

log = logging.getLogger("squeeze")


@dataclass
class SqueezeSweeperConf:
    """hydra/sweeper=squeeze: Hydra's basic sweeper's settings plus a preset's rows and setups."""

    _target_: str = "hydra_plugins.squeeze_sweeper.SqueezeSweeper"
    max_batch_size: Optional[int] = None
    params: Optional[Dict[str, str]] = None
    rows: Optional[List[str]] = None  # each a string of overrides that go together (one report row)
    setups: Optional[List[str]] = None  # each a string of overrides (a model × task pair), crossed with rows
    exclude: Optional[List[str]] = None  # each a string of overrides: a cell holding all of them is left out


ConfigStore.instance().store(group="hydra/sweeper", name="squeeze", node=SqueezeSweeperConf, provider="squeeze")


class SqueezeSweeper(BasicSweeper):
    def __init__(self, max_batch_size: Optional[int] = None, params: Optional[Dict[str, str]] = None,
                 rows: Optional[List[str]] = None, setups: Optional[List[str]] = None,
                 exclude: Optional[List[str]] = None):
        super().__init__(max_batch_size=max_batch_size, params=params)
        self.rows = list(rows) if rows else []
        self.setups = list(setups) if setups else []
        self.exclude = list(exclude) if exclude else []

    def split_arguments(self, overrides: Any, max_batch_size: int | None) -> list[list[list[str]]]:  # type: ignore[override]
        # A plain function (squeeze.run.sweep.expand), so squeeze.plan lists the same cells without a sweep.
        jobs, notes = expand(overrides, self.rows, self.setups, default_chain(self.config), self.exclude)
        for note in notes:  # a setting for a compressor only some cells use: which cells it reaches
            log.info(note)
        config.runs_started()  # launchers' errors are Hydra's to report again
        if max_batch_size is None:
            return [jobs]
        return [jobs[i:i + max_batch_size] for i in range(0, len(jobs), max_batch_size)]

    def sweep(self, arguments: List[str]) -> Any:
        # A preset's `search:` section makes its sweep a search: a preset's defaults list cannot choose
        # hydra/sweeper=search itself, since Hydra keeps train.yaml's own `override hydra/sweeper: squeeze`.
        if self.config is not None and self.config.get("search") is not None:
            if self.exclude:
                main_exit(SqueezeError("hydra.sweeper.exclude leaves cells out of a grid; a search samples its own "
                                       "settings and would ignore it: drop the exclude entries or the search"))
            searcher = SearchSweeper(params=self.params, rows=self.rows, setups=self.setups)
            searcher.hydra_context, searcher.config, searcher.launcher = self.hydra_context, self.config, self.launcher
            return searcher.sweep(arguments)
        return super().sweep(arguments)


class SearchSweeper(Sweeper):
    """hydra/sweeper=search: trials asked of an Optuna study (squeeze.run.search), each launched as the cell the
    squeeze sweeper would run for those settings, into the same sweep directory layout (trial n is job n)."""

    def __init__(self, params: Optional[Dict[str, str]] = None, rows: Optional[List[str]] = None,
                 setups: Optional[List[str]] = None):
        super().__init__()
        self.params = dict(params or {})
        self.rows = list(rows) if rows else []
        self.setups = list(setups) if setups else []
        self.hydra_context: Any = None
        self.config: Any = None
        self.launcher: Any = None

    def setup(self, *, hydra_context: Any, task_function: Any, config: Any) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context,
                                                                task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> Any:
        try:
            return self._search(arguments)
        except SqueezeError as e:  # before the first cell and after it alike: one line, exit 2
            main_exit(e)

    def _search(self, arguments: List[str]) -> None:
        from squeeze.run import search  # Optuna is imported only when a search runs

        settings = search.read_settings(OmegaConf.to_container(self.config.get("search"), resolve=True)
                                        if self.config.get("search") is not None else None)
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)  # glob() lists options
        overrides = parser.parse_overrides([*(f"{k}={v}" for k, v in self.params.items()), *arguments])
        default = default_chain(self.config)
        space = search.Space.parse(overrides, self.rows, self.setups, default)
        # The grid sweeper's checks, on cells that stand for the space: every compress.<name>.<key> names a setting
        # some chain uses, and the cells compose (a misspelt option stops here, not in trial 7).
        _, notes = check_settings(space.examples(), default)
        for note in notes:
            log.info(note)
        self.validate_batch_is_legal(prune_cells(space.samples(), default))
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        study = search.open_study(sweep_dir, space, settings)
        config.runs_started()
        search.run(study, space, settings, self._cell_dir, self._launch)
        search.write_front(study, sweep_dir, settings)

    def _cell_dir(self, overrides: List[str], number: int) -> Path:
        """The directory Hydra's launcher gives these overrides as job `number` (as hydra.core.utils.run_job
        resolves hydra.sweep.subdir); composing it also tells whether the trial's config composes."""
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(cfg):
            cfg.hydra.job.id = number
            cfg.hydra.job.num = number
        held = HydraConfig.instance().cfg
        HydraConfig.instance().set_config(cfg)  # ${hydra:runtime.choices.model} in the subdir reads it
        try:
            return Path(os.path.abspath(os.path.join(str(cfg.hydra.sweep.dir), str(cfg.hydra.sweep.subdir))))
        finally:
            HydraConfig.instance().cfg = held

    def _launch(self, jobs: List[Any]) -> Dict[int, str]:
        """Launch the jobs, each as job number = its trial's number; an error line per job that raised. In this
        process (Hydra's basic launcher) one job at a time, so a cell that exits 2 before its run (a refused
        setting) is known by its trial; elsewhere (submitit) each run of consecutive numbers at once."""
        groups: List[List[Any]] = []
        for job in jobs:
            if groups and not isinstance(self.launcher, BasicLauncher) and groups[-1][-1].number + 1 == job.number:
                groups[-1].append(job)
            else:
                groups.append([job])
        errors: Dict[int, str] = {}
        for group in groups:
            try:
                returns = self.launcher.launch([j.overrides for j in group], initial_job_idx=group[0].number)
            except SystemExit as e:
                if e.code != 2:  # a signal stopped the cell (128 + n): the search stops; a rerun resumes it
                    raise
                errors[group[0].number] = "the cell stopped before its run started (its error line is above)"
                continue
            except Exception as e:  # submitit's FailedJobError (a cell exited): its trials fail, the search goes on
                errors.update({j.number: config.error_line(e) for j in group})
                log.warning("search: launching cells %s failed: %s", [j.number for j in group], config.error_line(e))
                continue
            for job, ret in zip(group, returns):
                if ret.status == JobStatus.FAILED:
                    try:
                        ret.return_value  # raises the job's exception
                    except Exception as e:
                        errors[job.number] = config.error_line(e)
        return errors

