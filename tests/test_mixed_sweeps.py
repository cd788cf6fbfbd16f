"""Compressor settings set once for a whole sweep: ignored by the cells that do not use that compressor,
and no cell repeated because of them (issue: `compress=none,imp compress.imp.end_step=10` stopped at once)."""

import csv

from omegaconf import OmegaConf

from squeeze import report
from squeeze.run.build import chain as build_chain
from squeeze.config import chain_name, lenient_compressor_settings
from squeeze.run.sweep import chosen, prune_cells

from conftest import fast, read_result, run_cli


def test_compressor_settings_become_set_or_add_and_nothing_else_does():
    argv = ["-m", "compress=none,imp", "compress.imp.end_step=10", "+compress.qat.bits=4", "task.data.batch_size=8",
            "compress=[imp,dq]"]
    assert lenient_compressor_settings(argv) == ["-m", "compress=none,imp", "++compress.imp.end_step=10",
                                                 "+compress.qat.bits=4", "task.data.batch_size=8", "compress=[imp,dq]"]


def test_cells_drop_settings_of_compressors_they_do_not_use_and_repeat_no_cell():
    jobs = [[f"compress={c}", f"++compress.imp.target={t}", f"seed={s}"]
            for c in ("none", "imp", "[heads,dq]") for t in (0.3, 0.5) for s in (0, 1)]
    cells = prune_cells(jobs, default=[])
    assert cells == [["compress=none", "seed=0"], ["compress=none", "seed=1"],
                     ["compress=imp", "++compress.imp.target=0.3", "seed=0"],
                     ["compress=imp", "++compress.imp.target=0.3", "seed=1"],
                     ["compress=imp", "++compress.imp.target=0.5", "seed=0"],
                     ["compress=imp", "++compress.imp.target=0.5", "seed=1"],
                     ["compress=[heads,dq]", "seed=0"], ["compress=[heads,dq]", "seed=1"]]
    assert chosen(["compress=[pkd, imp ,dq]"], []) == ["pkd", "imp", "dq"]
    assert chosen(["seed=1"], ["imp"]) == ["imp"]  # no compress= in the cell: the config's own chain


def test_a_chain_skips_settings_without_a_compressor():
    cfg = OmegaConf.create({"none": None, "imp": {"end_step": 10}})  # a none cell given imp's setting
    assert build_chain(cfg) == [] and chain_name(cfg) == "none"
    cfg = OmegaConf.create({"imp": {"_target_": "squeeze.compress.pruning.IterativeMagnitudePruning",
                                    "target": 0.5, "label": "pr .5"}, "dq": {"bits": 8}})
    (imp,) = build_chain(cfg)
    assert (imp.name, imp.label, imp.target, chain_name(cfg)) == ("imp", "pr .5", 0.5, "imp")


def test_a_mixed_sweep_sets_a_compressor_once_and_runs_each_cell_once(tmp_path):
    done = run_cli("train.py", ["-m", "model=tiny_bert", "task=rotten_tomatoes", "compress=none,imp",
                                "compress.imp.target=0.3,0.5", "compress.imp.end_step=2", "compress.imp.frequency=1",
                                "compress.imp.label=pr", "trainer.max_steps=3", *fast("rotten_tomatoes"), "perf=null",
                                f"hydra.sweep.dir={tmp_path}"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [read_result(d) for d in sorted(tmp_path.glob("*_*/"))]
    assert [(r["choices"]["compress"], r["config"]["compress"].get("imp", {}).get("target")) for r in records] == \
        [("none", None), ("imp", 0.3), ("imp", 0.5)]
    assert all(r["status"] == "ok" for r in records)
    assert [r.get("sparsity") for r in records[1:]] == [0.3, 0.5] or \
        all(abs(r["sparsity"] - t) < 0.01 for r, t in zip(records[1:], (0.3, 0.5)))
    assert records[1]["compress"]["imp"]["label"] == "pr"
    # The sweep said where imp's settings went, and the report shows them only for the cells they reached.
    assert "compress.imp.target applies to cells 1-2 (their chain has imp), not to cells 0 (none)" in \
        done.stdout + done.stderr
    with open(report.build([tmp_path], out=tmp_path / "report", draw=False).cells_csv) as f:
        cells = {(c["chain"], c["compress.imp.target"]) for c in csv.DictReader(f)}
    assert cells == {("none", ""), ("imp", "0.3"), ("imp", "0.5")}
