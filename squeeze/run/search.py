"""A search over a sweep's settings (hydra/sweeper=search: hydra_plugins/squeeze_sweeper.SearchSweeper launches the
cells; this module decides them). A grid of settings grows as a product; Optuna's samplers (NSGA-II by default, TPE)
find the trade-off front of several objectives in far fewer cells, asked for and told one trial at a time.

  python train.py -m hydra/sweeper=search search.trials=12 search.objectives='[test/perplexity:min,size:min]' \\
      compress=imp 'compress.imp.target=interval(0.3,0.9)' 'compress.imp.granularity=choice(global,layer)'

  Space       the command line (and a preset's params) in Hydra's override grammar: `interval(a,b)` (a float),
              `int(interval(a,b))`, `tag(log,interval(a,b))`, `range(a,b[,step])` (a stepped number), `choice(...)`,
              `a,b`, `glob(...)` (categorical); plain overrides are fixed. A preset's rows and setups are each one
              categorical choice. A compressor's setting is searched only in trials whose chain uses it (as the grid
              sweeper prunes it), and a trial whose cell equals a finished one's takes its outcome without running.
  Objective   a figure of the cell's result.json: a metric (`test/accuracy`), `quality` (the task's monitored test
              metric), or a report figure (`size`, `latency`, `sparsity`, `own_kwh`, `total_kwh`, ...), `:min`/`:max`
  run         the loop: trial n is cell `<sweep dir>/<n>_...`; a finished cell is told its objectives, a failed one
              FAIL (the search goes on). The study lives in `<sweep dir>/study.db`, so a killed search rerun with the
              same command (and hydra.sweep.dir) relaunches the trials it left running (their cells resume or are
              read) and asks only for the rest; a larger search.trials continues the study.
  write_front `<sweep dir>/pareto.json` (the front's rows, settings, objectives; the failed trials) and a printout.
"""

from __future__ import annotations

import difflib
import logging
import math
import random
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from squeeze.errors import SqueezeError
from squeeze.record import read_record, write_json_atomic
from squeeze.run.sweep import _SETTING, NOT_THE_CELL, chosen, prune_cells, with_rows

log = logging.getLogger("squeeze")
STUDY_FILE = "study.db"
PARETO_FILE = "pareto.json"
STUDY_NAME = "search"
SAMPLERS = ("nsga2", "tpe")
DIRECTIONS = {"min": "minimize", "max": "maximize"}


# -- what to optimise ------------------------------------------------------------------------------------------
def _aliases() -> dict[str, str]:
    """The recommender's objective names (size, latency, decode, energy, cost) -> the report figure they read."""
    from squeeze.report.recommend import OBJECTIVES

    return {o.name: o.figure for o in OBJECTIVES.values()}


_PER_BATCH = re.compile(r"^(peak_memory_mb|decode_tokens_per_s)\.[^.]+\.batch_\w+$")


@dataclass(frozen=True)
class Objective:
    name: str
    direction: str  # "min" | "max"

    def __str__(self) -> str:
        return f"{self.name}:{self.direction}"

    def value(self, record: dict, path: Path) -> float | None:
        """The figure in a finished cell's record; None when the record has none."""
        from squeeze.report.cells import cell

        if "/" in self.name:  # a logged metric, as result.json's metrics name it
            found = (record.get("metrics") or {}).get(self.name)
            return None if found is None else float(found)
        flat = cell(record, path)
        if self.name == "quality":
            found = flat["quality"]
        else:
            figure = _aliases().get(self.name, self.name)
            if figure == "decode_tokens_per_s":  # per device: batch 1 on the first device the cell measured
                figure = next((k for k in flat["per_batch"] if k.startswith(figure) and k.endswith(".batch_1")), figure)
            found = flat["per_batch"].get(figure) if "." in figure else flat.get(figure)
            if found is None and figure == "sparsity":
                found = 0.0  # a chain without a pruner records no sparsity: nothing was pruned
        return None if found is None else float(found)


def parse_objective(text: str) -> Objective:
    from squeeze.report.cells import FIGURES

    name, _, direction = str(text).strip().rpartition(":")
    known = ["quality", *_aliases(), *FIGURES]
    if not name or direction not in DIRECTIONS:
        raise SqueezeError(f"search.objectives: {text!r} needs a direction, e.g. {text}:min or {text}:max "
                           f"({(name or text)} is minimised with :min, maximised with :max)")
    if "/" not in name and name not in known and not _PER_BATCH.match(name):
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise SqueezeError(f"search.objectives: {name!r} names no figure of a record{hint} (give a test metric "
                           "such as test/accuracy or test/perplexity, or quality, size, latency, decode, energy, "
                           "cost, sparsity, own_kwh, total_kwh, or another column of squeeze.report's cells.csv)")
    return Objective(name, direction)


# -- the search's own settings (search: in conf/hydra/sweeper/search.yaml) --------------------------------------
@dataclass(frozen=True)
class Settings:
    """conf/hydra/sweeper/search.yaml's `search:`; a preset's own `search:` may leave out all but objectives."""

    objectives: tuple[Objective, ...]
    trials: int = 20  # cells the study should hold (finished or failed); a rerun with more continues the study
    sampler: str = "nsga2"
    seed: int | None = 0
    batch: int = 1  # trials launched at once
    population: int | None = None  # NSGA-II's population, TPE's random start; null: from the first run's trials


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_settings(node: Mapping | None) -> Settings:
    node = dict(node or {})
    trials = node.get("trials", Settings.trials)
    if not _whole(trials) or trials < 1:
        raise SqueezeError(f"search.trials={trials!r}: give how many cells the search should run, at least 1 (a "
                           "rerun with more continues it)")
    objectives = node.get("objectives")
    if isinstance(objectives, str) and objectives not in ("", "???"):
        objectives = [objectives]
    if not objectives or objectives == "???":
        raise SqueezeError("search.objectives is not set: name what the search optimises, e.g. "
                           "search.objectives='[test/accuracy:max,size:min]'")
    parsed = tuple(parse_objective(o) for o in objectives)
    names = [o.name for o in parsed]
    if len(set(names)) < len(names):
        raise SqueezeError(f"search.objectives names {max(names, key=names.count)} twice; give each figure once")
    sampler = str(node.get("sampler") or "nsga2")
    if sampler not in SAMPLERS:
        raise SqueezeError(f"search.sampler={sampler}: give nsga2 (Optuna's NSGA-II) or tpe (its TPE)")
    seed = node.get("seed", Settings.seed)
    if seed is not None and not _whole(seed):
        raise SqueezeError(f"search.seed={seed!r}: give a whole number, or null for an unseeded search")
    batch = node.get("batch", Settings.batch)
    if not _whole(batch) or batch < 1:
        raise SqueezeError(f"search.batch={batch!r}: give how many trials to launch at once, at least 1")
    population = node.get("population")
    if population is not None and (not _whole(population) or population < 2):
        raise SqueezeError(f"search.population={population!r}: give at least 2 (NSGA-II breeds pairs), or null")
    return Settings(parsed, trials, sampler, seed, batch, population)


# -- where to search ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Dimension:
    """One searched setting, named as its override's key (`compress.imp.target`; a preset's `row`, `setup`)."""

    name: str
    key: str  # the override's key as given (`++compress.imp.target`); "" for a row or setup
    kind: str  # "float" | "int" | "categorical"
    low: float = 0.0
    high: float = 0.0
    step: float | None = None
    log: bool = False
    choices: tuple[str, ...] = ()

    @property
    def compressor(self) -> str | None:
        """The compressor whose setting this is: searched only in trials whose chain uses it."""
        found = _SETTING.match(self.key)
        return found.group(1) if found else None

    def describe(self) -> str:
        if self.kind == "categorical":
            return f"{self.name}=choice({','.join(self.choices)})"
        step = f" step {self.step:g}" if self.step is not None else ""
        return f"{self.name}={'log ' if self.log else ''}{self.kind} [{self.low:g}, {self.high:g}]{step}"

    def suggest(self, trial) -> str:
        """The trial's value as Hydra's override value."""
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return str(trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1),
                                         log=self.log))
        value = trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)
        if self.step is not None:  # a stepped float lands on low + k·step: keep it 0.3, not 0.30000000000000004
            value = round(value, max(0, -math.floor(math.log10(abs(self.step)))) + 6)
        return repr(float(value))

    def level(self, k: int, levels: int) -> Any:
        """The k-th of `levels` evenly spread values, both bounds included (a categorical dimension deals its
        choices in turn), as the trial's parameter."""
        if self.kind == "categorical":
            return self.choices[k % len(self.choices)]
        u = k / (levels - 1) if levels > 1 else 0.5
        if self.log:
            value = math.exp(math.log(self.low) + u * (math.log(self.high) - math.log(self.low)))
        else:
            value = self.low + u * (self.high - self.low)
        if self.step is not None:  # onto the grid low + j·step
            value = self.low + round((value - self.low) / self.step) * self.step
        value = min(self.high, max(self.low, value))  # 0.3 + 0.6 is 0.8999999999999999 in floats: keep the bounds
        return int(round(value)) if self.kind == "int" else float(value)

    def examples(self) -> list[str]:
        """Values that stand for this dimension when the sweep's cells are checked before any runs."""
        if self.kind == "categorical":
            return list(self.choices)
        show = (lambda v: str(int(v))) if self.kind == "int" else (lambda v: repr(float(v)))
        return list(dict.fromkeys([show(self.low), show(self.high)]))


def dimension(override: Any) -> Dimension:
    """A sweep override (Hydra's parsed Override) as the distribution it spans."""
    from hydra.core.override_parser.types import ChoiceSweep, Glob, IntervalSweep, RangeSweep

    key, name, value = override.get_key_element(), override.key_or_group, override.value()
    where = (override.input_line or f"{key}=...").lstrip("+")  # as typed: the entry point adds ++ to compress.*
    if isinstance(value, IntervalSweep):
        if value.tags - {"log"}:
            raise SqueezeError(f"{where}: tag {sorted(value.tags - {'log'})[0]!r} means nothing to the search; "
                               "tag(log,interval(a,b)) samples on a log scale, interval(a,b) uniformly")
        log_scale = "log" in value.tags
        if not value.start < value.end:
            raise SqueezeError(f"{where}: an interval runs from its lower bound to a higher one, e.g. "
                               f"interval({value.end},{value.start})")
        if log_scale and value.start <= 0:
            raise SqueezeError(f"{where}: a log-scale interval needs a lower bound above 0")
        kind = "int" if all(_whole(v) for v in (value.start, value.end)) else "float"
        return Dimension(name, key, kind, value.start, value.end, log=log_scale)
    if isinstance(value, RangeSweep):
        values = list(override.sweep_iterator())
        if not values:
            raise SqueezeError(f"{where}: this range holds no value; give range(start,stop[,step]) with stop past "
                               "start in the step's direction")
        if len(values) == 1:
            return Dimension(name, key, "categorical", choices=tuple(override.sweep_string_iterator()))
        low, high, step = min(values), max(values), abs(value.step)
        kind = "int" if all(_whole(v) for v in (*values, step)) else "float"
        return Dimension(name, key, kind, low, high, step=step)
    if isinstance(value, (ChoiceSweep, Glob)):
        choices = tuple(dict.fromkeys(override.sweep_string_iterator()))
        if not choices:
            raise SqueezeError(f"{where}: no value to choose from; give at least one")
        return Dimension(name, key, "categorical", choices=choices)
    raise SqueezeError(f"{where}: the search cannot sample this; give interval(a,b), int(interval(a,b)), "
                       "range(a,b,step), choice(a,b) or a,b")


@dataclass
class Space:
    """The command line as the search sees it: per override key (in the command line's order, later ones winning)
    a fixed override or a Dimension; a preset's rows and setups each one more categorical Dimension."""

    entries: dict[str, str | Dimension]  # key -> "key=value" (fixed) or the Dimension searched
    rows: list[str] = field(default_factory=list)
    setups: list[str] = field(default_factory=list)
    default: list[str] = field(default_factory=list)  # the compressors a cell uses when it chooses none

    @classmethod
    def parse(cls, overrides: Sequence[Any], rows: Sequence[str] = (), setups: Sequence[str] = (),
              default: Sequence[str] = ()) -> "Space":
        entries: dict[str, str | Dimension] = {}
        for override in overrides:
            key = override.get_key_element()
            if override.key_or_group.split(".")[0] == "search" and override.is_sweep_override():
                raise SqueezeError(f"{override.input_line}: the search's own settings take one value each")
            entries.pop(key, None)  # a later override of a key replaces the earlier one, at its own place
            if override.is_sweep_override():
                entries[key] = dimension(override)
            else:
                entries[key] = f"{key}={override.get_value_element_as_str()}"
        space = cls(entries, list(rows or []), list(setups or []), list(default))
        if not space.dimensions():
            raise SqueezeError("nothing to search: give at least one setting as interval(a,b), range(a,b), "
                               "choice(a,b) or a,b (or a preset's rows); a fixed grid is the squeeze sweeper's "
                               "(drop hydra/sweeper=search)")
        return space

    def dimensions(self) -> list[Dimension]:
        extra = [Dimension(n, "", "categorical", choices=tuple(v)) for n, v in (("setup", self.setups),
                                                                                ("row", self.rows)) if len(v) > 1]
        return [*extra, *(e for e in self.entries.values() if isinstance(e, Dimension))]

    @property
    def reruns_failed(self) -> bool:
        return any(e.replace(" ", "").lstrip("+") in ("rerun_failed=true", "rerun_failed=True")
                   for e in self.entries.values() if isinstance(e, str))

    def describe(self) -> dict[str, Any]:
        """What a study was asked to search: a rerun into its sweep directory must ask the same."""
        return {"dimensions": [d.describe() for d in self.dimensions()],
                "fixed": [e for e in self.entries.values() if isinstance(e, str) and not _steering(e)],
                "rows": self.rows, "setups": self.setups}

    def cell(self, trial) -> list[str]:
        """The overrides of the cell `trial` stands for: its group choices and the preset's row and setup first,
        then the settings of the compressors its chain uses (as squeeze.run.sweep.prune_cells leaves them)."""
        picked = {d.name: d.suggest(trial) for d in self.dimensions() if not d.key}
        setups = [picked.get("setup", self.setups[0])] if self.setups else []
        rows = [picked.get("row", self.rows[0])] if self.rows else []
        values = {k: f"{e.key}={e.suggest(trial)}" for k, e in self.entries.items()
                  if isinstance(e, Dimension) and e.compressor is None}

        def job() -> list[str]:
            fixed = [values.get(k, e) for k, e in self.entries.items()]
            return with_rows([[o for o in fixed if isinstance(o, str)]], rows, setups)[0]

        chain = chosen(job(), self.default)
        values.update({k: f"{e.key}={e.suggest(trial)}" for k, e in self.entries.items()
                       if isinstance(e, Dimension) and e.compressor in chain})
        return prune_cells([job()], self.default)[0]

    def _variations(self) -> list[list[str]]:
        """Each dimension's choices, or its bounds, with the others at their first value."""
        first = {k: f"{e.key}={e.examples()[0]}" if isinstance(e, Dimension) else e for k, e in self.entries.items()}
        jobs = [list(first.values())]
        for k, e in self.entries.items():
            if isinstance(e, Dimension):
                jobs += [list({**first, k: f"{e.key}={v}"}.values()) for v in e.examples()[1:]]
        return jobs

    def examples(self) -> list[list[str]]:
        """Cells that stand for the space before anything runs, crossed with every row and setup: for the grid
        sweeper's checks of settings (squeeze.run.sweep.check_settings), which only read the overrides."""
        return with_rows(self._variations(), self.rows, self.setups)

    def samples(self) -> list[list[str]]:
        """Fewer cells, to compose before anything runs: the variations with the first row and setup, and each
        other row and setup once (composing every variation crossed with a preset's rows would take minutes)."""
        jobs = self._variations()
        cells = with_rows(jobs, self.rows[:1], self.setups[:1])
        if self.rows[1:]:
            cells += with_rows(jobs[:1], self.rows[1:], self.setups[:1])
        if self.setups[1:]:
            cells += with_rows(jobs[:1], self.rows[:1], self.setups[1:])
        return cells


def _steering(override: str) -> bool:
    """An override that steers this invocation (resume, rerun failed cells, the search's settings), not the cell."""
    return override.split("=", 1)[0].lstrip("+~").split(".")[0] in NOT_THE_CELL


def same_cell(overrides: Sequence[str]) -> tuple[str, ...]:
    return tuple(o for o in overrides if not _steering(o))


# -- the study ------------------------------------------------------------------------------------------------
def storage_url(sweep_dir: Path) -> str:
    return f"sqlite:///{Path(sweep_dir).resolve() / STUDY_FILE}"


def open_study(sweep_dir: Path, space: Space, settings: Settings):
    """The study in `<sweep_dir>/study.db`: created, or the one an earlier run of this search left there (it must
    search the same space for the same objectives), with this run's sampler."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # squeeze logs each trial itself
    url = storage_url(sweep_dir)
    asked = {"objectives": [str(o) for o in settings.objectives], **space.describe()}
    directions = [DIRECTIONS[o.direction] for o in settings.objectives]
    study = None
    if STUDY_NAME in optuna.get_all_study_names(url):
        study = optuna.load_study(study_name=STUDY_NAME, storage=url)
        held = {k: study.user_attrs.get(k) for k in asked}
        if held != asked:
            what = next(k for k in asked if held[k] != asked[k])
            finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
            if what != "objectives" or finished:
                raise SqueezeError(f"{sweep_dir / STUDY_FILE} searched {what} {held[what]}, this command "
                                   f"{asked[what]}; rerun with the study's settings (search.trials may grow), or "
                                   "search into a new hydra.sweep.dir")
            # No trial finished yet (e.g. a misspelt objective stopped the first): start the study afresh; the
            # cells on disk are read again when a trial lands on them.
            optuna.delete_study(study_name=STUDY_NAME, storage=url)
            log.info("search: the study held no finished trial; started afresh for objectives %s", asked["objectives"])
            study = None
    if study is None:
        study = optuna.create_study(storage=url, study_name=STUDY_NAME, directions=directions)
        for key, value in asked.items():
            study.set_user_attr(key, value)
        # Optuna keeps no sampler in the storage: the population is, so a resumed study breeds as it began.
        study.set_user_attr("population", settings.population or min(50, max(4, settings.trials // 3)))
        for point in first_generation(space, study.user_attrs["population"], settings.seed):
            study.enqueue_trial(point)
    population = settings.population or study.user_attrs["population"]
    # A resumed search draws from seed + the trials held, so it does not redraw the first run's points.
    seed = None if settings.seed is None else settings.seed + len(study.trials)
    if settings.sampler == "nsga2":
        # Simulated binary crossover breeds new values near both parents; Optuna's default (uniform) only swaps
        # the parents' values, so a small population keeps asking for cells it has run (measured: 5 of 12 trials).
        with warnings.catch_warnings():  # "SBXCrossover is experimental": in Optuna since 3.0, nothing to act on
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            crossover = optuna.samplers.nsgaii.SBXCrossover()
        study.sampler = optuna.samplers.NSGAIISampler(population_size=population, seed=seed, crossover=crossover)
    else:
        study.sampler = optuna.samplers.TPESampler(n_startup_trials=population, seed=seed)
    return study


def first_generation(space: Space, size: int, seed: int | None) -> list[dict[str, Any]]:
    """The study's first `size` trials, spread over the space: each numeric dimension at `size` evenly spaced
    values from bound to bound, each value once, paired across dimensions at random (a Latin hypercube with its
    corners' levels). A handful of random draws often leaves one end of a range unexplored, and the end of a
    setting's range is where a trade-off front usually ends (the smallest model, the best quality)."""
    rng = random.Random(seed)
    points: list[dict[str, Any]] = [{} for _ in range(size)]
    for d in space.dimensions():
        order = list(range(size))
        rng.shuffle(order)
        for point, k in zip(points, order):
            point[d.name] = d.level(k, size)
    return points


@dataclass
class Job:
    number: int  # the trial's number, also its cell's hydra.job.num (the directory's prefix)
    overrides: list[str]
    run_dir: Path


CellDir = Callable[[list[str], int], Path]  # the cell directory Hydra gives these overrides as job n
Launch = Callable[[list[Job]], dict[int, str]]  # runs the cells; an error line for each that stopped without a record


def run(study, space: Space, settings: Settings, cell_dir: CellDir, launch: Launch) -> None:
    """Ask, launch, tell until the study holds settings.trials finished or failed cells. Trials an earlier run
    left running (killed) are launched again first, as the same cells. A trial that lands on a cell already run
    takes its outcome (the sampler learns it) and costs nothing, so it does not count: a budget of 12 is 12 cells,
    as a 12-cell grid is. When the sampler keeps asking only for cells already run, the search stops early."""
    from optuna.trial import TrialState

    # With rerun_failed=true a trial that lands on a failed cell runs it again (as a new cell), as the grid would.
    kept = (TrialState.COMPLETE,) if space.reruns_failed else (TrialState.COMPLETE, TrialState.FAIL)
    finished = {same_cell(t.user_attrs["overrides"]): t for t in study.trials
                if t.state in kept and "overrides" in t.user_attrs}
    pending = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        overrides = t.user_attrs.get("overrides")
        job = _job(t.number, overrides, cell_dir) if overrides is not None else None
        if isinstance(job, Job):
            log.info("search: trial %d did not finish before; running its cell %s again (read if it finished, "
                     "resumed if it was killed)", t.number, job.run_dir.name)
            pending.append(job)
        else:
            study.tell(t.number, state=TrialState.FAIL)
            log.warning("search: trial %d failed: %s", t.number, job or "killed before its cell was settled")

    def held() -> int:  # cells run: finished or failed trials that were not another trial's cell again
        return sum(t.state in (TrialState.COMPLETE, TrialState.FAIL) and "same_cell_as" not in t.user_attrs
                   for t in study.get_trials(deepcopy=False))

    repeats, enough = 0, max(30, 3 * settings.trials)  # asks in a row that gave no new cell; when to give up
    while True:
        batch, twins = pending[:settings.batch], {}
        del pending[:settings.batch]
        while (len(batch) < settings.batch and held() + len(batch) + len(pending) < settings.trials
               and repeats < enough):
            trial = study.ask()
            overrides = space.cell(trial)
            trial.set_user_attr("overrides", overrides)
            key = same_cell(overrides)
            repeats += 1
            if key in finished:  # e.g. compress=none drawn again: the grid would not run that cell twice either
                _tell_as(study, trial, finished[key])
                continue
            twin = next((j for j in batch if same_cell(j.overrides) == key), None)
            if twin is not None:
                twins[trial] = twin.number
                continue
            repeats = 0
            job = _job(trial.number, overrides, cell_dir)
            if not isinstance(job, Job):  # its config does not compose
                trial.set_user_attr("error", job)
                study.tell(trial, state=TrialState.FAIL)
                log.warning("search: trial %d failed: %s", trial.number, job)
                continue
            trial.set_user_attr("cell", job.run_dir.name)
            batch.append(job)
        if not batch:
            if repeats >= enough:
                log.warning("search: the last %d trials all asked for cells already run (the space holds no other "
                            "cell the sampler finds); stopping with %d of %d cells", enough, held(), settings.trials)
            return
        errors = launch(batch)
        told = {}
        for job in batch:
            told[job.number] = _tell(study, job, settings.objectives, errors.get(job.number))
            if told[job.number].state in kept:
                finished[same_cell(job.overrides)] = told[job.number]
        for trial, number in twins.items():
            _tell_as(study, trial, told[number])


def _job(number: int, overrides: list[str], cell_dir: CellDir) -> Job | str:
    from squeeze.config import error_line

    try:
        return Job(number, list(overrides), cell_dir(list(overrides), number))
    except Exception as e:  # Hydra's composition errors: this trial's settings do not make a config
        return error_line(e)


def _tell(study, job: Job, objectives: Sequence[Objective], error: str | None):
    """Tell the study what the job's cell recorded: its objectives when it finished, FAIL otherwise. A finished
    cell without an objective's figure stops the search: every cell would lack it."""
    from optuna.trial import TrialState

    path = job.run_dir / "result.json"
    try:
        record = read_record(path)
    except (OSError, ValueError):
        record = {}
    status = record.get("status")
    if status == "ok":
        values = [o.value(record, path) for o in objectives]
        if None not in values:
            log.info("search: trial %d (%s): %s", job.number, job.run_dir.name,
                     ", ".join(f"{o.name}={v:.6g}" for o, v in zip(objectives, values)))
            return study.tell(job.number, values)
        missing = objectives[values.index(None)]
        study.tell(job.number, state=TrialState.FAIL)
        have = ", ".join(sorted(record.get("metrics") or {})) or "none"
        raise SqueezeError(f"search.objectives: {missing.name} is not in the record of cell {job.run_dir} (its "
                           f"metrics: {have}; latency and decode need perf, energy figures an energy meter); "
                           "name a figure the cells record")
    error = record.get("error") if status == "failed" else error or (
        f"the cell ended without a finished record (status {status or 'none'}); see {job.run_dir}")
    log.warning("search: trial %d (%s) failed: %s", job.number, job.run_dir.name, error)
    return study.tell(job.number, state=TrialState.FAIL)


def _tell_as(study, trial, earlier) -> None:
    """A trial whose cell is an earlier trial's: that trial's outcome, without running the cell again."""
    from optuna.trial import TrialState

    trial.set_user_attr("same_cell_as", earlier.number)
    if "cell" in earlier.user_attrs:
        trial.set_user_attr("cell", earlier.user_attrs["cell"])
    if earlier.state == TrialState.COMPLETE:
        study.tell(trial, earlier.values)
    else:
        study.tell(trial, state=TrialState.FAIL)
    log.info("search: trial %d is trial %d's cell again; took its outcome", trial.number, earlier.number)


# -- the front --------------------------------------------------------------------------------------------------
def write_front(study, sweep_dir: Path, settings: Settings) -> dict[str, Any]:
    """`<sweep_dir>/pareto.json`: the trials no other finished trial beats on every objective (one per cell), each
    with its report row, settings and objectives; the failed trials with their errors. Also printed."""
    from optuna.trial import TrialState

    sweep_dir = Path(sweep_dir)
    rows, errors = _cells(sweep_dir)
    trials = study.get_trials(deepcopy=False)
    best = study.best_trials if any(t.state == TrialState.COMPLETE for t in trials) else []
    front, seen = [], set()
    for t in sorted(best, key=lambda t: (*t.values, t.number)):
        cell = t.user_attrs.get("cell")
        if cell in seen:
            continue
        seen.add(cell)
        front.append({"trial": t.number, "cell": cell, "row": rows.get(cell), "settings": dict(t.params),
                      "objectives": {o.name: v for o, v in zip(settings.objectives, t.values)}})
    failed = [{"trial": t.number, "cell": t.user_attrs.get("cell"), "settings": dict(t.params),
               "error": t.user_attrs.get("error") or errors.get(t.user_attrs.get("cell"))}
              for t in trials if t.state == TrialState.FAIL]
    doc = {"study": storage_url(sweep_dir), "study_name": study.study_name,
           "objectives": [{"name": o.name, "direction": o.direction} for o in settings.objectives],
           "trials": {"complete": sum(t.state == TrialState.COMPLETE for t in trials), "failed": len(failed),
                      "running": sum(t.state == TrialState.RUNNING for t in trials)},
           "front": front, "failed": failed}
    write_json_atomic(sweep_dir / PARETO_FILE, doc)
    counts = doc["trials"]
    print(f"search: {counts['complete']} trial(s) finished, {counts['failed']} failed; Pareto front over "
          f"{', '.join(map(str, settings.objectives))}:")
    for point in front:
        figures = "  ".join(f"{k}={v:.6g}" for k, v in point["objectives"].items())
        print(f"  trial {point['trial']:>3}  {point['row'] or point['cell']}  {figures}")
    print(f"front: {sweep_dir / PARETO_FILE}; the study: optuna-dashboard {storage_url(sweep_dir)}")
    return doc


def _cells(sweep_dir: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Per cell directory: its row as squeeze.report names it, and the error of a failed cell."""
    from squeeze.report.aggregate import build_groups
    from squeeze.report.cells import load_cells

    try:
        cells, _ = load_cells([sweep_dir])
        build_groups(cells)
    except SqueezeError as e:  # the front stands without row names
        log.warning("search: the report could not name the front's rows: %s", e)
        return {}, {}
    by_dir = {Path(c["run_dir"]).name: c for c in cells if Path(c["run_dir"]).parent.resolve() == sweep_dir.resolve()}
    return ({d: c["row"] for d, c in by_dir.items()},
            {d: c["error"] for d, c in by_dir.items() if c["status"] != "ok"})
