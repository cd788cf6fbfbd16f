"""The table presets (conf/experiment/<name>.yaml and <name>_offline.yaml) and the sweeper's rows/setups that
they are made of: every cell of every preset composes and builds its compressor chain; the rows are the
published tables' rows; the offline variants use only what ships offline."""

import itertools
import shlex
from pathlib import Path

import pytest

from squeeze.run.build import chain as build_chain
from squeeze.errors import SqueezeError
from squeeze.report.aggregate import row_name
from squeeze.config import lenient_compressor_settings
from squeeze.run.sweep import prune_cells, with_rows, without

from conftest import ROOT, compose_cfg, fast, read_result, run_cli

PRESETS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml") if p.stem != "quick")
OFFLINE_MODELS = {"minilm", "smollm2", "gpt2_char", "tiny_bert", "tiny_gpt2", "tiny_llama", "tiny_opt"}  # no hub download
OFFLINE_TASKS = {"rotten_tomatoes", "wnut16", "austen", "chatterbot"}


def _cells(name: str, tmp_path: Path) -> list[list[str]]:
    """The cells `python train.py -m experiment=<name>` runs (the sweeper's expansion, without launching)."""
    sweeper = compose_cfg("train", [f"experiment={name}"], tmp_path).hydra.sweeper
    grid = [[f"{k}={v}" for v in str(values).split(",")] for k, values in (sweeper.params or {}).items()]
    jobs = [[f"experiment={name}", *c] for c in itertools.product(*grid)]
    cells, _ = without(with_rows(jobs, list(sweeper.rows or []), list(sweeper.setups or [])), list(sweeper.exclude or []))
    return prune_cells(cells, default=[])


def _holds(cell: list[str], row: str) -> bool:
    """The cell came from this row: it holds every override of the row's string."""
    have = {o.lstrip("+") for o in cell}
    return all(o.lstrip("+") in have for o in lenient_compressor_settings(shlex.split(row)))


def _value(cell: list[str], key: str) -> str | None:
    return next((o.split("=", 1)[1] for o in cell if o.split("=", 1)[0].lstrip("+") == key), None)


@pytest.mark.parametrize("name", PRESETS)
def test_every_cell_of_a_preset_composes_and_builds_its_chain(name, tmp_path):
    _check_preset(name, tmp_path)


def _check_preset(name: str, tmp_path: Path) -> list[str]:
    """Compose a preset's cells and build their chains; its row names (of its first model × task)."""
    cells = _cells(name, tmp_path)
    assert cells
    names = []
    pairs = sorted({(_value(c, "model"), _value(c, "task")) for c in cells})
    first = [c for c in cells if (_value(c, "model"), _value(c, "task")) == pairs[0]]
    for cell in first:  # one model × task's rows fully; the others differ only in model= and task=
        cfg = compose_cfg("train", cell, tmp_path)
        chain = build_chain(cfg.compress)
        # hardware=pipeline rows: the report tells them apart by the variant they record (stages, schedule, batch)
        variant = f" [pipeline batch {cfg.task.data.batch_size}]" if cfg.get("pipeline") is not None else ""
        names.append(row_name("+".join(c.name for c in chain) or "none", "", {c.name: c.label for c in chain if c.label})
                     + variant)
    names = list(dict.fromkeys(names))  # an lr or seed grid repeats a row: its cells are averaged
    rows = compose_cfg("train", [f"experiment={name}"], tmp_path).hydra.sweeper.rows
    here = [r for r in rows if any(_holds(c, r) for c in first)]  # the rows this model × task has (exclude)
    assert len(names) == len(here), names  # every row its own name
    if name.endswith("_offline"):
        assert {m for m, _ in pairs} <= OFFLINE_MODELS and {t for _, t in pairs} - {"lambada"} <= OFFLINE_TASKS
        if "lambada" in {t for _, t in pairs}:  # LAMBADA's protocol on local text
            assert compose_cfg("train", first[0], tmp_path).task.data.data_files is not None
    else:
        hub = compose_cfg("train", [f"experiment={name}"], tmp_path.parent / "hub")
        assert hub.hydra.sweep.dir == f"multirun/{name}"
    return names


def test_the_presets_hold_the_published_tables_rows(tmp_path):
    rows = _check_preset("gpt2_compression_offline", tmp_path)
    # SmolLM2 can lose no fewer than one of its 3 key/value groups per layer: AH90 and AH80 are one row, AH67
    assert rows == ["none", "8b", "4b", "Distil", "AH67", "Distil+67", "Distil+8b", "Distil+4b", "AH67+8b", "AH67+4b",
                    "Distil+67+8b", "Distil+67+4b"]
    study = ["none", "8b", "4b", "Distil", "AH90", "AH80", "Distil+90", "Distil+80", "Distil+8b", "Distil+4b",
             "AH90+8b", "AH90+4b", "AH80+8b", "AH80+4b", "Distil+90+8b", "Distil+90+4b", "Distil+80+8b", "Distil+80+4b"]
    assert _check_preset("gpt2_compression", tmp_path) == study  # GPT-2 S × C4: the study's 18 rows
    hub = _cells("gpt2_compression", tmp_path)
    per_pair = {}
    for c in hub:
        per_pair.setdefault((_value(c, "model"), _value(c, "task")), []).append(c)
    # 18 rows for GPT-2 S/L on 3 tasks; XL without LAMBADA and without the 9 Distil rows; OPT-125m: Base and Pruned
    assert {pair: len(cells) for pair, cells in per_pair.items()} == {
        **{(m, t): 18 for m in ("gpt2", "gpt2-large") for t in ("wikitext2", "c4", "lambada")},
        **{("gpt2-xl", t): 9 for t in ("wikitext2", "c4")}, **{("opt-125m", t): 2 for t in ("wikitext2", "c4", "lambada")}}
    assert all(_value(c, "compress.imp.label") == "Pruned" for c in per_pair[("opt-125m", "c4")][1:])
    cell = compose_cfg("train", per_pair[("gpt2", "c4")][1], tmp_path)  # 8b: the linear layers only, 1024 tokens
    assert (cell.compress.int8wo.embeddings, cell.compress.int8wo.lm_head, cell.task.data.block_size) == (False, False, 1024)
    assert list(cell.report.table)[:5] == ["quality", "last_word_accuracy", "size_mb", "eval_s", "eval_kwh"]
    best = _cells("best_way_to_squeeze", tmp_path)
    assert len(best) == (4 + 4 + 3) * 8  # the thesis' lr grids (IMDB, CoNLL-2003, Persona-Chat) × rows (IMP: 4 X%/Y)
    assert {(_value(c, "model"), _value(c, "task")) for c in best} == {
        ("bert-base-uncased", "imdb"), ("bert-base-uncased", "conll2003"), ("gpt2", "personachat")}
    cfg = compose_cfg("train", best[1], tmp_path)
    assert cfg.callbacks.energy.co2 == "eea" and cfg.callbacks.energy.pue == 1.59
    assert cfg.compress.pkd.teacher == "auto" and list(cfg.compress.pkd.teacher_best_of["optimizer.lr"]) == [
        3e-5, 5e-5, 1e-4, 3e-4]
    # The thesis' Table 4.1 and its PKD student: the pre-trained model's first 6 layers
    assert (cfg.optimizer.lr, cfg.trainer.max_epochs, cfg.task.data.batch_size, cfg.task.data.eval_batch_size) == (
        3e-5, 5, 8, 8)
    assert dict(cfg.compress.pkd.student) == {"layers": 6, "init": "first", "from": "model"}
    # IMDB: 50/25/25 of train + test pooled (the rest follows from carving test first)
    assert list(cfg.task.data.splits.train) == ["train", "test"] and cfg.task.data.splits.test is None
    assert cfg.task.data.carve.test == 0.25 and abs(0.75 * cfg.task.data.carve.validation - 0.25) < 1e-6
    dialog = compose_cfg("train", best[-7], tmp_path)  # the last setup's PKD cell: Persona-Chat at 1e-4
    assert (_value(best[-7], "task"), dialog.optimizer.lr, dialog.trainer.max_epochs) == ("personachat", 1e-4, 3)
    assert list(dialog.compress.pkd.teacher_best_of["optimizer.lr"]) == [5e-5, 6.25e-5, 1e-4]
    rates = _check_preset("pruning_rates_offline", tmp_path)
    assert rates == ["none", "pr-0.1", "pr-0.3", "pr-0.5"]


def test_rows_and_setups_cross_the_sweep_and_the_command_line_may_not_set_what_they_set():
    jobs = [["seed=1"], ["seed=2"]]
    cells = with_rows(jobs, ["compress=none", "compress=[kd,dq] compress.kd.label=D"], ["model=a task=x", "model=b task=y"])
    assert len(cells) == 8
    assert cells[1] == ["seed=1", "model=a", "task=x", "compress=[kd,dq]", "++compress.kd.label=D"]
    assert with_rows(jobs, [], None) == jobs
    with pytest.raises(SqueezeError, match="rows or setups set compress"):
        with_rows([["compress=imp"]], ["compress=none"])
    with pytest.raises(SqueezeError, match="set model"):
        with_rows([["model=gpt2"]], ["compress=none"], ["model=a task=x"])


def test_rows_given_on_the_command_line_run_as_labelled_report_rows(tmp_path):
    rows = '["compress=none","compress=dq compress.dq.label=DQ8","compress=int8wo compress.int8wo.label=W8"]'
    done = run_cli("train.py", ["-m", "model=tiny_bert", "task=rotten_tomatoes", f"hydra.sweeper.rows={rows}",
                                "trainer.max_steps=2", *fast("rotten_tomatoes"), "perf=null",
                                f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [read_result(d) for d in sorted((tmp_path / "sweep").glob("*_*/"))]
    assert [(r["choices"]["compress"], r["compress"].get(r["choices"]["compress"], {}).get("label")) for r in records] \
        == [("none", None), ("dq", "DQ8"), ("int8wo", "W8")]
    from squeeze.report import build
    build([tmp_path / "sweep"], tmp_path / "report")
    text = (tmp_path / "report" / "report.md").read_text()
    assert all(f"| {label} |" in text or f"| {label} ★ |" in text for label in ("DQ8", "W8"))  # ★: recommended


def test_excluded_combinations_leave_the_grid_and_an_entry_that_leaves_nothing_is_said():
    jobs = [[f"model={m}", f"task={t}"] for m in ("a", "b") for t in ("x", "y")]
    cells = with_rows(jobs, ["compress=none", "compress=kd compress.kd.label=D"])
    kept, notes = without(cells, ["model=b task=y", "model=b compress.kd.label=D", "model=c task=x"])
    assert [(_value(c, "model"), _value(c, "task"), _value(c, "compress")) for c in kept] == [
        ("a", "x", "none"), ("a", "x", "kd"), ("a", "y", "none"), ("a", "y", "kd"), ("b", "x", "none")]
    assert notes == ["hydra.sweeper.exclude entry 'model=c task=x' leaves out no cell of this sweep"]
    with pytest.raises(SqueezeError, match="exclude leaves out every cell"):
        without(cells, ["compress=none", "compress=kd"])
