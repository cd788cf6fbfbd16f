"""A sweep's [imp,dq] cell starts from the finished imp cell of the same settings (squeeze.run.trained_head): one
IMP training for both rows, the quantized row's zeros exactly the IMP row's, its cost that training + its own work,
counted once in the totals; with baseline.reuse=false it trains its own, as before."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from squeeze import formats
from squeeze.run.plan import plan, table
from squeeze.run.trained_head import split

from conftest import fast, read_result, run_cli


def _c(name: str, after: bool):
    return SimpleNamespace(name=name, after_training=after)


def test_a_chain_splits_into_its_training_head_and_post_training_tail():
    imp, pkd, dq, sq, qat = _c("imp", False), _c("pkd", False), _c("dq", True), _c("smoothquant", True), _c("qat", False)
    assert split([imp, dq]) == ([imp], [dq])
    assert split([pkd, imp, sq, dq]) == ([pkd, imp], [sq, dq])
    assert split([imp]) == ([imp], []) and split([dq]) == ([dq], []) and split([sq, dq]) == ([sq, dq], [])
    assert split([dq, qat]) == ([dq, qat], [])  # training after a post-training step: nothing to start from


SWEEP = ["model=tiny_gpt2", "task=austen", "compress=imp,[imp,dq]", "baseline.reuse=multirun,false",
         "compress.imp.target=0.5", "compress.imp.end_step=2", "compress.imp.frequency=1", "compress.imp.label=IMP",
         "trainer.max_steps=3", *fast("austen"), "perf=null"]


def test_the_plan_says_which_cell_the_quantized_row_starts_from(tmp_path):
    planned = plan([*SWEEP, f"hydra.sweep.dir={tmp_path}"])
    assert [(c.chain, c.head_cell) for c in planned.cells] == [("imp", None), ("imp", None), ("imp+dq", 0),
                                                               ("imp+dq", None)]
    assert "starts from cell 0's model" in table(planned)


def test_imp_then_dq_starts_from_the_imp_cell_and_trains_nothing_again(tmp_path):
    done = run_cli("train.py", ["-m", *SWEEP, f"hydra.sweep.dir={tmp_path}"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    cells = {(r["choices"]["compress"], r["config"]["baseline"]["reuse"]): (d, r)
             for d in sorted(tmp_path.glob("*_*/")) for r in [read_result(d)]}
    assert all(r["status"] == "ok" for _, r in cells.values()), [r["error"] for _, r in cells.values()]
    imp_dir, imp = cells[("imp", "multirun")]
    on_imp_dir, on_imp = cells[("imp+dq", "multirun")]
    own_dir, own = cells[("imp+dq", False)]

    assert on_imp["trained_head"] == str(imp_dir)  # the earliest cell that trained it (cell 0)
    started = read_result(on_imp["trained_head"])
    assert on_imp["compress"]["chain"] == ["imp", "dq"] and on_imp["compress"]["imp"] == started["compress"]["imp"]
    assert on_imp["compress"]["dq"]["quantized_modules"] > 0 and on_imp["sparsity"] == started["sparsity"]
    assert on_imp["train_seconds"] == started["train_seconds"] > 0
    assert on_imp["spent"]["train_seconds"] == 0.0  # its own work trained nothing; the imp row counts that
    assert on_imp["cost"]["total"]["seconds"] >= started["cost"]["total"]["seconds"]
    assert not (on_imp_dir / "checkpoints").exists() or not any((on_imp_dir / "checkpoints").iterdir())
    assert "trained_head" not in own and own["train_seconds"] > 0  # baseline.reuse=false: its own IMP training

    # The quantized model keeps every zero the IMP cell's model has.
    pruned = formats.load(started["run_dir"] + "/model", "causal_lm")
    quantized = formats.load(on_imp_dir / "model", "causal_lm")
    weight = pruned.transformer.h[0].mlp.c_fc.weight.T  # Conv1D: [in, out]
    layer = quantized.transformer.h[0].mlp.c_fc
    zeros = weight == 0
    assert zeros.float().mean() > 0.3 and torch.all(layer.weight[zeros] == 0)
