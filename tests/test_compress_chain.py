"""The compressor chain: order rules, naming, and the run calling each hook once, in order."""

from __future__ import annotations

import pytest
from conftest import FAST, compose_cfg, read_result

from squeeze import run
from squeeze.compress import Compressor, check_order
from squeeze.config import chain_name
from squeeze.run.build import chain as build_chain
from squeeze.errors import SqueezeError

CALLS: list[str] = []


class Probe(Compressor):
    """Records the hooks the run calls; `scale` multiplies the weights at finalize."""

    def __init__(self, tag: str, scale: float = 1.0, trains: bool = False, integer_weights: bool = False,
                 replaces_objective: bool = False):
        self.tag, self.scale = tag, scale
        self.trains, self.integer_weights = trains, integer_weights
        self.replaces_objective = replaces_objective

    def prepare_model(self, model, tokenizer):
        CALLS.append(f"{self.tag}.prepare_model")
        return model

    def wrap_module(self, module):
        CALLS.append(f"{self.tag}.wrap_module")
        return module

    def on_train_start(self, trainer, pl_module):
        CALLS.append(f"{self.tag}.on_train_start")

    def finalize(self, model):
        CALLS.append(f"{self.tag}.finalize")
        for p in model.parameters():
            p.data.mul_(self.scale)
        return model

    def summary(self):
        return {"tag": self.tag}


def _probe(tag, **kw):
    return {"_target_": "test_compress_chain.Probe", "tag": tag, **kw}


def test_chain_names_and_baseline():
    assert chain_name({"none": None}) == "none"
    assert chain_name({"pkd": {"_target_": "a.B"}, "imp": {"_target_": "a.C"}, "dq": {"_target_": "a.D"}}) == "pkd+imp+dq"
    assert chain_name({"pkd": {"_target_": "a.B"}, "imp": {"target": 0.5}}) == "pkd"  # settings only: not in the chain
    assert build_chain({"none": None}) == []


def test_training_after_integer_conversion_fails_fast():
    dq, qat = Probe("dq", integer_weights=True), Probe("qat", trains=True)
    dq.name, qat.name = "dq", "qat"
    check_order([qat, dq])  # train, then convert: fine
    with pytest.raises(SqueezeError, match="qat trains the model but comes after dq"):
        check_order([dq, qat])


def test_distillation_comes_first_and_alone():
    pkd, kd = Probe("pkd", trains=True, replaces_objective=True), Probe("kd", trains=True, replaces_objective=True)
    imp, dq = Probe("imp", trains=True), Probe("dq", integer_weights=True)
    for probe, name in ((pkd, "pkd"), (kd, "kd"), (imp, "imp"), (dq, "dq")):
        probe.name = name
    check_order([pkd, imp, dq])  # the thesis' Distil+90+4b in one chain
    with pytest.raises(SqueezeError, match=r"pkd builds the student .* put pkd first, e.g. \[pkd,imp\]"):
        check_order([imp, pkd])
    with pytest.raises(SqueezeError, match="pkd and kd both replace the training objective"):
        check_order([pkd, kd])


def test_a_target_that_is_not_a_compressor_is_named():
    with pytest.raises(SqueezeError, match="compress.x built a dict"):
        build_chain({"x": {"_target_": "builtins.dict"}})


def test_run_calls_each_hook_once_in_order_and_records_the_chain(tmp_path):
    CALLS.clear()
    overrides = FAST + ["model=tiny_bert", "task=rotten_tomatoes", "trainer.limit_train_batches=2",
                        "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
                        "+compress.a._target_=test_compress_chain.Probe", "+compress.a.tag=a",
                        "+compress.b._target_=test_compress_chain.Probe", "+compress.b.tag=b",
                        "+compress.b.scale=0.0"]
    cfg = compose_cfg("train", overrides, tmp_path)
    record = run.train(cfg)
    assert record["status"] == "ok", record["error"]
    assert CALLS == ["a.prepare_model", "b.prepare_model", "a.wrap_module", "b.wrap_module",
                     "a.on_train_start", "b.on_train_start", "a.finalize", "b.finalize"]
    saved = read_result(tmp_path)
    assert saved["choices"]["compress"] == "a+b"
    assert saved["compress"] == {"chain": ["a", "b"], "a": {"tag": "a"}, "b": {"tag": "b"}}
    # b zeroed every weight at finalize: the saved and tested model is the finalized one.
    assert saved["nonzero_params"] == 0
    assert saved["validation"]["monitor"] == "val/accuracy"


def test_evaluate_refuses_a_compressor_that_trains(tmp_path):
    cfg = compose_cfg("eval", FAST + ["model=tiny_bert", "+compress.p._target_=test_compress_chain.Probe",
                                      "+compress.p.tag=p", "+compress.p.trains=true"], tmp_path)
    with pytest.raises(SqueezeError, match="compress=p trains the model; run `python train.py compress=p`"):
        run.evaluate(cfg)
