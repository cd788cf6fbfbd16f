"""The search sweeper (hydra/sweeper=search; squeeze/run/search.py, hydra_plugins/squeeze_sweeper.SearchSweeper): the
override grammar as Optuna distributions, the ask/launch/tell loop on a fake launcher (resume, failures, repeated
cells), the Pareto front, and the CLI on tiny_gpt2: a search killed mid-trial and rerun with more trials, a failing
trial, and bad inputs as one line. Deterministic: the samplers are seeded."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from optuna.trial import FixedTrial, TrialState

from squeeze.errors import SqueezeError
from squeeze.run import search

from conftest import ROOT, compose_cfg, fast, read_result, run_cli

OBJECTIVES = "search.objectives=[test/perplexity:min,size:min]"
# A post-training chain on tiny_gpt2: the stored baseline fine-tunes once (2 steps), each trial calibrates on 8 samples.
TINY = ["model=tiny_gpt2", "task=austen", "compress=wanda", "trainer.max_steps=2", "calibration.samples=8",
        *fast("austen"), "perf=null"]


def _space(*overrides: str, rows=(), default=()) -> search.Space:
    return search.Space.parse(OverridesParser.create().parse_overrides(list(overrides)), rows, (), default)


def _settings(trials: int, *objectives: str, **extra) -> search.Settings:
    return search.read_settings({"trials": trials, "objectives": list(objectives or ["test/loss:min", "size:min"]),
                                 **extra})


# -- the space -----------------------------------------------------------------------------------------------------
def test_overrides_become_optuna_distributions():
    space = _space("++compress.imp.target=interval(0.3,0.9)", "trainer.max_steps=int(interval(2,8))",
                   "optimizer.lr=tag(log,interval(1e-5,1e-3))", "seed=range(1,7,2)",
                   "calibration.seq_len=range(0.1,0.4,0.1)",
                   "++compress.imp.granularity=choice(global,layer)", "compress=none,imp", "task=austen")
    dims = {d.name: d for d in space.dimensions()}
    target = dims["compress.imp.target"]
    assert (target.kind, target.low, target.high) == ("float", 0.3, 0.9)
    assert dims["trainer.max_steps"].kind == "int" and dims["optimizer.lr"].log
    assert (dims["seed"].kind, dims["seed"].low, dims["seed"].high, dims["seed"].step) == ("int", 1, 5, 2)
    assert dims["calibration.seq_len"].kind == "float" and dims["calibration.seq_len"].step == pytest.approx(0.1)
    assert dims["compress.imp.granularity"].choices == ("global", "layer")
    assert dims["compress"].choices == ("none", "imp")
    assert space.entries["task"] == "task=austen"  # a plain override is fixed
    # A stepped float lands on the step (0.3, not 0.30000000000000004).
    assert dims["calibration.seq_len"].suggest(FixedTrial({"calibration.seq_len": 0.30000000000000004})) == "0.3"


def test_a_compressor_setting_is_searched_only_in_trials_whose_chain_uses_it():
    space = _space("compress=none,imp", "++compress.imp.target=interval(0.3,0.9)", "model=tiny_gpt2")
    # FixedTrial raises for a parameter it was not given: the none cell never asks for the target.
    assert space.cell(FixedTrial({"compress": "none"})) == ["compress=none", "model=tiny_gpt2"]
    assert space.cell(FixedTrial({"compress": "imp", "compress.imp.target": 0.5})) == [
        "compress=imp", "++compress.imp.target=0.5", "model=tiny_gpt2"]
    # A preset's rows are one categorical choice, crossed as the grid sweeper crosses them.
    rows = _space("++compress.wanda.sparsity=interval(0.2,0.8)", rows=["compress=none", "compress=wanda"])
    assert rows.cell(FixedTrial({"row": "compress=none"})) == ["compress=none"]
    assert rows.cell(FixedTrial({"row": "compress=wanda", "compress.wanda.sparsity": 0.4})) == [
        "++compress.wanda.sparsity=0.4", "compress=wanda"]


@pytest.mark.parametrize("override, says", [
    ("a=interval(0.9,0.3)", "lower bound to a higher one"),
    ("a=tag(foo,interval(0,1))", "tag 'foo'"),
    ("a=tag(log,interval(0,1))", "above 0"),
    ("a=range(5,1)", "holds no value"),
    ("search.trials=3,5", "one value each"),
])
def test_a_range_the_search_cannot_sample_is_refused(override, says):
    with pytest.raises(SqueezeError, match=says):
        _space(override, "b=choice(x,y)")


@pytest.mark.parametrize("node, says", [
    ({"trials": 0, "objectives": ["size:min"]}, "search.trials=0"),
    ({"trials": 3}, "search.objectives is not set"),
    ({"trials": 3, "objectives": ["size"]}, "needs a direction"),
    ({"trials": 3, "objectives": ["sise:min"]}, "did you mean 'size'"),
    ({"trials": 3, "objectives": ["size:min", "size:max"]}, "twice"),
    ({"trials": 3, "objectives": ["size:min"], "sampler": "grid"}, "nsga2"),
])
def test_bad_search_settings_are_refused(node, says):
    with pytest.raises(SqueezeError, match=says):
        search.read_settings(node)


def test_nothing_to_search_is_refused():
    with pytest.raises(SqueezeError, match="nothing to search"):
        _space("compress=imp", "++compress.imp.target=0.5")


# -- the loop, on a fake launcher --------------------------------------------------------------------------------
class FakeCells:
    """Stands in for Hydra's launcher: trial n's cell is <dir>/<n>_cell; its record's loss and size follow the
    sampled value x (a trade-off), and x > 1 fails the way a refused setting fails a cell."""

    def __init__(self, root: Path, stop_at: int | None = None):
        self.root, self.stop_at, self.launched = root, stop_at, []

    def cell_dir(self, overrides: list[str], number: int) -> Path:
        return self.root / f"{number}_cell"

    def launch(self, jobs: list[search.Job]) -> dict[int, str]:
        for job in jobs:
            self.launched.append(job.number)
            if job.number == self.stop_at:  # killed mid-cell: the record says running, the sweep process ends
                _write(job.run_dir, {"status": "running"})
                raise SystemExit(143)
            x = float(dict(o.lstrip("+").split("=", 1) for o in job.overrides)["x"])
            if x > 1:
                _write(job.run_dir, {"status": "failed", "error": "SqueezeError: x must be below 1"})
            else:
                _write(job.run_dir, {"status": "ok", "config": {"task": {"monitor": "val/loss", "monitor_mode": "min"}},
                                     "metrics": {"test/loss": 1 - x}, "checkpoint_bytes": int((1 + x) * 1e6)})
        return {}


def _write(run_dir: Path, record: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "result.json").write_text(json.dumps({"run_dir": str(run_dir), **record}))


def _search(tmp_path: Path, cells: FakeCells, trials: int, *overrides: str, **extra) -> optuna.Study:
    space, settings = _space(*(overrides or ("x=interval(0.0,0.9)",))), _settings(trials, **extra)
    study = search.open_study(tmp_path, space, settings)
    search.run(study, space, settings, cells.cell_dir, cells.launch)
    return study


def test_a_killed_search_reruns_its_running_trial_as_the_same_cell_and_asks_only_for_the_rest(tmp_path):
    killed = FakeCells(tmp_path, stop_at=2)
    with pytest.raises(SystemExit):
        _search(tmp_path, killed, 5)
    assert killed.launched == [0, 1, 2]
    again = FakeCells(tmp_path)
    study = _search(tmp_path, again, 6)  # the same command with a larger budget: a new process, the same study.db
    assert again.launched == [2, 3, 4, 5]  # trial 2 first, at its own number (its cell resumes); 0 and 1 not rerun
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 6
    assert study.trials[2].user_attrs["cell"] == "2_cell"


def test_a_failed_cell_is_a_failed_trial_and_the_search_goes_on(tmp_path):
    cells = FakeCells(tmp_path)
    study = _search(tmp_path, cells, 6, "x=interval(0.0,2.0)")
    states = [t.state for t in study.trials]
    assert len(states) == 6 and TrialState.FAIL in states and TrialState.COMPLETE in states
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert all(t.params["x"] > 1 for t in failed) and all(t.values is None for t in failed)
    assert cells.launched == list(range(6))  # failures do not stop it
    doc = search.write_front(study, tmp_path, _settings(6))
    assert {f["trial"] for f in doc["failed"]} == {t.number for t in failed}
    assert all(f["error"] == "SqueezeError: x must be below 1" for f in doc["failed"])


def test_a_trial_that_lands_on_a_finished_cell_takes_its_outcome_without_running_or_counting(tmp_path, caplog):
    cells = FakeCells(tmp_path)
    study = _search(tmp_path, cells, 6, "x=choice(0.2,0.5)")
    assert len(cells.launched) == 2  # two distinct cells, each run once
    again = [t for t in study.trials if "same_cell_as" in t.user_attrs]
    assert again and len(study.trials) == 2 + len(again)
    for t in again:
        assert t.values == study.trials[t.user_attrs["same_cell_as"]].values
    # Repeats are free, so the budget of 6 cells is not spent on them; the space holds 2, and the search says so.
    assert "stopping with 2 of 6 cells" in caplog.text


def test_a_budget_of_n_trials_runs_n_distinct_cells(tmp_path):
    cells = FakeCells(tmp_path)
    study = _search(tmp_path, cells, 6, "x=choice(0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8)")
    assert len(cells.launched) == 6
    ran = [t.params["x"] for t in study.trials if "same_cell_as" not in t.user_attrs]
    assert len(ran) == len(set(ran)) == 6


def test_the_first_generation_spreads_every_setting_from_bound_to_bound():
    space = _space("x=interval(0.3,0.9)", "n=int(interval(1,7))", "lr=tag(log,interval(1e-5,1e-3))",
                   "s=range(0,1,0.25)", "g=choice(global,layer)")
    points = search.first_generation(space, 4, seed=0)
    assert len(points) == 4
    assert sorted(p["x"] for p in points) == pytest.approx([0.3, 0.5, 0.7, 0.9])
    assert sorted(p["n"] for p in points) == [1, 3, 5, 7]
    assert sorted(p["lr"] for p in points) == pytest.approx([1e-5, 10 ** -4.333333, 10 ** -3.666667, 1e-3], rel=1e-4)
    assert sorted(p["s"] for p in points) == pytest.approx([0.0, 0.25, 0.5, 0.75])  # on the range's steps
    assert sorted(p["g"] for p in points) == ["global", "global", "layer", "layer"]
    assert len({(p["x"], p["n"]) for p in points}) == 4  # paired at random, not in lockstep ...
    assert search.first_generation(space, 4, seed=0) == points  # ... and reproducibly from the seed
    # A study begins with them: its first trials are these points, sampled as their distributions.
    study = search.open_study(Path(tempfile.mkdtemp()), _space("x=interval(0.3,0.9)"), _settings(12, population=4))
    firsts = [space_x for space_x in (study.ask().suggest_float("x", 0.3, 0.9) for _ in range(4))]
    assert sorted(firsts) == pytest.approx([0.3, 0.5, 0.7, 0.9])


def test_rerun_failed_runs_a_failed_cell_again_when_a_trial_lands_on_it(tmp_path):
    _search(tmp_path, FakeCells(tmp_path), 4, "x=choice(0.5,1.5)")
    again = FakeCells(tmp_path)
    study = _search(tmp_path, again, 12, "x=choice(0.5,1.5)", "rerun_failed=true")  # the same study: it steers
    rerun = [n for n in again.launched if study.trials[n].params["x"] == "1.5"]
    assert rerun and all(study.trials[n].state == TrialState.FAIL for n in rerun)
    assert not [n for n in again.launched if study.trials[n].params["x"] == "0.5"]  # a finished cell is still kept


def test_the_front_holds_the_trials_no_other_beats(tmp_path):
    study = _search(tmp_path, FakeCells(tmp_path), 8, "x=interval(0.0,0.9)", "y=interval(0.0,1.0)")
    doc = search.write_front(study, tmp_path, _settings(8))
    assert json.loads((tmp_path / search.PARETO_FILE).read_text()) == doc
    points = {t.number: t.values for t in study.trials}
    front = [p["trial"] for p in doc["front"]]
    assert front and all(p["settings"] == study.trials[p["trial"]].params for p in doc["front"])

    def beats(a, b):
        return all(x <= y for x, y in zip(a, b)) and a != b
    assert not any(beats(points[o], points[f]) for f in front for o in points)  # nothing dominates a front point
    assert all(any(beats(points[f], points[o]) or points[f] == points[o] for f in front) for o in points)


def test_a_rerun_that_searches_something_else_is_refused(tmp_path):
    _search(tmp_path, FakeCells(tmp_path), 2)
    with pytest.raises(SqueezeError, match="searched dimensions"):
        _search(tmp_path, FakeCells(tmp_path), 3, "x=interval(0.0,0.5)")


def test_hydra_sweeper_search_composes_with_its_settings(tmp_path):
    cfg = compose_cfg("train", ["hydra/sweeper=search", "search.trials=3", OBJECTIVES], tmp_path)
    assert cfg.hydra.sweeper._target_ == "hydra_plugins.squeeze_sweeper.SearchSweeper"
    assert cfg.search.trials == 3 and list(cfg.search.objectives) == ["test/perplexity:min", "size:min"]


# -- the CLI -------------------------------------------------------------------------------------------------------
def _study(sweep: Path):
    return optuna.load_study(study_name=search.STUDY_NAME, storage=search.storage_url(sweep))


def _cell_dirs(sweep: Path) -> list[str]:
    return sorted(p.name for p in sweep.iterdir() if p.is_dir() and p.name[0].isdigit())


def test_a_killed_search_resumes_with_the_same_command_and_the_baseline_fine_tunes_once(tmp_path):
    sweep, store = tmp_path / "sweep", tmp_path / "store"
    args = ["-m", "hydra/sweeper=search", OBJECTIVES, "compress.wanda.sparsity=interval(0.2,0.8)", *TINY,
            f"hydra.sweep.dir={sweep}", f"baseline.store_dir={store}"]
    # Killed (SIGTERM, as `timeout` or a scheduler sends it) once trial 1's cell has started.
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args, "search.trials=3"], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not list(sweep.glob("1_*/result.json")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0, stderr[-3000:]
    first = read_result(sweep / "0_tiny_gpt2_austen_wanda")
    assert first["status"] == "ok"
    # The same command with a larger budget: trial 1 reruns as its own cell, trials 2 and 3 are new, 0 is kept.
    done = run_cli("train.py", [*args, "search.trials=4"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    study = _study(sweep)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 4
    assert _cell_dirs(sweep) == [f"{n}_tiny_gpt2_austen_wanda" for n in range(4)]
    assert read_result(sweep / "0_tiny_gpt2_austen_wanda")["created"] == first["created"]  # not run again
    records = [read_result(sweep / d) for d in _cell_dirs(sweep)]
    for t, record in zip(study.trials, records):
        assert record["config"]["compress"]["wanda"]["sparsity"] == pytest.approx(t.params["compress.wanda.sparsity"])
        assert t.values == [pytest.approx(record["metrics"]["test/perplexity"]),
                            pytest.approx(record["checkpoint_bytes"] / 1e6)]
    entries = [d for d in store.iterdir() if d.is_dir()]
    assert len(entries) == 1 and {r["baseline"]["dir"] for r in records} == {str(entries[0])}  # fine-tuned once
    # pareto.json: the trials no finished trial beats on both objectives, with their report rows.
    doc = json.loads((sweep / "pareto.json").read_text())
    values = [t.values for t in study.trials]
    assert doc["trials"] == {"complete": 4, "failed": 0, "running": 0} and doc["front"]
    for point in doc["front"]:
        mine = list(point["objectives"].values())
        assert not any(all(o <= m for o, m in zip(other, mine)) and other != mine for other in values)
        assert point["row"].startswith("wanda sparsity=")
    assert "Pareto front over test/perplexity:min, size:min" in done.stdout
    # squeeze.report reads the trials like any sweep's cells.
    from squeeze.report import build

    report = build([sweep], draw=False)
    assert [len(g.rows) for g in report.groups] == [4] and report.markdown.is_file()


def test_a_failing_trial_is_failed_in_the_study_and_a_preset_with_a_search_section_searches(tmp_path):
    # A preset of the user's own (found through hydra.searchpath): its `search:` section makes the sweep a search.
    # The failing trial asks for more calibration tokens than the data has: found when it calibrates (a value a
    # compressor checks before loading, e.g. compress.wanda.sparsity=1.5, stops the whole search instead).
    (tmp_path / "conf" / "experiment").mkdir(parents=True)
    (tmp_path / "conf" / "experiment" / "my_search.yaml").write_text(
        "# @package _global_\nsearch:\n  trials: 3\n  seed: 1\n  objectives: [test/perplexity:min, size:min]\n"
        "hydra:\n  sweeper:\n    params:\n      calibration.seq_len: choice(16,100000)\n")
    sweep = tmp_path / "sweep"
    done = run_cli("train.py", ["-m", f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "experiment=my_search", *TINY,
                                f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    trials = [t for t in _study(sweep).trials if "same_cell_as" not in t.user_attrs]
    assert len(trials) == 2  # the space holds two cells: the third trial repeats one, free, and the search stops
    assert "stopping with 2 of 3 cells" in done.stdout + done.stderr
    states = {t.params["calibration.seq_len"]: t.state for t in trials}
    assert states == {"100000": TrialState.FAIL, "16": TrialState.COMPLETE}  # seed 1 draws both; the search went on
    failed = read_result(sweep / next(t.user_attrs["cell"] for t in trials if t.state == TrialState.FAIL))
    assert failed["status"] == "failed" and "seq_len=100000" in failed["error"]
    doc = json.loads((sweep / "pareto.json").read_text())
    assert [p["settings"] for p in doc["front"]] == [{"calibration.seq_len": "16"}]
    assert "seq_len=100000" in doc["failed"][0]["error"]


@pytest.mark.parametrize("args, says", [
    (["search.objectives=[test/perplexity:min,sise:min]"], "'sise' names no figure of a record; did you mean 'size'?"),
    (["search.trials=0", OBJECTIVES], "search.trials=0"),
    ([OBJECTIVES, "compress.wanda.sparsity=tag(foo,interval(0.2,0.8))"], "tag 'foo'"),
])
def test_bad_search_inputs_are_one_line_and_exit_2(tmp_path, args, says):
    done = run_cli("train.py", ["-m", "hydra/sweeper=search", "compress=wanda",
                                "compress.wanda.sparsity=interval(0.2,0.8)", *args, f"hydra.sweep.dir={tmp_path}"],
                   cwd=tmp_path, timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and says in lines[0], done.stderr[-3000:]
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("args, says", [
    (["search.trials=5"], "add -m hydra/sweeper=search"),  # the search's settings without its sweeper
    (["hydra/sweeper=search", "search.trials=5", OBJECTIVES], "runs only with -m"),  # its sweeper without -m
])
def test_search_settings_outside_a_search_sweep_stop_before_anything_runs(tmp_path, args, says):
    done = run_cli("train.py", ["model=tiny_gpt2", "task=austen", *args, f"hydra.run.dir={tmp_path / 'run'}"],
                   cwd=tmp_path, timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and says in lines[0], done.stderr[-3000:]
    assert not (tmp_path / "run" / "result.json").exists()
